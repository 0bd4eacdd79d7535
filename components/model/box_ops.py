"""Box arithmetic shared by the RPN and the RoI heads, with detectron2's semantics.

Boxes are (N, 4) XYXY tensors in input-image pixels; a box's width is ``x1 - x0`` (no +1).
"""

from __future__ import annotations

import math

import torch

# Largest log-scale change a regression may ask for: exp(dw) <= 1000 / 16.
SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """Encodes a target box relative to a source box as (dx, dy, dw, dh), and back.

    ``dx = wx * (cx_target - cx_source) / w_source``, ``dw = ww * log(w_target / w_source)``
    (the R-CNN parameterisation; detectron2's ``Box2BoxTransform``). The RPN uses weights
    (1, 1, 1, 1), the box head (10, 10, 5, 5).
    """

    def __init__(self, weights: tuple[float, float, float, float], scale_clamp: float = SCALE_CLAMP):
        self.weights, self.scale_clamp = tuple(float(w) for w in weights), scale_clamp

    def encode(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(N, 4) source and target boxes -> (N, 4) deltas."""
        sw, sh = source[:, 2] - source[:, 0], source[:, 3] - source[:, 1]
        scx, scy = source[:, 0] + 0.5 * sw, source[:, 1] + 0.5 * sh
        tw, th = target[:, 2] - target[:, 0], target[:, 3] - target[:, 1]
        tcx, tcy = target[:, 0] + 0.5 * tw, target[:, 1] + 0.5 * th
        wx, wy, ww, wh = self.weights
        return torch.stack((wx * (tcx - scx) / sw, wy * (tcy - scy) / sh,
                            ww * torch.log(tw / sw), wh * torch.log(th / sh)), dim=1)

    def decode(self, deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """(N, 4k) deltas (k boxes per row, e.g. one per class) applied to (N, 4) boxes -> (N, 4k)."""
        deltas = deltas.float()
        boxes = boxes.to(deltas.dtype)
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
        wx, wy, ww, wh = self.weights
        dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.scale_clamp)
        pcx, pcy = dx * w[:, None] + cx[:, None], dy * h[:, None] + cy[:, None]
        pw, ph = torch.exp(dw) * w[:, None], torch.exp(dh) * h[:, None]
        out = torch.stack((pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph), dim=-1)
        return out.reshape(deltas.shape)


def clip_boxes(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Clamp XYXY boxes into an image of ``size`` = (height, width): x into [0, w], y into [0, h]."""
    h, w = size
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack((x0.clamp(0, w), y0.clamp(0, h), x1.clamp(0, w), y1.clamp(0, h)), dim=-1)


def nonempty(boxes: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Boxes whose width and height both exceed ``threshold``."""
    return (boxes[:, 2] - boxes[:, 0] > threshold) & (boxes[:, 3] - boxes[:, 1] > threshold)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


class Matcher:
    """Assigns each prediction (anchor or proposal) the ground truth it overlaps most.

    Args:
        thresholds: increasing IoU cut points, e.g. (0.3, 0.7) for the RPN or (0.5,) for the
            RoI heads.
        labels: one label per interval ``[-inf, t0), [t0, t1), ..., [tn, inf)``: 1 foreground,
            0 background, -1 ignored. RPN: (0, -1, 1); RoI heads: (0, 1).
        allow_low_quality_matches: also make foreground every prediction that is the best
            match of some ground truth (ties included), whatever its IoU (the RPN's rule).
    """

    def __init__(self, thresholds, labels, allow_low_quality_matches: bool = False):
        if len(labels) != len(thresholds) + 1 or list(thresholds) != sorted(thresholds):
            raise ValueError(f"Matcher needs increasing thresholds and one label more: {thresholds}, {labels}")
        self.thresholds = [-float("inf"), *thresholds, float("inf")]
        self.labels, self.allow_low_quality_matches = list(labels), allow_low_quality_matches

    def __call__(self, iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, P) IoU matrix -> (matched gt index (P,) int64, label (P,) int8)."""
        if iou.numel() == 0:  # no ground truth (or no predictions): everything is the lowest label
            return (iou.new_zeros((iou.shape[1],), dtype=torch.int64),
                    iou.new_full((iou.shape[1],), self.labels[0], dtype=torch.int8))
        best, matches = iou.max(dim=0)
        labels = matches.new_ones(matches.shape, dtype=torch.int8)
        for label, low, high in zip(self.labels, self.thresholds[:-1], self.thresholds[1:]):
            labels[(best >= low) & (best < high)] = label
        if self.allow_low_quality_matches:
            best_per_gt = iou.max(dim=1).values
            labels[torch.nonzero(iou == best_per_gt[:, None], as_tuple=True)[1]] = 1
        return matches, labels


def subsample_labels(labels: torch.Tensor, num_samples: int, positive_fraction: float,
                     bg_label: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw at most ``num_samples`` indices, at most ``positive_fraction`` of them positive.

    ``labels``: -1 ignored, ``bg_label`` negative, anything else positive. Positives and
    negatives are drawn with one ``torch.randperm`` each, positives first, on the labels'
    device: the same draws as detectron2's ``subsample_labels`` under the same seed.
    Returns (positive indices, negative indices).
    """
    positive = torch.nonzero((labels != -1) & (labels != bg_label), as_tuple=True)[0]
    negative = torch.nonzero(labels == bg_label, as_tuple=True)[0]
    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    num_neg = min(negative.numel(), num_samples - num_pos)
    pos = positive[torch.randperm(positive.numel(), device=positive.device)[:num_pos]]
    neg = negative[torch.randperm(negative.numel(), device=negative.device)[:num_neg]]
    return pos, neg


def smooth_l1(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Summed smooth-L1 loss; beta < 1e-5 is plain L1 (detectron2's default for both heads)."""
    if beta < 1e-5:
        return (pred - target).abs().sum()
    diff = (pred - target).abs()
    return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta).sum()
