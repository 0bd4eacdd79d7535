"""Multi-level RoIAlign with detectron2's level assignment and the ``aligned`` option."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torchvision.ops import roi_align


class MultiLevelRoIAlign(nn.Module):
    """Pools each box from the FPN level of its size: ``floor(4 + log2(sqrt(area) / 224))``,
    clamped to the given levels (FPN paper, Eq. 1; detectron2's assign_boxes_to_levels).

    Args:
        output_size: e.g. 7 (box head) or 14 (mask head).
        featmap_names: keys of the features to pool from, finest first.
        strides: their strides.
        sampling_ratio: 0 = adaptive (detectron2); torchvision's default is 2.
        aligned: half-pixel shift (detectron2's ROIAlignV2); torchvision's default is False.
    """

    def __init__(self, *, output_size: int, featmap_names=("0", "1", "2", "3"), strides=(4, 8, 16, 32),
                 sampling_ratio: int = 0, aligned: bool = True, canonical_size: int = 224, canonical_level: int = 4):
        super().__init__()
        self.output_size, self.featmap_names = (output_size, output_size), list(featmap_names)
        self.scales = [1.0 / s for s in strides]
        self.sampling_ratio, self.aligned = sampling_ratio, aligned
        self.min_level, self.max_level = int(math.log2(strides[0])), int(math.log2(strides[-1]))
        self.canonical_size, self.canonical_level = canonical_size, canonical_level

    def forward(self, x: dict, boxes: list[torch.Tensor], image_shapes=None) -> torch.Tensor:
        feats = [x[n] for n in self.featmap_names]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)], 0)
        sizes = torch.sqrt((rois[:, 3] - rois[:, 1]).clamp(min=0) * (rois[:, 4] - rois[:, 2]).clamp(min=0))
        levels = torch.floor(self.canonical_level + torch.log2(sizes / self.canonical_size + 1e-8))
        levels = levels.clamp(self.min_level, self.max_level).to(torch.int64) - self.min_level
        out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1], *self.output_size))
        for lvl, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.nonzero(levels == lvl, as_tuple=True)[0]
            if idx.numel():
                out[idx] = roi_align(feat, rois[idx].to(feat.dtype), self.output_size, spatial_scale=scale,
                                     sampling_ratio=self.sampling_ratio, aligned=self.aligned).to(out.dtype)
        return out
