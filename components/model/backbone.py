"""ResNet + FPN (P2-P6) backbone: torchvision's ResNet and FPN, detectron2's options."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.ops
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool


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


def build_backbone(*, name: str = "resnet50", norm: str = "FrozenBN", freeze_at: int = 2, stride_in_1x1: bool = True,
                   out_channels: int = 256) -> BackboneWithFPN:
    """ResNet with ``norm`` (FrozenBN for pretrained weights, as detectron2; GN or BN to train
    from scratch), stages frozen up to ``freeze_at`` (1 = stem, 2 = stem + res2, as
    detectron2's FREEZE_AT), FPN with ``out_channels`` and P6 = max-pool(P5, k=1, s=2).

    Returns a module mapping a (B, 3, H, W) batch to ``{"0": P2, "1": P3, "2": P4, "3": P5,
    "pool": P6}``; the module names (``body``, ``fpn``) are torchvision's, so its Mask R-CNN
    checkpoints load as they are.
    """
    resnet = getattr(torchvision.models, name)(weights=None, norm_layer=_norm_layer(norm))
    if stride_in_1x1:
        _move_stride_to_1x1(resnet)
    stages = [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    for i, names in enumerate(stages):
        if i < freeze_at:
            for n in names:
                for p in getattr(resnet, n).parameters():
                    p.requires_grad_(False)
    in_channels = [64, 128, 256, 512] if name in ("resnet18", "resnet34") else [256, 512, 1024, 2048]
    return BackboneWithFPN(resnet, return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                           in_channels_list=in_channels, out_channels=out_channels, extra_blocks=LastLevelMaxPool())
