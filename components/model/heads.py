"""torchvision's RPN and RoI heads with detectron2's box-regression loss (smooth-L1 beta)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.models.detection.roi_heads as tv_roi_heads
from torchvision.models.detection.rpn import RegionProposalNetwork


def smooth_l1(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Sum of smooth-L1; beta 0 is plain L1 (detectron2's default)."""
    if beta < 1e-5:
        return (pred - target).abs().sum()
    return F.smooth_l1_loss(pred, target, beta=beta, reduction="sum")


class RPN(RegionProposalNetwork):
    """torchvision's RPN; the box loss takes ``box_loss_beta`` (torchvision hard-codes 1/9)."""

    def __init__(self, *args, box_loss_beta: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.box_loss_beta = box_loss_beta

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        pos, neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos, dim=0))[0]
        neg = torch.where(torch.cat(neg, dim=0))[0]
        sampled = torch.cat([pos, neg], dim=0)
        labels = torch.cat(labels, dim=0)
        regression_targets = torch.cat(regression_targets, dim=0)
        box_loss = smooth_l1(pred_bbox_deltas[pos], regression_targets[pos], self.box_loss_beta) / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        return objectness_loss, box_loss


def _fastrcnn_loss(class_logits, box_regression, labels, regression_targets, beta: float):
    labels = torch.cat(labels, dim=0)
    regression_targets = torch.cat(regression_targets, dim=0)
    classification_loss = F.cross_entropy(class_logits, labels)
    pos = torch.where(labels > 0)[0]
    box_regression = box_regression.reshape(class_logits.shape[0], box_regression.size(-1) // 4, 4)
    box_loss = smooth_l1(box_regression[pos, labels[pos]], regression_targets[pos], beta) / labels.numel()
    return classification_loss, box_loss


class RoIHeads(tv_roi_heads.RoIHeads):
    """torchvision's RoIHeads with a configurable box-loss beta (detectron2: 0; torchvision: 1/9).

    torchvision calls its module-level ``fastrcnn_loss`` from ``forward``; while this head
    runs, that name points at a version taking ``box_loss_beta``. Training runs one forward
    at a time per process, so the swap is not observed elsewhere.
    """

    def __init__(self, *args, box_loss_beta: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.box_loss_beta = box_loss_beta

    def forward(self, features, proposals, image_shapes, targets=None):
        original = tv_roi_heads.fastrcnn_loss
        beta = self.box_loss_beta
        tv_roi_heads.fastrcnn_loss = lambda *a: _fastrcnn_loss(*a, beta=beta)
        try:
            return super().forward(features, proposals, image_shapes, targets)
        finally:
            tv_roi_heads.fastrcnn_loss = original
