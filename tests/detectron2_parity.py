"""Side-by-side comparison of our Panoptic FPN with detectron2's on the same weights and photos.

Shared by the golden test (``tests/unit/test_detectron2_parity.py``, no detectron2 needed) and
``fixtures/detectron2/regenerate.py`` (runs detectron2, writes the golden files). Both sides'
stage outputs are put in one form: a dict of numpy arrays, see ``OUTPUT_KEYS``.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch
from PIL import Image

from tests.detectron2_weights import FIXTURES

PHOTOS = ("grace_hopper", "chelsea", "coffee", "rocket")
SEM_SAMPLES = 2048          # semantic-logit positions stored per image (seeded)
ANCHOR_SAMPLES = 256        # anchors stored per level (seeded)

OUTPUT_KEYS = {
    "resized_sha256": "the resized input image (uint8 HxWx3 RGB), sha256 of its bytes",
    "anchors_count": "(levels,) anchors per level",
    "anchors_idx": "(levels, ANCHOR_SAMPLES) sampled anchor indices",
    "anchors": "(levels, ANCHOR_SAMPLES, 4) the anchors at those indices",
    "proposals": "(P, 4) RPN proposals, best first", "proposal_logits": "(P,)",
    "sem_idx": "(SEM_SAMPLES, 2) (y, x) positions in the output image",
    "sem_logits": "(SEM_SAMPLES, C) semantic logits at output size at those positions",
    "sem_argmax": "(H, W) uint8 argmax of the semantic logits",
    "boxes": "(D, 4) detections in output pixels", "scores": "(D,)", "classes": "(D,) contiguous thing class",
    "masks": "(D, H, W) bool pasted instance masks (stored bit-packed)",
    "panoptic": "(H, W) int32 segment ids", "segments": "JSON list of segments (id, isthing, category_id)",
}


def load_photo(name: str) -> np.ndarray:
    with Image.open(os.path.join(FIXTURES, f"{name}.jpg")) as im:
        return np.asarray(im.convert("RGB"))


def sem_positions(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng([seed, height, width])
    return np.stack([rng.integers(0, height, SEM_SAMPLES), rng.integers(0, width, SEM_SAMPLES)], 1)


def anchor_positions(counts: list[int], seed: int = 0) -> np.ndarray:
    return np.stack([np.random.default_rng([seed, n]).integers(0, n, ANCHOR_SAMPLES) for n in counts])


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def pack(out: dict) -> dict:
    """Outputs -> what an .npz stores (masks bit-packed, segments as JSON text)."""
    d = dict(out)
    d["masks_shape"] = np.array(d["masks"].shape)
    d["masks"] = np.packbits(d["masks"].astype(bool), axis=-1)
    d["segments"] = np.array(json.dumps(d["segments"]))
    d["resized_sha256"] = np.array(d["resized_sha256"])
    return d


def unpack(npz) -> dict:
    d = {k: npz[k] for k in npz.files}
    shape = tuple(d.pop("masks_shape"))
    d["masks"] = np.unpackbits(d["masks"], axis=-1, count=shape[-1]).astype(bool).reshape(shape)
    d["segments"] = json.loads(str(d["segments"]))
    d["resized_sha256"] = str(d["resized_sha256"])
    return d


def golden_path(config: str, photo: str) -> str:
    return os.path.join(FIXTURES, f"golden_{config}_{photo}.npz")


# -- our side --------------------------------------------------------------------------------

def resize_for_test(image: np.ndarray, min_size: int = 800, max_size: int = 1333) -> np.ndarray:
    """Our test-time resize (the reader's and predict's), on an RGB uint8 image."""
    from components.data.transforms import output_shape, resize_image

    h, w = image.shape[:2]
    return resize_image(image, *output_shape(h, w, min_size, max_size))


def run_ours(model, image: np.ndarray) -> dict:
    """Our model's stage outputs on one photo, in ``OUTPUT_KEYS`` form."""
    captured = {}
    hooks = [
        model.rpn.anchor_generator.register_forward_hook(lambda m, i, o: captured.__setitem__("anchors", o)),
        model.rpn.register_forward_hook(lambda m, i, o: captured.__setitem__("proposals", o[0][0])),
    ]
    h, w = image.shape[:2]
    resized = resize_for_test(image)
    sample = {"image": torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))), "height": h, "width": w}
    try:
        with torch.no_grad():
            out = model.eval()([sample])[0]
    finally:
        for hk in hooks:
            hk.remove()
    anchors = [a.numpy() for a in captured["anchors"]]
    idx = anchor_positions([len(a) for a in anchors])
    pos = sem_positions(h, w)
    pan, segments = out["panoptic_seg"]
    inst = out["instances"]
    return {
        "resized_sha256": sha256(resized),
        "anchors_count": np.array([len(a) for a in anchors]),
        "anchors_idx": idx, "anchors": np.stack([a[i] for a, i in zip(anchors, idx)]),
        "proposals": captured["proposals"]["boxes"].numpy(), "proposal_logits": captured["proposals"]["logits"].numpy(),
        "sem_idx": pos, "sem_logits": out["sem_seg"][:, pos[:, 0], pos[:, 1]].T.numpy(),
        "sem_argmax": out["sem_seg"].argmax(0).numpy().astype(np.uint8),
        "boxes": inst["boxes"].numpy(), "scores": inst["scores"].numpy(), "classes": inst["classes"].numpy(),
        "masks": inst["masks"].numpy(), "panoptic": pan.numpy().astype(np.int32),
        "segments": [{"id": int(s["id"]), "isthing": bool(s["isthing"]), "category_id": int(s["category"])}
                     for s in segments],
    }


