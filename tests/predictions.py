"""Prediction sets in COCO panoptic format made from a GT split, for PQ tests and benchmarks."""

from __future__ import annotations

import json
import os

import numpy as np

from components.common.coco_panoptic import decode_png, encode_png

MODES = ("perfect", "empty", "shifted", "crowd_void", "unmatched", "absent_category", "mixed")


def _shift(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    out = np.zeros_like(mask)
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    ys, xs = ys + dy, xs + dx
    keep = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    out[ys[keep], xs[keep]] = True
    return out


def predict_from_gt(gt_ids, segments, cats, mode, rng, absent_cat=None):
    """A prediction (ids, segments_info) derived from one GT image in the way ``mode`` says."""
    h, w = gt_ids.shape
    pred = np.zeros((h, w), np.uint32)
    info = []
    next_id = [int(rng.integers(1, 1000))]

    def paint(mask, cat):
        if not mask.any():
            return
        next_id[0] += int(rng.integers(1, 50))
        pred[mask] = next_id[0]
        info.append({"id": next_id[0], "category_id": cat, "iscrowd": 0})

    if mode == "empty":
        return pred, info
    for s in segments:
        m = gt_ids == s["id"]
        cat = s["category_id"]
        if mode == "perfect":
            paint(m, cat)
        elif mode == "shifted":
            # shifts from tiny to large: IoUs on both sides of 0.5
            d = int(rng.integers(0, 12))
            paint(_shift(m, d, int(rng.integers(-d, d + 1))), cat)
        elif mode == "crowd_void":
            if s["iscrowd"]:
                # predict the crowd area as one or two plain instances of its category
                paint(_shift(m, 1, 0), cat)
            else:
                paint(m, cat)
        elif mode == "unmatched":
            r = rng.random()
            if r < 0.25:
                continue  # missed: a false negative
            if r < 0.5:  # wrong category
                others = [c for c in cats if c != cat]
                paint(m, int(rng.choice(others)))
            else:
                paint(m, cat)
        elif mode == "absent_category":
            paint(m, absent_cat if rng.random() < 0.3 else cat)
        elif mode == "mixed":
            r = rng.random()
            if r < 0.1:
                continue
            d = int(rng.integers(0, 8))
            mm = _shift(m, d, int(rng.integers(-d, d + 1))) if r < 0.6 else m
            paint(mm, cat if rng.random() < 0.85 else int(rng.choice(list(cats))))
    if mode in ("crowd_void", "mixed", "unmatched"):
        # spurious blobs: some over VOID (ignored), some over real content (false positives)
        void = gt_ids == 0
        for _ in range(2):
            y, x = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
            blob = np.zeros((h, w), bool)
            blob[y:y + int(rng.integers(3, 20)), x:x + int(rng.integers(3, 20))] = True
            if rng.random() < 0.5 and void.any():
                vy, vx = np.nonzero(void)
                k = int(rng.integers(len(vy)))
                blob = np.zeros((h, w), bool)
                blob[max(0, vy[k] - 2):vy[k] + 2, max(0, vx[k] - 3):vx[k] + 3] = True
            paint(blob & (pred == 0) | blob & void, int(rng.choice(list(cats))))
    # a segment id listed once per painted region; recount ids actually left in the PNG
    present = set(np.unique(pred).tolist())
    info = [s for s in info if s["id"] in present]
    return pred, info


def write_predictions(gt_root: str, split: str, out: str, mode: str, seed: int = 0) -> tuple[str, str]:
    """Write ``out/pred.json`` + ``out/pred/*.png``. Returns (json path, png folder)."""
    with open(os.path.join(gt_root, "annotations", f"panoptic_{split}.json")) as f:
        gt = json.load(f)
    cats = [c["id"] for c in gt["categories"]]
    used = {s["category_id"] for a in gt["annotations"] for s in a["segments_info"]}
    absent = next((c for c in cats if c not in used), cats[-1])
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out, "pred"), exist_ok=True)
    anns = []
    for a in gt["annotations"]:
        with open(os.path.join(gt_root, "annotations", f"panoptic_{split}", a["file_name"]), "rb") as f:
            ids = decode_png(f.read())
        pred, info = predict_from_gt(ids, a["segments_info"], cats, mode, rng, absent)
        with open(os.path.join(out, "pred", a["file_name"]), "wb") as f:
            f.write(encode_png(pred))
        anns.append({"image_id": a["image_id"], "file_name": a["file_name"], "segments_info": info})
    path = os.path.join(out, "pred.json")
    with open(path, "w") as f:
        json.dump({"annotations": anns, "categories": gt["categories"]}, f)
    return path, os.path.join(out, "pred")
