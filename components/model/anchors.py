"""RPN anchors with detectron2's geometry: exact cell anchors, each level's own fixed stride."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def cell_anchors(size: float, ratios) -> torch.Tensor:
    """(len(ratios), 4) boxes centred on 0 with area ``size**2`` and height / width = ratio.

    Not rounded: an anchor of size 32 and ratio 0.5 is 45.25 x 22.63 px, as in detectron2
    (torchvision rounds the corners to whole pixels).
    """
    out = []
    for ratio in ratios:
        w = math.sqrt(size * size / ratio)
        h = ratio * w
        out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(out, dtype=torch.float32)


class AnchorGenerator(nn.Module):
    """Anchors for each feature level: the level's cell anchors at every grid position.

    Args:
        sizes: one anchor size (sqrt of its area, in input pixels) per level.
        ratios: aspect ratios (height / width), the same on every level.
        strides: each level's stride in input pixels (4, 8, 16, 32, 64 for P2-P6). Fixed, not
            derived from the padded image size: P6 of an image padded to 32 x odd is not 64
            times smaller, and its anchors must still sit 64 px apart.
        offset: where in its cell the first anchor sits, as a fraction of the stride (0.0: the
            top-left corner, detectron2's default).

    ``forward(features)`` returns one (Hi * Wi * A, 4) tensor per level, position-major and
    anchor-minor (the layout of the RPN head's flattened outputs).
    """

    def __init__(self, *, sizes, ratios, strides, offset: float = 0.0):
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError(f"one anchor size per level: {len(sizes)} sizes for {len(strides)} strides")
        self.strides, self.offset = [int(s) for s in strides], float(offset)
        self.num_anchors = len(ratios)
        for i, size in enumerate(sizes):
            self.register_buffer(f"cell_{i}", cell_anchors(float(size), ratios), persistent=False)

    def grid(self, level: int, height: int, width: int) -> torch.Tensor:
        cell = getattr(self, f"cell_{level}")
        stride = self.strides[level]
        xs = torch.arange(width, device=cell.device, dtype=torch.float32) * stride + self.offset * stride
        ys = torch.arange(height, device=cell.device, dtype=torch.float32) * stride + self.offset * stride
        sy, sx = torch.meshgrid(ys, xs, indexing="ij")
        sx, sy = sx.reshape(-1), sy.reshape(-1)
        shifts = torch.stack((sx, sy, sx, sy), dim=1)
        return (shifts[:, None, :] + cell[None, :, :]).reshape(-1, 4)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.grid(i, f.shape[-2], f.shape[-1]) for i, f in enumerate(features)]
