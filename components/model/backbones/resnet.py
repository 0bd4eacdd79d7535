"""ResNet-18/34/50/101 + FPN: torchvision's ResNet with detectron2's options (MSRA stride in the
1x1 conv, FrozenBN/GN/BN, FREEZE_AT); detectron2 model-zoo checkpoints load into it."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.ops
from torchvision.models._utils import IntermediateLayerGetter

from components.model.backbones import Backbone, freeze, register_backbone


def _move_stride_to_1x1(resnet: nn.Module) -> None:
    """detectron2's MSRA ResNet strides in the first 1x1 conv of a block; torchvision in the 3x3."""
    for layer in (resnet.layer2, resnet.layer3, resnet.layer4):
        block = layer[0]
        if hasattr(block, "conv3"):  # bottleneck
            block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)


class FrozenBatchNorm2d(torchvision.ops.FrozenBatchNorm2d):
    """Batch norm with fixed statistics and affine parameters (torchvision's, same tensors).

    Without autograd it runs as one fused ``F.batch_norm`` (faster, and rounding exactly as
    detectron2's FrozenBN does at inference); with autograd, as a scale and shift, which keeps
    no statistics' gradients around."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


def _norm_layer(norm: str):
    if norm == "FrozenBN":
        return FrozenBatchNorm2d
    if norm == "BN":
        return nn.BatchNorm2d
    if norm == "GN":
        return lambda c: nn.GroupNorm(32 if c % 32 == 0 else 16, c)
    raise ValueError(f"unknown norm {norm!r}")


def build_resnet(name: str, m, norm: str | None = None) -> Backbone:
    """ResNet with ``model.backbone_norm`` (FrozenBN for pretrained weights, as detectron2; GN or
    BN to train from scratch), stages frozen up to ``model.freeze_at`` (1 = stem, 2 = stem +
    res2), FPN with ``model.fpn_channels``. Module names are torchvision's (``body.layer1``...,
    ``fpn.inner_blocks``...), so its Mask R-CNN checkpoints load as they are."""
    resnet = getattr(torchvision.models, name)(weights=None, norm_layer=_norm_layer(norm or m.backbone_norm))
    if m.stride_in_1x1:
        _move_stride_to_1x1(resnet)
    freeze([nn.ModuleList([resnet.conv1, resnet.bn1]), resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4],
           m.freeze_at)
    in_channels = [64, 128, 256, 512] if name in ("resnet18", "resnet34") else [256, 512, 1024, 2048]
    body = IntermediateLayerGetter(resnet, return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"})
    return Backbone(body, in_channels, m.fpn_channels, channels_last_helps=True)


for _name in ("resnet18", "resnet34", "resnet50", "resnet101"):
    register_backbone(_name)(lambda m, _name=_name, **options: build_resnet(_name, m, **options))
