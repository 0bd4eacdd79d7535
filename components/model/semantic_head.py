"""The Panoptic FPN semantic head (detectron2's SemSegFPNHead)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from components.common.coco_panoptic import IGNORE_LABEL


class ConvNorm(nn.Conv2d):
    """3x3 conv (no bias when normed) + GroupNorm(32) + ReLU. A Conv2d holding its norm, so the
    parameters are ``weight`` and ``norm.weight``/``norm.bias``, as in detectron2."""

    def __init__(self, cin: int, cout: int, norm: str):
        super().__init__(cin, cout, 3, padding=1, bias=not norm)
        self.norm = nn.GroupNorm(32 if cout % 32 == 0 else 8, cout) if norm == "GN" else nn.Identity()
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x):
        return F.relu(self.norm(super().forward(x)))


class SemSegFPNHead(nn.Module):
    """Per FPN level P2-P5: conv3x3(conv_dims) + GN + ReLU, each followed by a 2x bilinear
    upsampling until stride 4 (so P5 gets 3 blocks); the levels are summed, a 1x1 conv predicts
    ``num_classes`` (stuff + 1 'things') at 1/4 scale, upsampled 4x to the input.

    Args:
        in_channels: FPN channels.
        strides: the strides of the input levels, e.g. (4, 8, 16, 32).
        num_classes: semantic classes (number of stuff categories + 1).
        conv_dims: channels of the head's convs (128 in detectron2).
        norm: "GN" or "" (none).
        loss_weight: weight of the cross-entropy loss (0.5 in Panoptic FPN).
    """

    def __init__(self, *, in_channels: int, strides=(4, 8, 16, 32), num_classes: int, conv_dims: int = 128,
                 norm: str = "GN", loss_weight: float = 0.5, common_stride: int = 4,
                 ignore_value: int = IGNORE_LABEL):
        super().__init__()
        self.common_stride, self.loss_weight, self.ignore_value = common_stride, loss_weight, ignore_value
        self.level_names = []
        for stride in strides:
            n = max(1, int(math.log2(stride) - math.log2(common_stride)))
            blocks: list[nn.Module] = []
            for k in range(n):
                blocks.append(ConvNorm(in_channels if k == 0 else conv_dims, conv_dims, norm))
                if stride != common_stride:
                    blocks.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            # one Sequential per level, upsampling modules in between: conv k is at index 2k,
            # the layout (and so the parameter names) of detectron2's head
            name = f"p{int(math.log2(stride))}"
            self.add_module(name, nn.Sequential(*blocks))
            self.level_names.append(name)
        self.predictor = nn.Conv2d(conv_dims, num_classes, 1)
        nn.init.kaiming_normal_(self.predictor.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.predictor.bias)

    def layers(self, features: list[torch.Tensor]) -> torch.Tensor:
        out = None
        for name, x in zip(self.level_names, features):
            x = getattr(self, name)(x)
            out = x if out is None else out + x
        return self.predictor(out)

    def forward(self, features: list[torch.Tensor], targets: torch.Tensor | None = None):
        """features: [P2..P5]; targets: (B, H, W) long at input size, padded with ``ignore_value``.
        Returns (logits (B, C, H, W) at input size, {"loss_sem_seg": ...} or {})."""
        logits = F.interpolate(self.layers(features), scale_factor=self.common_stride, mode="bilinear",
                               align_corners=False)
        if targets is None:
            return logits, {}
        loss = F.cross_entropy(logits.float(), targets, reduction="mean", ignore_index=self.ignore_value)
        return logits, {"loss_sem_seg": loss * self.loss_weight}
