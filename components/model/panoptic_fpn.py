"""Panoptic FPN (Kirillov et al. 2019): Mask R-CNN + a semantic FPN head, fused into panoptic.

Each part behaves as detectron2's ``PanopticFPN`` with ``panoptic_fpn_R_*`` configs, and is
shown to on golden outputs of a real detectron2 build (``tests/fixtures/detectron2``): anchors
(``anchors.py``), the RPN (``rpn.py``), box and mask heads (``roi_heads.py``), the semantic
head, mask pasting and panoptic fusion (``postprocessing.py``). The backbone comes from the
backbone table (``backbones/``: ResNet, Swin-T, ConvNeXt-T, each with an FPN); detectron2
checkpoints load through ``weights.py``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from components.common.coco_panoptic import IGNORE_LABEL, CategoryMaps
from components.model.anchors import AnchorGenerator
from components.model.backbones import build_backbone
from components.model.box_ops import BoxCoder, Matcher
from components.model.config import Config
from components.model.poolers import MultiLevelRoIAlign
from components.model.postprocessing import (
    combine_semantic_and_instance_outputs,
    detector_postprocess,
    paste_masks,
    sem_seg_postprocess,
)
from components.model.roi_heads import BoxHead, BoxPredictor, MaskHead, RoIHeads
from components.model.rpn import RPN, RPNHead
from components.model.semantic_head import SemSegFPNHead


class PanopticFPN(nn.Module):
    """Panoptic FPN.

    Args:
        backbone: maps (B, 3, H, W) to {"0": P2, ..., "3": P5, "pool": P6}.
        rpn: proposal generator (torchvision ``RegionProposalNetwork`` interface).
        roi_heads: box + mask heads (torchvision ``RoIHeads`` interface).
        sem_seg_head: semantic head over [P2..P5].
        thing_ids / stuff_ids: category ids of the contiguous thing classes 0..T-1 and of the
            semantic classes 1..S, for outputs in dataset terms.
        pixel_mean / pixel_std: in 0-255 units, in ``input_format`` channel order.
        input_format: "RGB" or "BGR" (inputs are RGB; BGR flips them first).
        size_divisibility: pad the batch to a multiple of this.
        instance_loss_weight: weight of the box and mask losses (the semantic head weighs its own).
        combine_*: fusion thresholds (see ``combine_semantic_and_instance_outputs``).
    """

    def __init__(self, *, backbone: nn.Module, rpn: nn.Module, roi_heads: nn.Module, sem_seg_head: SemSegFPNHead,
                 thing_ids, stuff_ids, pixel_mean, pixel_std, input_format: str = "BGR", size_divisibility: int = 32,
                 instance_loss_weight: float = 1.0, combine_overlap_thresh: float = 0.5,
                 combine_stuff_area_thresh: int = 4096, combine_instances_score_thresh: float = 0.5):
        super().__init__()
        self.backbone, self.rpn, self.roi_heads, self.sem_seg_head = backbone, rpn, roi_heads, sem_seg_head
        self.thing_ids, self.stuff_ids = list(thing_ids), list(stuff_ids)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        self.input_format, self.size_divisibility = input_format, size_divisibility
        self.instance_loss_weight = instance_loss_weight
        self.channels_last = False   # set by use_channels_last
        self.combine = dict(overlap_threshold=combine_overlap_thresh, stuff_area_thresh=combine_stuff_area_thresh,
                            instances_score_thresh=combine_instances_score_thresh)

    @classmethod
    def from_config(cls, cfg: Config, categories: CategoryMaps) -> "PanopticFPN":
        m = cfg.model
        backbone = build_backbone(m)
        anchors = AnchorGenerator(sizes=m.anchor_sizes, ratios=m.anchor_ratios, strides=backbone.strides,
                                  offset=m.anchor_offset)
        rpn = RPN(head=RPNHead(m.fpn_channels, len(m.anchor_ratios)), anchor_generator=anchors,
                  matcher=Matcher(tuple(m.rpn_iou_thresholds), (0, -1, 1), allow_low_quality_matches=True),
                  batch_size_per_image=m.rpn_batch_size_per_image, positive_fraction=m.rpn_positive_fraction,
                  pre_nms_topk={"train": m.rpn_pre_nms_topk_train, "test": m.rpn_pre_nms_topk_test},
                  post_nms_topk={"train": m.rpn_post_nms_topk_train, "test": m.rpn_post_nms_topk_test},
                  nms_thresh=m.rpn_nms_thresh, box_loss_beta=m.rpn_box_loss_beta)
        pool = dict(sampling_ratio=m.pooler_sampling_ratio, aligned=m.roi_align_aligned)
        num_things = categories.num_things
        roi_heads = RoIHeads(
            box_pooler=MultiLevelRoIAlign(output_size=7, **pool),
            box_head=BoxHead(m.fpn_channels * 7 * 7, m.box_head_fc_dim),
            box_predictor=BoxPredictor(m.box_head_fc_dim, num_things),
            mask_pooler=MultiLevelRoIAlign(output_size=14, **pool),
            mask_head=MaskHead(m.fpn_channels, num_things, m.mask_head_dim, m.mask_head_convs),
            num_classes=num_things, matcher=Matcher((m.roi_iou_threshold,), (0, 1)),
            batch_size_per_image=m.roi_batch_size_per_image, positive_fraction=m.roi_positive_fraction,
            box_coder=BoxCoder(tuple(m.box_reg_weights)), box_loss_beta=m.box_loss_beta,
            score_thresh=m.roi_score_thresh_test, nms_thresh=m.roi_nms_thresh_test,
            detections_per_image=m.detections_per_image)
        sem = SemSegFPNHead(in_channels=m.fpn_channels, num_classes=categories.num_sem_classes,
                            conv_dims=m.sem_seg_conv_dims, norm=m.sem_seg_norm, loss_weight=m.sem_seg_loss_weight)
        return cls(backbone=backbone, rpn=rpn, roi_heads=roi_heads, sem_seg_head=sem,
                   thing_ids=categories.thing_ids, stuff_ids=categories.stuff_ids,
                   pixel_mean=m.pixel_mean, pixel_std=m.pixel_std, input_format=m.input_format,
                   size_divisibility=m.size_divisibility, instance_loss_weight=m.instance_loss_weight,
                   combine_overlap_thresh=m.combine_overlap_thresh,
                   combine_stuff_area_thresh=m.combine_stuff_area_thresh,
                   combine_instances_score_thresh=m.combine_instances_score_thresh)

    def use_channels_last(self) -> bool:
        """Convert to channels_last memory when the backbone says it helps (a GPU choice);
        returns whether it did."""
        if self.backbone.channels_last_helps:
            self.to(memory_format=torch.channels_last)
            self.channels_last = True
        return self.channels_last

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, batch: list[dict]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """uint8 RGB (3, h, w) images -> the normalized batch, zero-padded to a multiple of
        ``size_divisibility``, and each image's (h, w)."""
        sizes = [tuple(s["image"].shape[-2:]) for s in batch]
        d = self.size_divisibility
        H = -(-max(h for h, _ in sizes) // d) * d
        W = -(-max(w for _, w in sizes) // d) * d
        tensor = torch.zeros((len(batch), 3, H, W), device=self.device)
        for i, s in enumerate(batch):
            img = s["image"].to(self.device, non_blocking=True).float()
            if self.input_format == "BGR":
                img = img.flip(0)
            tensor[i, :, : img.shape[1], : img.shape[2]] = (img - self.pixel_mean) / self.pixel_std
        return tensor, sizes

    def forward(self, batch: list[dict]):
        """Training: a dict of losses (detectron2's names). Eval: per image {"instances",
        "sem_seg", "panoptic_seg"} at the sample's ``height`` x ``width`` (default: input size)."""
        images, sizes = self.preprocess(batch)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.backbone(images)
        levels = [features[k] for k in ("0", "1", "2", "3")]
        rpn_levels = levels + [features["pool"]]
        if self.training:
            # non-blocking: the loader pins its batches on a GPU, so the copies overlap the forward
            targets = [{k: s[k].to(self.device, non_blocking=True) for k in ("boxes", "labels", "masks")}
                       for s in batch]
            sem_t = torch.full(images.shape[:1] + images.shape[2:], IGNORE_LABEL, dtype=torch.long,
                               device=self.device)
            for i, s in enumerate(batch):
                h, w = s["sem_seg"].shape
                sem_t[i, :h, :w] = s["sem_seg"].to(self.device, non_blocking=True)
            _, losses = self.sem_seg_head(levels, sem_t)
            proposals, rpn_losses = self.rpn(rpn_levels, sizes, [t["boxes"] for t in targets])
            _, roi_losses = self.roi_heads(features, [p["boxes"] for p in proposals], sizes, targets)
            losses.update(rpn_losses)
            # detectron2 weighs the box and mask losses, not the RPN's
            losses.update({k: v * self.instance_loss_weight for k, v in roi_losses.items()})
            return losses
        sem_logits, _ = self.sem_seg_head(levels)
        proposals, _ = self.rpn(rpn_levels, sizes)
        detections, _ = self.roi_heads(features, [p["boxes"] for p in proposals], sizes)
        return [self.postprocess(det, sem_logits[i], sizes[i], s) for i, (det, s) in enumerate(zip(detections, batch))]

    def postprocess(self, det: dict, sem_logits: torch.Tensor, image_size, sample: dict) -> dict:
        out_size = (int(sample.get("height", image_size[0])), int(sample.get("width", image_size[1])))
        boxes, keep = detector_postprocess(det["boxes"], image_size, out_size)
        boxes, scores, classes = boxes[keep], det["scores"][keep], det["classes"][keep]
        masks = paste_masks(det["mask_probs"][keep], boxes, out_size)
        sem = sem_seg_postprocess(sem_logits, image_size, out_size)
        panoptic, segments = combine_semantic_and_instance_outputs(
            instance_masks=masks, instance_scores=scores, instance_classes=classes,
            semantic=sem.argmax(0), **self.combine)
        for s in segments:
            s["category_id"] = self.thing_ids[s["category"]] if s["isthing"] else self.stuff_ids[s["category"] - 1]
        return {"instances": {"boxes": boxes, "scores": scores, "classes": classes, "masks": masks},
                "sem_seg": sem, "panoptic_seg": (panoptic, segments)}


def param_count(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["PanopticFPN", "param_count"]