# -- comparison ------------------------------------------------------------------------------

# A matched mask or segment "agrees" at IoU >= 0.99, or, when it is small, with at most this many
# pixels different: probabilities within float noise of the 0.5 threshold flip with the CPU's
# kernels (the golden files came from an AVX2 machine; on an AVX-512 one, 2 pixels of a 94-pixel
# mask differ: IoU 0.989)
PIXELS_AT_THRESHOLD = 3


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0  # two empty masks agree


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    def area(x):
        return (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])

    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-12)


def match_detections(ref: dict, ours: dict) -> list[tuple[int, int]]:
    """(ref index, our index) pairs: same class, boxes closest (L-inf), each used once."""
    pairs, used = [], set()
    for i in np.argsort(-ref["scores"], kind="stable"):
        cand = [j for j in range(len(ours["boxes"])) if j not in used and ours["classes"][j] == ref["classes"][i]]
        if not cand:
            continue
        j = min(cand, key=lambda j: np.abs(ours["boxes"][j] - ref["boxes"][i]).max())
        if np.abs(ours["boxes"][j] - ref["boxes"][i]).max() < 1.0:
            pairs.append((int(i), j))
            used.add(j)
    return pairs


def _segment_ious(ref: dict, ours: dict):
    """Each reference segment's IoU with the our segment of the same (category, isthing) that
    overlaps it most, the map from our segment ids to reference ids, and the pixels on which
    each reference segment and its match differ."""
    rp, op = ref["panoptic"], ours["panoptic"]
    ious, off, id_map = [], [], {0: 0}
    for s in ref["segments"]:
        m = rp == s["id"]
        best, best_id, best_off = 0.0, None, int(m.sum())
        for t in ours["segments"]:
            if (t["category_id"], t["isthing"]) != (s["category_id"], s["isthing"]) or t["id"] in id_map:
                continue
            o = op == t["id"]
            inter = np.logical_and(m, o).sum()
            if inter:
                union = np.logical_or(m, o).sum()
                if inter / union > best:
                    best, best_id, best_off = inter / union, t["id"], int(union - inter)
        ious.append(best)
        off.append(best_off)
        if best_id is not None:
            id_map[best_id] = s["id"]
    return np.array(ious), id_map, np.array(off)


def compare(ref: dict, ours: dict) -> dict:
    """The parity figures of one photo (see the golden test for the bounds)."""
    r = {"resize_equal": ref["resized_sha256"] == ours["resized_sha256"]}
    same_count = np.array_equal(ref["anchors_count"], ours["anchors_count"])
    r["anchors_max_diff"] = float(np.abs(ref["anchors"] - ours["anchors"]).max()) if same_count else float("inf")
    iou = _iou_matrix(ref["proposals"], ours["proposals"])
    r["proposals"] = len(ref["proposals"]), len(ours["proposals"])
    r["proposals_matched_099"] = float((iou.max(1) >= 0.99).mean()) if iou.size else 0.0
    n = min(len(ref["proposals"]), len(ours["proposals"]))
    r["proposals_same_order_099"] = float((np.diagonal(iou)[:n] >= 0.99).mean()) if n else 0.0
    diff = np.linalg.norm(ours["sem_logits"] - ref["sem_logits"])
    r["sem_rel_diff"] = float(diff / np.linalg.norm(ref["sem_logits"]))
    r["sem_argmax_agree"] = float((ours["sem_argmax"] == ref["sem_argmax"]).mean())
    pairs = match_detections(ref, ours)
    r["detections"] = len(ref["boxes"]), len(ours["boxes"]), len(pairs)
    if pairs:
        i, j = map(list, zip(*pairs))
        r["box_max_diff"] = float(np.abs(ref["boxes"][i] - ours["boxes"][j]).max())
        r["score_max_diff"] = float(np.abs(ref["scores"][i] - ours["scores"][j]).max())
        mi = [mask_iou(ref["masks"][a], ours["masks"][b]) for a, b in pairs]
        r["mask_iou_min"], r["mask_iou_mean"] = float(np.min(mi)), float(np.mean(mi))
        off = [int(np.logical_xor(ref["masks"][a], ours["masks"][b]).sum()) for a, b in pairs]
        r["mask_pixels_off_max"] = max(off)
        r["masks_apart"] = sum(1 for iou, n in zip(mi, off) if iou < 0.99 and n > PIXELS_AT_THRESHOLD)
    n = min(len(ref["masks"]), len(ours["masks"]))
    in_order = [mask_iou(ref["masks"][k], ours["masks"][k]) for k in range(n)]
    r["mask_iou_in_order"] = float(np.mean(in_order)) if n else 1.0
    seg_iou, id_map, seg_off = _segment_ious(ref, ours)
    lut = np.full(int(ours["panoptic"].max()) + 1, -1, np.int64)
    for our_id, ref_id in id_map.items():
        lut[our_id] = ref_id
    mapped = lut[ours["panoptic"]]
    r["panoptic_agree"] = float((mapped == ref["panoptic"]).mean())
    def key(segs):
        return sorted((s["category_id"], s["isthing"]) for s in segs)

    r["segments"] = len(ref["segments"]), len(ours["segments"])
    r["segments_same"] = key(ref["segments"]) == key(ours["segments"])
    r["segment_iou_min"] = float(seg_iou.min()) if len(seg_iou) else 1.0
    r["segment_pixels_off_max"] = int(seg_off.max()) if len(seg_off) else 0
    r["segments_apart"] = int(((seg_iou < 0.99) & (seg_off > PIXELS_AT_THRESHOLD)).sum())
    return r


