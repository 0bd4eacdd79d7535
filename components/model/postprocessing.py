"""From raw outputs to a panoptic segmentation (detectron2's Panoptic FPN fusion)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sem_seg_postprocess(logits: torch.Tensor, image_size: tuple[int, int], output_size: tuple[int, int]) -> torch.Tensor:
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
