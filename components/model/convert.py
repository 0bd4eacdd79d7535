"""Checkpoint names and layouts of other projects -> ours.

Each function takes a state dict in the other project's naming and returns ``(converted,
dropped)``: ``converted`` maps our parameter names to tensors; ``dropped`` names the keys left
out on purpose, each with the reason (an ImageNet classifier, an optimizer's momentum). A key
that no rule knows stays under its own name, so the loader reports it as unmatched.

Our names: torchvision's ResNet + FPN for the backbone (``backbone.body``, ``backbone.fpn``);
detectron2's names and layouts for the heads (``rpn.head``, ``roi_heads``, ``sem_seg_head``).
"""

from __future__ import annotations

import re

import numpy as np
import torch

# FrozenBN epsilon (torchvision's and detectron2's). detectron2 starts running_var at 1 - eps so
# that an affine-only checkpoint (Caffe2's ImageNet models) scales by exactly its weight.
FROZEN_BN_EPS = 1e-5

_D2_RES = re.compile(r"^backbone\.bottom_up\.res(\d)\.(\d+)\.(conv[123]|shortcut)(\.norm)?\.(\w+)$")
_C2_RES = re.compile(r"^res(\d)_(\d+)_branch(1|2a|2b|2c)(_bn)?_(\w)$")
_C2_BRANCH = {"1": "shortcut", "2a": "conv1", "2b": "conv2", "2c": "conv3"}
_C2_LEAF = {("", "w"): "weight", ("_bn", "s"): "norm.weight", ("_bn", "b"): "norm.bias"}


def as_tensor(value) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    return t.float() if t.is_floating_point() else t


def _resnet_block(stage: int, block: int, conv: str, leaf: str) -> str:
    """detectron2 res{2..5}.{i}.conv{j}[.norm].leaf -> torchvision layer{1..4}.{i}.conv{j}/bn{j}."""
    prefix = f"backbone.body.layer{stage - 1}.{block}."
    norm = leaf.startswith("norm.")
    leaf = leaf[len("norm."):] if norm else leaf
    if conv == "shortcut":
        return prefix + ("downsample.1." if norm else "downsample.0.") + leaf
    return prefix + (f"bn{conv[-1]}." if norm else f"conv{conv[-1]}.") + leaf


def from_detectron2(state: dict) -> tuple[dict, dict]:
    """A detectron2 (Panoptic FPN / Mask R-CNN) state dict. The heads keep their names (ours are
    detectron2's); the backbone is renamed; ``pixel_mean``/``pixel_std`` are kept for the
    loader to compare with the config."""
    out, dropped = {}, {}
    for key, value in state.items():
        new = key
        m = _D2_RES.match(key)
        if m:
            stage, block, conv, norm, leaf = m.groups()
            new = _resnet_block(int(stage), int(block), conv, ("norm." if norm else "") + leaf)
        elif key.startswith("backbone.bottom_up.stem.conv1."):
            leaf = key[len("backbone.bottom_up.stem.conv1."):]
            new = "backbone.body." + ("bn1." + leaf[len("norm."):] if leaf.startswith("norm.") else "conv1." + leaf)
        elif m := re.match(r"^backbone\.fpn_(lateral|output)(\d)\.(\w+)$", key):
            kind, level, leaf = m.groups()
            blocks = "inner_blocks" if kind == "lateral" else "layer_blocks"
            new = f"backbone.fpn.{blocks}.{int(level) - 2}.0.{leaf}"
        elif key.startswith("proposal_generator.rpn_head."):
            new = "rpn.head." + key[len("proposal_generator.rpn_head."):]
        out[new] = as_tensor(value)
    return out, dropped


