"""detectron2's Panoptic FPN R50 parameter names and shapes, written from its architecture.

Independent of our modules: used to make fake detectron2 checkpoints and to count
detectron2's parameters. Norm tensors of FrozenBN are buffers (not parameters).
"""

from __future__ import annotations

import math


def detectron2_panoptic_fpn_r50(num_things: int = 80, num_stuff: int = 53, fpn: int = 256):
    """[(name, shape, is_parameter)] of detectron2's panoptic_fpn_R_50 (StandardROIHeads, 4conv mask head)."""
    out = []

    def conv(name, cout, cin, k, bias):
        out.append((f"{name}.weight", (cout, cin, k, k), True))
        if bias:
            out.append((f"{name}.bias", (cout,), True))

    def frozen_bn(name, c):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            out.append((f"{name}.norm.{leaf}", (c,), False))

    conv("backbone.bottom_up.stem.conv1", 64, 3, 7, False)
    frozen_bn("backbone.bottom_up.stem.conv1", 64)
    cin = 64
    for stage, (bottleneck, cout, blocks) in zip(range(2, 6), ((64, 256, 3), (128, 512, 4), (256, 1024, 6),
                                                               (512, 2048, 3))):
        for b in range(blocks):
            p = f"backbone.bottom_up.res{stage}.{b}"
            if b == 0:
                conv(f"{p}.shortcut", cout, cin, 1, False)
                frozen_bn(f"{p}.shortcut", cout)
            conv(f"{p}.conv1", bottleneck, cin if b == 0 else cout, 1, False)
            frozen_bn(f"{p}.conv1", bottleneck)
            conv(f"{p}.conv2", bottleneck, bottleneck, 3, False)
            frozen_bn(f"{p}.conv2", bottleneck)
            conv(f"{p}.conv3", cout, bottleneck, 1, False)
            frozen_bn(f"{p}.conv3", cout)
        cin = cout
    for lvl, c in zip(range(2, 6), (256, 512, 1024, 2048)):
        conv(f"backbone.fpn_lateral{lvl}", fpn, c, 1, True)
        conv(f"backbone.fpn_output{lvl}", fpn, fpn, 3, True)
    conv("proposal_generator.rpn_head.conv", fpn, fpn, 3, True)
    conv("proposal_generator.rpn_head.objectness_logits", 3, fpn, 1, True)
    conv("proposal_generator.rpn_head.anchor_deltas", 12, fpn, 1, True)
    out += [("roi_heads.box_head.fc1.weight", (1024, fpn * 49), True), ("roi_heads.box_head.fc1.bias", (1024,), True),
            ("roi_heads.box_head.fc2.weight", (1024, 1024), True), ("roi_heads.box_head.fc2.bias", (1024,), True),
            ("roi_heads.box_predictor.cls_score.weight", (num_things + 1, 1024), True),
            ("roi_heads.box_predictor.cls_score.bias", (num_things + 1,), True),
            ("roi_heads.box_predictor.bbox_pred.weight", (num_things * 4, 1024), True),
            ("roi_heads.box_predictor.bbox_pred.bias", (num_things * 4,), True)]
    for k in range(1, 5):
        conv(f"roi_heads.mask_head.mask_fcn{k}", 256, fpn, 3, True)
    out += [("roi_heads.mask_head.deconv.weight", (256, 256, 2, 2), True), ("roi_heads.mask_head.deconv.bias", (256,), True)]
    conv("roi_heads.mask_head.predictor", num_things, 256, 1, True)
    for stride in (4, 8, 16, 32):
        lvl = int(math.log2(stride))
        for k in range(max(1, lvl - 2)):
            conv(f"sem_seg_head.p{lvl}.{k}", 128, fpn if k == 0 else 128, 3, False)
            out += [(f"sem_seg_head.p{lvl}.{k}.norm.weight", (128,), True),
                    (f"sem_seg_head.p{lvl}.{k}.norm.bias", (128,), True)]
    conv("sem_seg_head.predictor", num_stuff + 1, 128, 1, True)
    return out
