"""Panoptic FPN (Kirillov et al. 2019): Mask R-CNN + a semantic FPN head, fused into panoptic.

The instance branch is torchvision's detection machinery (anchor generator, RPN, RoI heads,
box and mask heads) under the module names of torchvision's ``MaskRCNN`` (``backbone``,
``rpn``, ``roi_heads``), so torchvision checkpoints load by name; detectron2 checkpoints load
through ``weights.convert_detectron2``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.rpn import RPNHead

from components.common.coco_panoptic import IGNORE_LABEL, CategoryMaps
from components.model.backbone import build_backbone
from components.model.config import Config
from components.model.heads import RPN, RoIHeads
from components.model.poolers import MultiLevelRoIAlign
from components.model.postprocessing import combine_semantic_and_instance_outputs, sem_seg_postprocess
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
        instance_loss_weight: weight of the RPN + RoI losses (the semantic head weighs its own).
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
        self.combine = dict(overlap_threshold=combine_overlap_thresh, stuff_area_thresh=combine_stuff_area_thresh,
                            instances_score_thresh=combine_instances_score_thresh)

    @classmethod
    def from_config(cls, cfg: Config, categories: CategoryMaps) -> "PanopticFPN":
        m = cfg.model
        backbone = build_backbone(name=m.backbone, norm=m.backbone_norm, freeze_at=m.freeze_at, stride_in_1x1=m.stride_in_1x1,
                                  out_channels=m.fpn_channels)
        anchors = AnchorGenerator(tuple((s,) for s in m.anchor_sizes), (tuple(m.anchor_ratios),) * len(m.anchor_sizes))
        rpn = RPN(anchors, RPNHead(m.fpn_channels, len(m.anchor_ratios)),
                  fg_iou_thresh=m.rpn_iou_thresholds[1], bg_iou_thresh=m.rpn_iou_thresholds[0],
                  batch_size_per_image=m.rpn_batch_size_per_image, positive_fraction=m.rpn_positive_fraction,
                  pre_nms_top_n={"training": m.rpn_pre_nms_topk_train, "testing": m.rpn_pre_nms_topk_test},
                  post_nms_top_n={"training": m.rpn_post_nms_topk_train, "testing": m.rpn_post_nms_topk_test},
                  nms_thresh=m.rpn_nms_thresh, box_loss_beta=m.rpn_box_loss_beta)
        num_classes = categories.num_things + 1  # + background, torchvision's convention
        pool = dict(sampling_ratio=m.pooler_sampling_ratio, aligned=m.roi_align_aligned)
        roi_heads = RoIHeads(
            MultiLevelRoIAlign(output_size=7, **pool),
            TwoMLPHead(m.fpn_channels * 7 * 7, m.box_head_fc_dim),
            FastRCNNPredictor(m.box_head_fc_dim, num_classes),
            fg_iou_thresh=m.roi_iou_threshold, bg_iou_thresh=m.roi_iou_threshold,
            batch_size_per_image=m.roi_batch_size_per_image, positive_fraction=m.roi_positive_fraction,
            bbox_reg_weights=tuple(m.box_reg_weights), score_thresh=m.roi_score_thresh_test,
            nms_thresh=m.roi_nms_thresh_test, detections_per_img=m.detections_per_image,
            mask_roi_pool=MultiLevelRoIAlign(output_size=14, **pool),
            mask_head=MaskRCNNHeads(m.fpn_channels, (m.mask_head_dim,) * m.mask_head_convs, 1),
            mask_predictor=MaskRCNNPredictor(m.mask_head_dim, m.mask_head_dim, num_classes),
            box_loss_beta=m.box_loss_beta)
        sem = SemSegFPNHead(in_channels=m.fpn_channels, num_classes=categories.num_sem_classes,
                            conv_dims=m.sem_seg_conv_dims, norm=m.sem_seg_norm, loss_weight=m.sem_seg_loss_weight)
        return cls(backbone=backbone, rpn=rpn, roi_heads=roi_heads, sem_seg_head=sem,
                   thing_ids=categories.thing_ids, stuff_ids=categories.stuff_ids,
                   pixel_mean=m.pixel_mean, pixel_std=m.pixel_std, input_format=m.input_format,
                   size_divisibility=m.size_divisibility, instance_loss_weight=m.instance_loss_weight,
                   combine_overlap_thresh=m.combine_overlap_thresh,
                   combine_stuff_area_thresh=m.combine_stuff_area_thresh,
                   combine_instances_score_thresh=m.combine_instances_score_thresh)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, batch: list[dict]) -> ImageList:
        """uint8 RGB (3, h, w) images -> normalized, padded batch."""
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
        return ImageList(tensor, sizes)

    def forward(self, batch: list[dict]):
        """Training: a dict of losses. Eval: per image {"instances", "sem_seg", "panoptic_seg"}."""
        images = self.preprocess(batch)
        if self.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last):
            images.tensors = images.tensors.contiguous(memory_format=torch.channels_last)
        features = self.backbone(images.tensors)
        levels = [features[k] for k in ("0", "1", "2", "3")]
        if self.training:
            targets = [{"boxes": s["boxes"].to(self.device), "labels": s["labels"].to(self.device) + 1,
                        "masks": s["masks"].to(self.device)} for s in batch]
            sem_t = torch.full(images.tensors.shape[:1] + images.tensors.shape[2:], IGNORE_LABEL, dtype=torch.long,
                               device=self.device)
            for i, s in enumerate(batch):
                h, w = s["sem_seg"].shape
                sem_t[i, :h, :w] = s["sem_seg"].to(self.device)
            _, sem_losses = self.sem_seg_head(levels, sem_t)
            proposals, rpn_losses = self.rpn(images, features, targets)
            _, roi_losses = self.roi_heads(features, proposals, images.image_sizes, targets)
            losses = {k: v * self.instance_loss_weight for k, v in {**rpn_losses, **roi_losses}.items()}
            losses.update(sem_losses)
            return losses
        sem_logits, _ = self.sem_seg_head(levels)
        proposals, _ = self.rpn(images, features)
        detections, _ = self.roi_heads(features, proposals, images.image_sizes)
        return [self.postprocess(det, sem_logits[i], images.image_sizes[i], s) for i, (det, s)
                in enumerate(zip(detections, batch))]

    def postprocess(self, det: dict, sem_logits: torch.Tensor, image_size, sample: dict) -> dict:
        out_h, out_w = int(sample.get("height", image_size[0])), int(sample.get("width", image_size[1]))
        sy, sx = out_h / image_size[0], out_w / image_size[1]
        boxes = det["boxes"] * torch.tensor([sx, sy, sx, sy], device=det["boxes"].device)
        masks = paste_masks_in_image(det["masks"], boxes, (out_h, out_w), padding=1)[:, 0] if len(boxes) else \
            torch.zeros((0, out_h, out_w), device=boxes.device)
        classes = det["labels"] - 1
        sem = sem_seg_postprocess(sem_logits, image_size, (out_h, out_w))
        panoptic, segments = combine_semantic_and_instance_outputs(
            instance_masks=masks >= 0.5, instance_scores=det["scores"], instance_classes=classes,
            semantic=sem.argmax(0), **self.combine)
        for s in segments:
            s["category_id"] = self.thing_ids[s["category"]] if s["isthing"] else self.stuff_ids[s["category"] - 1]
        return {"instances": {"boxes": boxes, "scores": det["scores"], "classes": classes, "masks": masks},
                "sem_seg": sem, "panoptic_seg": (panoptic, segments)}


def param_count(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["PanopticFPN", "param_count", "F"]
