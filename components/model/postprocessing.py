"""From raw outputs to a panoptic segmentation (detectron2's Panoptic FPN fusion)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from components.model.box_ops import clip_boxes, nonempty

# Pasting all masks of a chunk at once costs chunk x H x W floats; on a GPU chunks stay below this.
GPU_PASTE_BYTES = 1 << 30


def _interpolation_matrix(lo: float, hi: float, start: int, stop: int, side: int, device) -> torch.Tensor:
    """(stop - start, side) weights that sample a ``side``-long row of mask values, stretched over
    [lo, hi), at the pixel centres start + 0.5 ... stop - 0.5: bilinear, zero beyond the edges.

    The coordinate arithmetic is that of ``grid_sample(align_corners=False)`` on the grid
    ``(x + 0.5 - lo) / (hi - lo) * 2 - 1``, which is how detectron2 pastes masks.
    """
    centres = torch.arange(start, stop, device=device, dtype=torch.float32) + 0.5
    g = (centres - lo) / (hi - lo) * 2 - 1
    u = ((g + 1) * side - 1) / 2
    u0 = torch.floor(u)
    frac = u - u0
    u0 = u0.long()
    out = torch.zeros((stop - start, side + 2), device=device, dtype=torch.float32)
    rows = torch.arange(stop - start, device=device)
    # columns shifted by one so that taps at -1 and `side` land in spare columns, then dropped
    out[rows, (u0 + 1).clamp(0, side + 1)] += 1 - frac
    out[rows, (u0 + 2).clamp(0, side + 1)] += frac
    return out[:, 1:-1]


def paste_masks(mask_probs: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int],
                threshold: float = 0.5) -> torch.Tensor:
    """Paste (N, M, M) mask probabilities into an image of ``size`` = (H, W) at ``boxes``.

    Each mask is stretched over its box with bilinear interpolation (mask pixel centres at
    (i + 0.5) / M of the box, zero outside the mask), sampled at the image's pixel centres and
    thresholded: the same masks as detectron2's ``paste_masks_in_image``. The interpolation is
    separable, so a mask is two small matrix products, computed on the CPU only over the
    pixels its box can reach (its box plus one pixel) and on a GPU for a chunk of masks at once.
    Returns (N, H, W) bool.
    """
    n, side = mask_probs.shape[0], mask_probs.shape[-1]
    h, w = size
    out = torch.zeros((n, h, w), dtype=torch.bool, device=mask_probs.device)
    if n == 0:
        return out
    probs = mask_probs.float()
    box_list = boxes.float().tolist()
    if mask_probs.device.type == "cpu":
        for i, (x0, y0, x1, y1) in enumerate(box_list):
            xa, ya = max(math.floor(x0) - 1, 0), max(math.floor(y0) - 1, 0)
            xb, yb = min(math.ceil(x1) + 1, w), min(math.ceil(y1) + 1, h)
            if xb <= xa or yb <= ya:
                continue
            ry = _interpolation_matrix(y0, y1, ya, yb, side, probs.device)
            rx = _interpolation_matrix(x0, x1, xa, xb, side, probs.device)
            out[i, ya:yb, xa:xb] = (ry @ probs[i] @ rx.T) >= threshold
        return out
    chunk = max(1, int(GPU_PASTE_BYTES // (4 * h * w)))
    for s in range(0, n, chunk):
        idx = range(s, min(n, s + chunk))
        ry = torch.stack([_interpolation_matrix(box_list[i][1], box_list[i][3], 0, h, side, probs.device) for i in idx])
        rx = torch.stack([_interpolation_matrix(box_list[i][0], box_list[i][2], 0, w, side, probs.device) for i in idx])
        out[s: s + len(idx)] = (ry @ probs[s: s + len(idx)] @ rx.transpose(1, 2)) >= threshold
    return out


def detector_postprocess(boxes: torch.Tensor, image_size: tuple[int, int],
                         output_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes predicted on the resized input -> boxes in the output (original) image, clipped,
    and the mask of the boxes that are still non-empty there (the others are dropped)."""
    sx, sy = output_size[1] / image_size[1], output_size[0] / image_size[0]
    boxes = boxes * torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype, device=boxes.device)
    boxes = clip_boxes(boxes, output_size)
    return boxes, nonempty(boxes)


def sem_seg_postprocess(logits: torch.Tensor, image_size: tuple[int, int],
                        output_size: tuple[int, int]) -> torch.Tensor:
    """(C, Hpad, Wpad) logits -> (C, H, W) at the original size: crop the padding, resize bilinearly."""
    logits = logits[:, : image_size[0], : image_size[1]]
    return F.interpolate(logits[None].float(), size=output_size, mode="bilinear", align_corners=False)[0]


def combine_semantic_and_instance_outputs(*, instance_masks: torch.Tensor, instance_scores: torch.Tensor,
                                          instance_classes: torch.Tensor, semantic: torch.Tensor,
                                          overlap_threshold: float = 0.5, stuff_area_thresh: int = 4096,
                                          instances_score_thresh: float = 0.5):
    """Paint instances by decreasing score, then stuff into what is left.

    An instance (score >= ``instances_score_thresh``) is dropped when more than
    ``overlap_threshold`` of its mask is already painted, else painted where free. Then each
    semantic class except 0 ('things') fills its free pixels if they are at least
    ``stuff_area_thresh``.

    Args:
        instance_masks: (N, H, W) bool.
        instance_scores: (N,).
        instance_classes: (N,) contiguous thing classes.
        semantic: (H, W) argmax of the semantic logits (0 = things, 1..S = stuff).
    Returns:
        (panoptic_seg (H, W) int32 with ids 1..M, 0 = VOID; segments_info with ``id``,
        ``isthing``, ``category`` (contiguous thing class or semantic class), ``score``, ``area``)
    """
    panoptic = torch.zeros_like(semantic, dtype=torch.int32)
    segments = []
    current = 0
    for i in torch.argsort(-instance_scores).tolist():
        score = float(instance_scores[i])
        if score < instances_score_thresh:
            break
        mask = instance_masks[i]
        area = int(mask.sum())
        if area == 0:
            continue
        overlap = int((mask & (panoptic > 0)).sum())
        if overlap / area > overlap_threshold:
            continue
        if overlap:
            mask = mask & (panoptic == 0)
        current += 1
        panoptic[mask] = current
        segments.append({"id": current, "isthing": True, "category": int(instance_classes[i]), "score": score,
                         "area": int(mask.sum()), "instance_id": i})
    for label in torch.unique(semantic).tolist():
        if label == 0:
            continue
        mask = (semantic == label) & (panoptic == 0)
        area = int(mask.sum())
        if area < stuff_area_thresh:
            continue
        current += 1
        panoptic[mask] = current
        segments.append({"id": current, "isthing": False, "category": int(label), "area": area})
    return panoptic, segments
