"""Swin-T + FPN: torchvision's Swin Transformer with a LayerNorm on each stage output (as Swin's
detection models have) and an FPN over the four stages. ImageNet weights:
``torchvision:swin_t_imagenet``."""

from __future__ import annotations

import torch.nn as nn
from torchvision.models.swin_transformer import SwinTransformer

from components.model.backbones import Backbone, StageOutputs, freeze, register_backbone


@register_backbone("swin_t")
def build_swin_t(m, embed_dim: int = 96, depths: tuple = (2, 2, 6, 2), num_heads: tuple = (3, 6, 12, 24),
                 window_size: int = 7, drop_path: float = 0.2) -> Backbone:
    """Swin-T (28M parameters in the trunk); ``backbone_options`` make it smaller for the CPU."""
    swin = SwinTransformer(patch_size=[4, 4], embed_dim=embed_dim, depths=list(depths), num_heads=list(num_heads),
                           window_size=[window_size, window_size], stochastic_depth_prob=drop_path)
    features = swin.features   # 0 patch embedding, 1 stage 1, 2 merge, 3 stage 2, ..., 7 stage 4 (NHWC)
    channels = [embed_dim * 2 ** i for i in range(4)]
    freeze([features[0], features[1], features[3], features[5], features[7]], m.freeze_at)
    body = StageOutputs(features, (1, 3, 5, 7), nhwc=True, norms=nn.ModuleList(nn.LayerNorm(c) for c in channels))
    return Backbone(body, channels, m.fpn_channels, channels_last_helps=False)