# -- training parity -------------------------------------------------------------------------

TRAIN_PHOTOS = ("chelsea", "rocket")
TRAIN_SHORT_SIDE = 512
RPN_SEED, ROI_SEED = 11, 12


def training_batch(num_stuff: int = 53) -> list[dict]:
    """Two photos at short side 512 with seeded ground truth: 5 ellipse instances each (thing
    classes, one crowd-free box and mask per instance) over horizontal bands of stuff classes,
    a strip of VOID. The same on both sides: RGB here, BGR for detectron2."""
    from components.data.transforms import output_shape, resize_image

    batch = []
    for k, name in enumerate(TRAIN_PHOTOS):
        image = load_photo(name)
        nh, nw = output_shape(*image.shape[:2], TRAIN_SHORT_SIDE, 1333)
        image = resize_image(image, nh, nw)
        rng = np.random.default_rng([7, k])
        sem = np.zeros((nh, nw), np.uint8)
        bands = np.linspace(0, nh, 5).astype(int)
        for b, (y0, y1) in enumerate(zip(bands[:-1], bands[1:])):
            sem[y0:y1] = 1 + int(rng.integers(num_stuff))
        sem[:, :8] = 255
        yy, xx = np.mgrid[:nh, :nw]
        boxes, classes, masks = [], [], []
        for _ in range(5):
            cy, cx = rng.uniform(0.2, 0.8) * nh, rng.uniform(0.2, 0.8) * nw
            ry, rx = rng.uniform(0.05, 0.25) * nh, rng.uniform(0.05, 0.25) * nw
            m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            ys, xs = np.nonzero(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            classes.append(int(rng.integers(80)))
            masks.append(m)
            sem[m] = 0
        batch.append({"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                      "boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(classes),
                      "masks": torch.from_numpy(np.stack(masks).astype(np.uint8)), "sem_seg": torch.from_numpy(sem)})
    return batch


def train_losses_ours(model, batch: list[dict], proposals: list[np.ndarray]) -> tuple[dict, list[np.ndarray]]:
    """Our losses on ``batch``: semantic head; RPN with ``torch.manual_seed(RPN_SEED)`` before it;
    RoI heads on the given ``proposals`` (detectron2's) with ``manual_seed(ROI_SEED)``.
    Returns (losses, our RPN's training proposals)."""
    model.train()
    images, sizes = model.preprocess(batch)
    features = model.backbone(images)
    levels = [features[k] for k in ("0", "1", "2", "3")]
    sem_t = torch.full(images.shape[:1] + images.shape[2:], 255, dtype=torch.long)
    for i, s in enumerate(batch):
        sem_t[i, : s["sem_seg"].shape[0], : s["sem_seg"].shape[1]] = s["sem_seg"]
    _, losses = model.sem_seg_head(levels, sem_t)
    torch.manual_seed(RPN_SEED)
    props, rpn_losses = model.rpn(levels + [features["pool"]], sizes, [s["boxes"] for s in batch])
    torch.manual_seed(ROI_SEED)
    targets = [{"boxes": s["boxes"], "labels": s["labels"], "masks": s["masks"]} for s in batch]
    _, roi_losses = model.roi_heads(features, [torch.from_numpy(p) for p in proposals], sizes, targets)
    losses.update(rpn_losses)
    losses.update(roi_losses)
    return {k: float(v.detach()) for k, v in losses.items()}, [p["boxes"].numpy() for p in props]
