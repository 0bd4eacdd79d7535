"""The backbone table: a config's ``model.backbone`` name -> a builder of FPN features.

A builder takes the ``ModelConfig`` and returns a ``Backbone``: a module mapping a normalised
``(B, 3, H, W)`` batch to ``{"0": P2, "1": P3, "2": P4, "3": P5, "pool": P6}`` (strides 4 to
64, ``out_channels`` each), holding the feature extractor as ``body`` and the pyramid as
``fpn`` (torchvision's names, so its checkpoints load as they are), and saying whether
``channels_last`` memory helps it on a GPU. The meta-architecture asks for nothing else.

Adding a backbone is one file here (a function decorated with ``@register_backbone``), its
name in ``components/model/backbone_names.py`` and one config; ``docs/extending.md`` has the recipe.
``model.backbone_options`` passes a mapping of keyword arguments to the builder (the CPU-sized
variants use it).
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn as nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from components.model.backbone_names import BACKBONES

STRIDES = (4, 8, 16, 32, 64)
_BUILDERS: dict[str, Callable] = {}


class Backbone(nn.Module):
    """``body`` (a module returning the four stage outputs C2-C5 as ``{"0".."3"}``, NCHW) with an
    FPN over them and P6 = max-pool(P5, k=1, s=2), detectron2's "LastLevelMaxPool"."""

    def __init__(self, body: nn.Module, in_channels: list[int], out_channels: int, channels_last_helps: bool):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.strides = STRIDES
        self.channels_last_helps = channels_last_helps

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(self.body(x))


def register_backbone(name: str):
    """Decorator: make ``fn(model_config, **backbone_options) -> Backbone`` the builder of ``name``."""
    def wrap(fn):
        if name in _BUILDERS:
            raise ValueError(f"backbone {name!r} is registered twice")
        if name not in BACKBONES:
            raise ValueError(f"backbone {name!r} is not in components/model/backbone_names.py: add it there")
        _BUILDERS[name] = fn
        return fn
    return wrap


def available() -> list[str]:
    return sorted(BACKBONES)


def build_backbone(m) -> Backbone:
    """The backbone a ``ModelConfig`` names."""
    if m.backbone not in BACKBONES:
        raise ValueError(f"model.backbone {m.backbone!r} is not a known backbone; known: {', '.join(available())}")
    if m.backbone not in _BUILDERS:
        importlib.import_module(f"{__name__}.{BACKBONES[m.backbone]}")
    try:
        return _BUILDERS[m.backbone](m, **dict(m.backbone_options or {}))
    except TypeError as e:
        raise ValueError(f"model.backbone_options {dict(m.backbone_options)} do not fit backbone "
                         f"{m.backbone!r}: {e}") from None


def freeze(modules: list[nn.Module], upto: int) -> None:
    """Freeze the first ``upto`` of ``modules`` (stem, stage 1, ...): detectron2's FREEZE_AT."""
    for module in modules[:upto]:
        for p in module.parameters():
            p.requires_grad_(False)


class StageOutputs(nn.Module):
    """Run a ``features`` sequence (torchvision's Swin and ConvNeXt) and return the outputs of
    the given indices as ``{"0".."3"}`` in NCHW (``nhwc``: the blocks work channels-last, as Swin's)."""

    def __init__(self, features: nn.Sequential, taps: tuple[int, ...], nhwc: bool = False,
                 norms: nn.ModuleList | None = None):
        super().__init__()
        self.features, self.taps, self.nhwc = features, taps, nhwc
        self.norms = norms

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for i, block in enumerate(self.features):
            x = block(x)
            if i in self.taps:
                k = self.taps.index(i)
                y = self.norms[k](x) if self.norms is not None else x
                out[str(k)] = y.permute(0, 3, 1, 2).contiguous() if self.nhwc else y
            if len(out) == len(self.taps):
                break
        return out
