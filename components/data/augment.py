"""Training-time augmentation of panoptic samples, on the decoded image and the segment index map.

Every function takes and returns ``(image, index, segments)``: an (H, W, 3) uint8 image, an
(H, W) int map of indices into ``segments`` (-1 = VOID) and the segments (COCO
``segments_info`` dicts). The model's targets are built afterwards from the index map
(``targets.build_targets``), so instance masks, boxes and the semantic map follow the pixels
by construction. All randomness comes from the ``numpy.random.Generator`` given: the reader
seeds one per sample (seed, epoch, reader, image id), which keeps runs reproducible and
resumable.

- ``resize_shortest_edge`` + ``flip``: detectron2's ResizeShortestEdge ("choice") and
  RandomFlip, the Panoptic FPN recipe.
- ``large_scale_jitter``: detectron2's "new baselines" recipe (ResizeScale to a random 0.1-2.0
  of a square target, then a FixedSizeCrop); the batch pads what the crop does not fill.
- ``copy_paste``: simple copy-paste (Ghiasi et al., CVPR 2021) made panoptic: thing instances
  of another sample are pasted on top; what they cover is theirs. An occluded instance left
  with less than ``min_visible`` of its area is dropped (its remaining pixels become VOID, so
  nothing claims them falsely); a stuff region fully covered disappears; areas are recomputed.
"""

from __future__ import annotations

import numpy as np

from components.common.coco_panoptic import CategoryMaps
from components.data.transforms import output_shape, resize_image, resize_nearest

Sample = tuple[np.ndarray, np.ndarray, list[dict]]


def resize(image: np.ndarray, index: np.ndarray, nh: int, nw: int) -> tuple[np.ndarray, np.ndarray]:
    if (nh, nw) == image.shape[:2]:
        return image, index
    return resize_image(image, nh, nw), resize_nearest(index, nh, nw)


def resize_shortest_edge(sample: Sample, sizes: tuple[int, ...], max_size: int, rng: np.random.Generator) -> Sample:
    image, index, segments = sample
    short = int(sizes[int(rng.integers(len(sizes)))])
    image, index = resize(image, index, *output_shape(*image.shape[:2], short, max_size))
    return image, index, segments


def flip(sample: Sample, prob: float, rng: np.random.Generator) -> Sample:
    image, index, segments = sample
    if rng.random() < prob:
        image, index = image[:, ::-1], index[:, ::-1]
    return image, index, segments


def large_scale_jitter(sample: Sample, size: int, scale: tuple[float, float], rng: np.random.Generator) -> Sample:
    """Resize so the image fits a square of ``size * s`` (s uniform in ``scale``), then crop a
    random ``size`` x ``size`` window when it is larger (detectron2's ResizeScale + FixedSizeCrop)."""
    image, index, segments = sample
    h, w = image.shape[:2]
    s = float(rng.uniform(*scale))
    f = min(size * s / h, size * s / w)
    image, index = resize(image, index, max(1, int(round(h * f))), max(1, int(round(w * f))))
    h, w = image.shape[:2]
    y0 = int(rng.integers(h - size + 1)) if h > size else 0
    x0 = int(rng.integers(w - size + 1)) if w > size else 0
    return image[y0:y0 + size, x0:x0 + size], index[y0:y0 + size, x0:x0 + size], segments


