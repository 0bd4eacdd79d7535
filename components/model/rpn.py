"""The region proposal network, behaving as detectron2's ``RPN`` (StandardRPNHead).

Proposals: per level, the ``pre_nms_topk`` anchors with the highest objectness *logits*
(not probabilities: sigmoid saturates to 1.0 in float32 and would tie confident anchors),
decoded, clipped, empty boxes dropped, NMS per level, the best ``post_nms_topk`` per image.
Training: anchors matched to the ground truth (IoU 0.3 / 0.7, plus each box's best anchors),
256 sampled per image (half positive at most), objectness BCE and box L1 summed and divided
by 256 x images.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import batched_nms, box_iou

from components.model.anchors import AnchorGenerator
from components.model.box_ops import BoxCoder, Matcher, clip_boxes, nonempty, smooth_l1, subsample_labels


class RPNHead(nn.Module):
    """A shared 3x3 conv + ReLU, then per anchor an objectness logit and 4 box deltas.

    Parameter names are detectron2's ``StandardRPNHead``'s (``conv``, ``objectness_logits``,
    ``anchor_deltas``); initialised as detectron2 does (normal, std 0.01; zero bias).
    """

    def __init__(self, channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.objectness_logits = nn.Conv2d(channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(channels, num_anchors * 4, 1)
        for layer in (self.conv, self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level: logits (N, Hi*Wi*A) and deltas (N, Hi*Wi*A, 4), position-major, anchor-minor."""
        logits, deltas = [], []
        for x in features:
            t = F.relu(self.conv(x))
            n, _, h, w = t.shape
            logits.append(self.objectness_logits(t).permute(0, 2, 3, 1).reshape(n, -1))
            deltas.append(self.anchor_deltas(t).view(n, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
        return logits, deltas


class RPN(nn.Module):
    """Region proposal network.

    Args:
        head: an ``RPNHead``.
        anchor_generator: an ``AnchorGenerator`` over the same levels.
        matcher: anchor-to-ground-truth matcher (default: IoU 0.3 / 0.7, low-quality matches on).
        box_coder: delta encoding (default weights 1, 1, 1, 1).
        batch_size_per_image / positive_fraction: anchors sampled per image for the losses.
        pre_nms_topk / post_nms_topk: {"train": k, "test": k}; pre is per level, post per image.
        nms_thresh: IoU threshold of the per-level NMS.
        min_box_size: proposals with a side <= this are dropped (detectron2: 0, empty boxes only).
        box_loss_beta: smooth-L1 beta of the box loss (0 = L1).
    """

    def __init__(self, *, head: RPNHead, anchor_generator: AnchorGenerator, matcher: Matcher | None = None,
                 box_coder: BoxCoder | None = None, batch_size_per_image: int = 256, positive_fraction: float = 0.5,
                 pre_nms_topk: dict | None = None, post_nms_topk: dict | None = None, nms_thresh: float = 0.7,
                 min_box_size: float = 0.0, box_loss_beta: float = 0.0):
        super().__init__()
        self.head, self.anchor_generator = head, anchor_generator
        self.matcher = matcher or Matcher((0.3, 0.7), (0, -1, 1), allow_low_quality_matches=True)
        self.box_coder = box_coder or BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.pre_nms_topk = pre_nms_topk or {"train": 2000, "test": 1000}
        self.post_nms_topk = post_nms_topk or {"train": 1000, "test": 1000}
        self.nms_thresh, self.min_box_size, self.box_loss_beta = nms_thresh, min_box_size, box_loss_beta

    def forward(self, features: list[torch.Tensor], image_sizes: list[tuple[int, int]],
                gt_boxes: list[torch.Tensor] | None = None):
        """features: the levels (P2-P6); image_sizes: each image's (h, w) before padding;
        gt_boxes: per image (G, 4), training only.

        Returns (proposals: per image ``{"boxes": (K, 4), "logits": (K,)}`` best first, losses).
        """
        anchors = self.anchor_generator(features)
        logits, deltas = self.head(features)
        losses = {}
        if self.training:
            losses = self.losses(anchors, logits, deltas, gt_boxes)
        with torch.no_grad():
            proposals = self.proposals(anchors, [x.detach() for x in logits], [d.detach() for d in deltas], image_sizes)
        return proposals, losses

    def proposals(self, anchors, logits, deltas, image_sizes) -> list[dict]:
        mode = "train" if self.training else "test"
        n = logits[0].shape[0]
        top_boxes, top_logits, levels = [], [], []
        for lvl, (a, lg, d) in enumerate(zip(anchors, logits, deltas)):
            k = min(lg.shape[1], self.pre_nms_topk[mode])
            lg, idx = lg.topk(k, dim=1)                                   # (N, k)
            d = torch.gather(d, 1, idx[..., None].expand(-1, -1, 4))      # (N, k, 4)
            boxes = self.box_coder.decode(d.reshape(-1, 4), a[idx.reshape(-1)])
            top_boxes.append(boxes.view(n, k, 4))
            top_logits.append(lg)
            levels.append(torch.full((k,), lvl, dtype=torch.int64, device=lg.device))
        top_boxes, top_logits, levels = torch.cat(top_boxes, 1), torch.cat(top_logits, 1), torch.cat(levels)
        out = []
        for i, size in enumerate(image_sizes):
            boxes, scores, lvl = top_boxes[i], top_logits[i], levels
            valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
            if not bool(valid.all()):
                if self.training:
                    raise FloatingPointError("RPN proposals contain Inf/NaN: training has diverged")
                boxes, scores, lvl = boxes[valid], scores[valid], lvl[valid]
            boxes = clip_boxes(boxes, size)
            keep = nonempty(boxes, self.min_box_size)
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = batched_nms(boxes, scores, lvl, self.nms_thresh)[: self.post_nms_topk[mode]]
            out.append({"boxes": boxes[keep], "logits": scores[keep]})
        return out

    def label_anchors(self, anchors: torch.Tensor, gt_boxes: list[torch.Tensor]):
        """Per image: the sampled positive and negative anchor indices and, for the positives,
        their matched ground-truth boxes."""
        out = []
        for gt in gt_boxes:
            if len(gt):
                matches, labels = self.matcher(box_iou(gt, anchors))
            else:
                matches, labels = self.matcher(anchors.new_zeros((0, len(anchors))))
            pos, neg = subsample_labels(labels, self.batch_size_per_image, self.positive_fraction, 0)
            out.append((pos, neg, gt[matches[pos]] if len(gt) else anchors.new_zeros((0, 4))))
        return out

    def losses(self, anchors, logits, deltas, gt_boxes) -> dict[str, torch.Tensor]:
        anchors = torch.cat(anchors)
        logits, deltas = torch.cat(logits, 1), torch.cat(deltas, 1)
        with torch.no_grad():
            sampled = self.label_anchors(anchors, gt_boxes)
        cls_loss = logits.new_zeros(())
        box_loss = logits.new_zeros(())
        for i, (pos, neg, matched) in enumerate(sampled):
            idx = torch.cat([pos, neg])
            target = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]).to(logits.dtype)
            cls_loss = cls_loss + F.binary_cross_entropy_with_logits(logits[i, idx], target, reduction="sum")
            if len(pos):
                box_loss = box_loss + smooth_l1(deltas[i, pos], self.box_coder.encode(anchors[pos], matched),
                                                self.box_loss_beta)
        normalizer = self.batch_size_per_image * len(gt_boxes)
        return {"loss_rpn_cls": cls_loss / normalizer, "loss_rpn_loc": box_loss / normalizer}
