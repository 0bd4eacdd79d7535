"""Box and mask heads on RoIs, behaving as detectron2's ``StandardROIHeads``.

Parameter names and layouts are detectron2's (``box_head.fc1/fc2``, ``box_predictor.cls_score``
with the background as the *last* class, class-specific ``bbox_pred`` without a background
row, ``mask_head.mask_fcn1..4/deconv/predictor``), so its checkpoints load without reshuffling.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import batched_nms, box_iou, roi_align

from components.model.box_ops import BoxCoder, Matcher, clip_boxes, smooth_l1, subsample_labels
from components.model.poolers import MultiLevelRoIAlign


def _c2_msra_fill(layer: nn.Module) -> None:
    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(layer.bias)


def _c2_xavier_fill(layer: nn.Module) -> None:
    nn.init.kaiming_uniform_(layer.weight, a=1)
    nn.init.zeros_(layer.bias)


class BoxHead(nn.Module):
    """Two fully connected layers with ReLU over the flattened (C, 7, 7) RoI features."""

    def __init__(self, in_features: int, fc_dim: int = 1024):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(in_features, fc_dim), nn.Linear(fc_dim, fc_dim)
        for fc in (self.fc1, self.fc2):
            _c2_xavier_fill(fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))


class BoxPredictor(nn.Module):
    """Class logits (K + 1, background last) and class-specific box deltas (4K)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class MaskHead(nn.Module):
    """``num_convs`` 3x3 convs + ReLU, a 2x2 stride-2 deconv + ReLU, a 1x1 conv to K mask logits."""

    def __init__(self, in_channels: int, num_classes: int, conv_dim: int = 256, num_convs: int = 4):
        super().__init__()
        self.num_convs = num_convs
        for k in range(num_convs):
            conv = nn.Conv2d(in_channels if k == 0 else conv_dim, conv_dim, 3, padding=1)
            _c2_msra_fill(conv)
            self.add_module(f"mask_fcn{k + 1}", conv)
        self.deconv = nn.ConvTranspose2d(conv_dim if num_convs else in_channels, conv_dim, 2, stride=2)
        _c2_msra_fill(self.deconv)
        self.predictor = nn.Conv2d(conv_dim, num_classes, 1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in range(self.num_convs):
            x = F.relu(getattr(self, f"mask_fcn{k + 1}")(x))
        return self.predictor(F.relu(self.deconv(x)))


class RoIHeads(nn.Module):
    """Box classification/regression and masks on proposals.

    Args:
        box_pooler / mask_pooler: ``MultiLevelRoIAlign`` (7x7 and 14x14 in Panoptic FPN).
        box_head, box_predictor, mask_head: the modules above.
        num_classes: K thing classes.
        matcher: proposal-to-ground-truth matcher (default: IoU >= 0.5 is foreground).
        batch_size_per_image / positive_fraction: RoIs sampled per image in training.
        box_coder: delta encoding (default weights 10, 10, 5, 5).
        box_loss_beta: smooth-L1 beta of the box loss (0 = L1).
        score_thresh / nms_thresh / detections_per_image: inference filtering (0.05, 0.5, 100).
        proposal_append_gt: add the ground-truth boxes to the proposals in training.
    """

    def __init__(self, *, box_pooler: MultiLevelRoIAlign, box_head: BoxHead, box_predictor: BoxPredictor,
                 mask_pooler: MultiLevelRoIAlign, mask_head: MaskHead, num_classes: int, matcher: Matcher | None = None,
                 batch_size_per_image: int = 512, positive_fraction: float = 0.25, box_coder: BoxCoder | None = None,
                 box_loss_beta: float = 0.0, score_thresh: float = 0.05, nms_thresh: float = 0.5,
                 detections_per_image: int = 100, proposal_append_gt: bool = True):
        super().__init__()
        self.box_pooler, self.box_head, self.box_predictor = box_pooler, box_head, box_predictor
        self.mask_pooler, self.mask_head = mask_pooler, mask_head
        self.num_classes = num_classes
        self.matcher = matcher or Matcher((0.5,), (0, 1))
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.box_coder = box_coder or BoxCoder((10.0, 10.0, 5.0, 5.0))
        self.box_loss_beta = box_loss_beta
        self.score_thresh, self.nms_thresh, self.detections_per_image = score_thresh, nms_thresh, detections_per_image
        self.proposal_append_gt = proposal_append_gt

    def forward(self, features: dict, proposals: list[torch.Tensor], image_sizes: list[tuple[int, int]],
                targets: list[dict] | None = None):
        """features: {"0": P2, ..., "3": P5}; proposals: per image (K, 4) boxes; targets (training):
        per image {"boxes" (G, 4), "labels" (G,) in 0..K-1, "masks" (G, H, W) uint8}.

        Returns (detections, losses). Detections, per image: ``boxes`` (D, 4), ``scores`` (D,),
        ``classes`` (D,), ``mask_probs`` (D, M, M) (the predicted class's mask, sigmoid).
        """
        if self.training:
            return [], self.losses(features, proposals, targets)
        return self.inference(features, proposals, image_sizes), {}

    # -- training ---------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, proposals: list[torch.Tensor], targets: list[dict]) -> list[dict]:
        """Per image: the sampled RoIs (foreground first), their classes (K = background), matched
        ground-truth boxes and indices."""
        out = []
        for props, t in zip(proposals, targets):
            gt = t["boxes"]
            if self.proposal_append_gt:
                props = torch.cat([props, gt.to(props.dtype)])
            if len(gt):
                matches, labels = self.matcher(box_iou(gt, props))
                classes = t["labels"][matches].clone()
                classes[labels == 0] = self.num_classes
                classes[labels == -1] = -1
            else:
                matches = torch.zeros(len(props), dtype=torch.int64, device=props.device)
                classes = torch.full((len(props),), self.num_classes, dtype=torch.int64, device=props.device)
            fg, bg = subsample_labels(classes, self.batch_size_per_image, self.positive_fraction, self.num_classes)
            idx = torch.cat([fg, bg])
            out.append({"boxes": props[idx], "classes": classes[idx], "gt_index": matches[idx],
                        "gt_boxes": gt[matches[idx]] if len(gt) else props[idx], "num_fg": len(fg)})
        return out

    def losses(self, features: dict, proposals: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
        rois = self.sample(proposals, targets)
        scores, deltas = self.box_predictor(self.box_head(self.box_pooler(features, [r["boxes"] for r in rois])))
        classes = torch.cat([r["classes"] for r in rois])
        boxes, gt_boxes = torch.cat([r["boxes"] for r in rois]), torch.cat([r["gt_boxes"] for r in rois])
        loss_cls = F.cross_entropy(scores.float(), classes, reduction="mean") if len(classes) else scores.sum() * 0
        fg = torch.nonzero((classes >= 0) & (classes < self.num_classes), as_tuple=True)[0]
        fg_deltas = deltas.view(-1, self.num_classes, 4)[fg, classes[fg]]
        loss_box = smooth_l1(fg_deltas.float(), self.box_coder.encode(boxes[fg], gt_boxes[fg]), self.box_loss_beta)
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box / max(classes.numel(), 1),
                "loss_mask": self.mask_loss(features, rois, targets)}

    def mask_loss(self, features: dict, rois: list[dict], targets: list[dict]) -> torch.Tensor:
        """Mean BCE of the ground-truth class's mask logits against the ground-truth mask cut out
        by each foreground RoI (RoIAlign, aligned, adaptive sampling, then >= 0.5)."""
        fg = [r["num_fg"] for r in rois]
        boxes = [r["boxes"][:n] for r, n in zip(rois, fg)]
        logits = self.mask_head(self.mask_pooler(features, boxes))
        if not sum(fg):
            return logits.sum() * 0
        side = logits.shape[-1]
        gt_masks = []
        for r, n, t in zip(rois, fg, targets):
            if n:
                rois_i = torch.cat([r["gt_index"][:n, None].to(r["boxes"].dtype), r["boxes"][:n]], 1)
                crop = roi_align(t["masks"][:, None].float(), rois_i, (side, side), 1.0, 0, aligned=True)
                gt_masks.append(crop[:, 0] >= 0.5)
        classes = torch.cat([r["classes"][:n] for r, n in zip(rois, fg)])
        logits = logits[torch.arange(len(classes), device=logits.device), classes]
        return F.binary_cross_entropy_with_logits(logits.float(), torch.cat(gt_masks).float(), reduction="mean")

    # -- inference --------------------------------------------------------------------------

    def inference(self, features: dict, proposals: list[torch.Tensor], image_sizes) -> list[dict]:
        scores, deltas = self.box_predictor(self.box_head(self.box_pooler(features, proposals)))
        probs = F.softmax(scores.float(), dim=-1)
        boxes = self.box_coder.decode(deltas, torch.cat(proposals))
        counts = [len(p) for p in proposals]
        results = [self.detect(b, s, size) for b, s, size in zip(boxes.split(counts), probs.split(counts), image_sizes)]
        logits = self.mask_head(self.mask_pooler(features, [r["boxes"] for r in results]))
        classes = torch.cat([r["classes"] for r in results])
        probs = logits[torch.arange(len(classes), device=logits.device), classes].float().sigmoid()
        for r, p in zip(results, probs.split([len(r["boxes"]) for r in results])):
            r["mask_probs"] = p
        return results

    def detect(self, boxes: torch.Tensor, probs: torch.Tensor, size) -> dict:
        """One image: (R, 4K) decoded boxes, (R, K + 1) probabilities -> the kept detections."""
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(probs).all(dim=1)
        if not bool(valid.all()):
            boxes, probs = boxes[valid], probs[valid]
        probs = probs[:, :-1]
        boxes = clip_boxes(boxes.view(-1, self.num_classes, 4), size)
        keep = probs > self.score_thresh
        proposal_index, classes = torch.nonzero(keep, as_tuple=True)
        boxes, scores = boxes[keep], probs[keep]
        kept = batched_nms(boxes, scores, classes, self.nms_thresh)[: self.detections_per_image]
        return {"boxes": boxes[kept], "scores": scores[kept], "classes": classes[kept],
                "proposal_index": proposal_index[kept]}