def copy_paste(target: Sample, donor: Sample, cats: CategoryMaps, rng: np.random.Generator, *,
               max_instances: int = 10, min_visible: float = 0.3, min_pixels: int = 16,
               offset: tuple[int, int] | None = None) -> Sample:
    """Paste a random subset of ``donor``'s non-crowd thing instances onto ``target``.

    The donor is placed at ``offset`` (row, column; default: random, up to a quarter of it
    hanging over an edge: what falls outside is cut). An occluded target thing left with fewer
    than ``min_visible`` of its pixels, or fewer than ``min_pixels``, is dropped. Returns the
    new sample; ``segments`` holds the target's surviving segments followed by the pasted
    ones, each with its ``area`` recomputed and unique ``id``s.
    """
    image, index, segments = target
    d_image, d_index, d_segments = donor
    candidates = [k for k, s in enumerate(d_segments)
                  if cats.is_thing(int(s["category_id"])) and not s.get("iscrowd")]
    if not candidates:
        return _with_areas(image, index, segments)
    chosen = [k for k in candidates if rng.random() < 0.5] or [candidates[int(rng.integers(len(candidates)))]]
    chosen = chosen[:max_instances]
    H, W = index.shape
    dh, dw = d_index.shape
    if offset is None:
        offset = (int(rng.integers(-(dh // 4), max(H - 3 * dh // 4, -(dh // 4)) + 1)),
                  int(rng.integers(-(dw // 4), max(W - 3 * dw // 4, -(dw // 4)) + 1)))
    oy, ox = offset
    # the donor window that lands on the canvas
    ty0, tx0, ty1, tx1 = max(oy, 0), max(ox, 0), min(oy + dh, H), min(ox + dw, W)
    if ty0 >= ty1 or tx0 >= tx1:
        return _with_areas(image, index, segments)
    src = d_index[ty0 - oy:ty1 - oy, tx0 - ox:tx1 - ox]
    lut = np.full(len(d_segments) + 1, -1, np.int64)   # donor index -> new index (-1: not pasted)
    for j, k in enumerate(chosen):
        lut[k] = len(segments) + j
    pasted = lut[src]                                   # d_index == -1 reads the last entry: -1
    covered = pasted >= 0
    image = image.copy()
    index = index.astype(np.int64, copy=True)
    before = np.bincount(index[index >= 0].ravel(), minlength=len(segments))
    image[ty0:ty1, tx0:tx1][covered] = d_image[ty0 - oy:ty1 - oy, tx0 - ox:tx1 - ox][covered]
    index[ty0:ty1, tx0:tx1][covered] = pasted[covered]
    after = np.bincount(index[(index >= 0) & (index < len(segments))].ravel(), minlength=len(segments))
    for k, s in enumerate(segments):  # occluded things that lost most of their area: dropped (VOID)
        thing = cats.is_thing(int(s["category_id"]))
        if thing and after[k] and (after[k] < min_visible * before[k] or after[k] < min_pixels):
            index[index == k] = -1
    next_id = max([int(s["id"]) for s in segments] + [0]) + 1
    new = list(segments) + [{**d_segments[k], "id": next_id + j} for j, k in enumerate(chosen)]
    return _with_areas(image, index, new)


def _with_areas(image: np.ndarray, index: np.ndarray, segments: list[dict]) -> Sample:
    """Drop segments with no pixel left, renumber the map densely, and recompute areas."""
    counts = np.bincount(index[index >= 0].ravel(), minlength=len(segments))
    keep = [k for k in range(len(segments)) if counts[k] > 0]
    remap = np.full(len(segments) + 1, -1, np.int64)
    remap[keep] = np.arange(len(keep))
    out = remap[index]                                    # index -1 reads the last entry: -1
    kept = [{**segments[k], "area": int(counts[k])} for k in keep]
    return image, out, kept


def augment(sample: Sample, cfg, cats: CategoryMaps, rng: np.random.Generator, donor: Sample | None = None) -> Sample:
    """The training augmentation an ``InputConfig`` asks for: resize (shortest edge, or large-scale
    jitter), flip, then copy-paste from ``donor`` (transformed the same way, with its own draws).
    With LSJ and copy-paste off, the random draws are exactly the previous recipe's."""
    def geometric(s: Sample) -> Sample:
        if cfg.lsj_size:
            s = large_scale_jitter(s, cfg.lsj_size, tuple(cfg.lsj_scale), rng)
        else:
            s = resize_shortest_edge(s, cfg.min_size_train, cfg.max_size_train, rng)
        return flip(s, cfg.flip_prob, rng)

    sample = geometric(sample)
    if cfg.copy_paste_prob > 0 and donor is not None and rng.random() < cfg.copy_paste_prob:
        sample = copy_paste(sample, geometric(donor), cats, rng, max_instances=cfg.copy_paste_max_instances,
                            min_visible=cfg.copy_paste_min_visible)
    return sample