def from_caffe2_resnet(state: dict) -> tuple[dict, dict]:
    """An ImageNet ResNet in Caffe2's naming (detectron2's ``ImageNetPretrained/MSRA/R-50.pkl``,
    ``R-101.pkl``): ``conv1_w``, ``res_conv1_bn_s``, ``res2_0_branch2a_w`` ... Batch norms hold
    scale and bias only; their running statistics become 0 and 1 - eps, as detectron2 sets them."""
    out, dropped = {}, {}
    for key, value in state.items():
        if key.endswith("_momentum"):
            dropped[key] = "optimizer momentum"
            continue
        if key.startswith(("fc1000_", "pred_")):
            dropped[key] = "ImageNet classifier"
            continue
        new = key
        if key == "conv1_w":
            new = "backbone.body.conv1.weight"
        elif key in ("res_conv1_bn_s", "res_conv1_bn_b"):
            new = "backbone.body.bn1." + ("weight" if key.endswith("_s") else "bias")
        elif m := _C2_RES.match(key):
            stage, block, branch, bn, leaf = m.groups()
            if (bn or "", leaf) in _C2_LEAF:
                new = _resnet_block(int(stage), int(block), _C2_BRANCH[branch], _C2_LEAF[(bn or "", leaf)])
        out[new] = as_tensor(value)
    for key, t in list(out.items()):  # the statistics an affine-only norm implies
        if re.search(r"\.(bn\d|downsample\.1)\.bias$", key):
            stem = key[: -len("bias")]
            out.setdefault(stem + "running_mean", torch.zeros_like(t))
            out.setdefault(stem + "running_var", torch.full_like(t, 1.0 - FROZEN_BN_EPS))
    return out, dropped


def from_torchvision_resnet(state: dict) -> tuple[dict, dict]:
    """torchvision's ImageNet ResNet (``resnet50-*.pth``): the backbone's body, classifier dropped."""
    out, dropped = {}, {}
    for key, value in state.items():
        if key.startswith("fc."):
            dropped[key] = "ImageNet classifier"
        elif key.endswith("num_batches_tracked"):
            dropped[key] = "batch-norm counter (FrozenBN keeps no count)"
        else:
            out[f"backbone.body.{key}"] = as_tensor(value)
    return out, dropped


# Our names before format v2 (torchvision's RPN and RoI heads) -> now; torchvision's own Mask
# R-CNN checkpoints use the same names (older ones ``rpn.head.conv.*`` and ``mask_fcn{k}``).
_TV_HEADS = [
    (r"^rpn\.head\.conv\.0\.0\.", "rpn.head.conv."), (r"^rpn\.head\.conv\.(weight|bias)$", r"rpn.head.conv.\1"),
    (r"^rpn\.head\.cls_logits\.", "rpn.head.objectness_logits."),
    (r"^rpn\.head\.bbox_pred\.", "rpn.head.anchor_deltas."),
    (r"^roi_heads\.box_head\.fc6\.", "roi_heads.box_head.fc1."),
    (r"^roi_heads\.box_head\.fc7\.", "roi_heads.box_head.fc2."),
    (r"^roi_heads\.mask_head\.(\d)\.0\.", lambda m: f"roi_heads.mask_head.mask_fcn{int(m.group(1)) + 1}."),
    (r"^roi_heads\.mask_head\.mask_fcn(\d)\.", r"roi_heads.mask_head.mask_fcn\1."),
    (r"^roi_heads\.mask_predictor\.conv5_mask\.", "roi_heads.mask_head.deconv."),
    (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.", "roi_heads.mask_head.predictor."),
]


def from_torchvision_heads(state: dict) -> tuple[dict, dict]:
    """torchvision's Mask R-CNN names -> ours. The class layers move the background from first to
    last and drop its box regressor and mask channel."""
    out, dropped = {}, {}
    for key, value in state.items():
        t, new = as_tensor(value), key
        for pattern, repl in _TV_HEADS:
            if re.match(pattern, key):
                new = re.sub(pattern, repl, key)
                break
        if new.startswith("roi_heads.box_predictor.cls_score."):
            t = torch.cat([t[1:], t[:1]])                  # background first -> last
        elif new.startswith("roi_heads.box_predictor.bbox_pred."):
            dropped[f"{key}[:4]"] = "background box regressor (detectron2's layout has none)"
            t = t[4:]
        elif new.startswith("roi_heads.mask_head.predictor."):
            dropped[f"{key}[:1]"] = "background mask channel (detectron2's layout has none)"
            t = t[1:]
        out[new] = t
    return out, dropped


def from_torchvision_features(state: dict) -> tuple[dict, dict]:
    """torchvision's Swin / ConvNeXt ImageNet classifiers (``features.*``) -> our backbone body.
    The final norm and the classifier are ImageNet's; our stage-output norms start fresh."""
    out, dropped = {}, {}
    for key, value in state.items():
        if key.startswith("features."):
            out[f"backbone.body.{key}"] = as_tensor(value)
        else:
            dropped[key] = "ImageNet classifier"
    return out, dropped
