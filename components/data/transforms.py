"""Geometric transforms of images and label maps (detectron2's ResizeShortestEdge semantics)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def output_shape(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge.get_output_shape: scale the short side to ``short``,
    then shrink so the long side is at most ``max_size``; round half up."""
    scale = short / min(h, w)
    nh, nw = (short, scale * w) if h < w else (scale * h, short)
    if max(nh, nw) > max_size:
        s = max_size / max(nh, nw)
        nh, nw = nh * s, nw * s
    # at least 1 px: an image thin enough would round a side to 0 (detectron2 does; nothing works then)
    return max(1, int(nh + 0.5)), max(1, int(nw + 0.5))


def resize_nearest(arr: np.ndarray, nh: int, nw: int) -> np.ndarray:
    """Nearest-neighbour resize sampling at pixel centres (as PIL's NEAREST does)."""
    h, w = arr.shape[:2]
    ys = np.minimum(((np.arange(nh) + 0.5) * h / nh).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(nw) + 0.5) * w / nw).astype(np.int64), w - 1)
    return arr[ys[:, None], xs[None, :]]


def resize_image(image: np.ndarray, nh: int, nw: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (nh, nw, 3) with PIL's bilinear filter, as detectron2's ResizeTransform
    does for uint8 images. Returns the input itself when the size is unchanged."""
    if image.shape[:2] == (nh, nw):
        return image
    return np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
