"""ConvNeXt-T + FPN: torchvision's ConvNeXt with a LayerNorm on each stage output (as ConvNeXt's
detection models have) and an FPN over the four stages. ImageNet weights:
``torchvision:convnext_t_imagenet``."""

from __future__ import annotations

import torch.nn as nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt, LayerNorm2d

from components.model.backbones import Backbone, StageOutputs, freeze, register_backbone


@register_backbone("convnext_t")
def build_convnext_t(m, widths: tuple = (96, 192, 384, 768), depths: tuple = (3, 3, 9, 3),
                     drop_path: float = 0.1) -> Backbone:
    """ConvNeXt-T (28M parameters in the trunk); ``backbone_options`` make it smaller for the CPU."""
    setting = [CNBlockConfig(w, widths[i + 1] if i + 1 < len(widths) else None, d)
               for i, (w, d) in enumerate(zip(widths, depths))]
    net = ConvNeXt(setting, stochastic_depth_prob=drop_path)
    features = net.features    # 0 stem, 1 stage 1, 2 downsample, 3 stage 2, ..., 7 stage 4 (NCHW)
    freeze([features[0], features[1], features[3], features[5], features[7]], m.freeze_at)
    body = StageOutputs(features, (1, 3, 5, 7), norms=nn.ModuleList(LayerNorm2d(w, eps=1e-6) for w in widths))
    return Backbone(body, list(widths), m.fpn_channels, channels_last_helps=True)
