"""Seeded Panoptic FPN weights in detectron2's naming: the checkpoint of the golden tests.

The names and shapes come from a real detectron2 build (``fixtures/detectron2/keys_*.json``);
the values are drawn here from a seed, so CI regenerates the 180-260 MB checkpoint instead of
storing it. Each tensor has its own generator (seed, crc32 of its name): the values do not
depend on the order of the keys. The draws are shaped to give outputs worth comparing:
FrozenBN statistics that are not the identity (a converter that mixes up running_mean and
running_var, or weight and bias, changes the features), residual branches small enough that
activations stay in range through 16-33 blocks, and heads whose outputs are decisive: dozens
of detections above the 0.5 panoptic threshold, masks with structure, and several stuff classes
above the 4,096-pixel area limit on each photo.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import zlib

import numpy as np

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "detectron2")
SEED = 2024


def detectron2_keys(depth: int = 50) -> dict[str, tuple[int, ...]]:
    """{name: shape} of detectron2's panoptic_fpn_R_{depth} state dict, as a real build lists it."""
    with open(os.path.join(FIXTURES, f"keys_r{depth}.json")) as f:
        return {k: tuple(v) for k, v in json.load(f).items()}


def _draw(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1

    def normal(std, mean=0.0):
        return (mean + std * rng.standard_normal(shape)).astype(np.float32)

    def uniform(lo, hi):
        return rng.uniform(lo, hi, shape).astype(np.float32)

    leaf = name.rsplit(".", 1)[-1]
    if name.startswith("backbone.bottom_up."):
        if ".norm." in name:
            last_in_branch = ".conv3.norm." in name
            return {"weight": uniform(0.15, 0.35) if last_in_branch else uniform(0.8, 1.2),
                    "bias": normal(0.05 if last_in_branch else 0.2),
                    "running_mean": normal(0.2),
                    "running_var": uniform(0.5, 2.0)}[leaf]
        if name.startswith("backbone.bottom_up.stem."):  # inputs are 0-255 pixels minus the mean
            return normal(math.sqrt(2.0 / fan_in) / 60.0)
        return normal(math.sqrt(2.0 / fan_in))
    if name.startswith("backbone.fpn_"):
        return normal(math.sqrt(1.0 / fan_in)) if leaf == "weight" else normal(0.02)
    if name.startswith("proposal_generator.rpn_head."):
        part = name.split(".")[2]
        if part == "conv":
            return normal(math.sqrt(2.0 / fan_in)) if leaf == "weight" else normal(0.02)
        if part == "objectness_logits":
            return normal(3.0 / math.sqrt(fan_in)) if leaf == "weight" else normal(0.5, -1.0)
        return normal(0.3 / math.sqrt(fan_in)) if leaf == "weight" else normal(0.05)  # anchor_deltas
    if name.startswith("roi_heads.box_head."):
        return normal(math.sqrt(2.0 / fan_in)) if leaf == "weight" else normal(0.02)
    if name.startswith("roi_heads.box_predictor.cls_score."):
        if leaf == "weight":
            w = normal(1.0 / math.sqrt(fan_in))
            return w - w.mean(axis=1, keepdims=True)
        b = normal(0.3)
        b[-1] = 2.0  # the background: most RoIs stay background, some classes win clearly
        return b
    if name.startswith("roi_heads.box_predictor.bbox_pred."):
        return normal(1.0 / math.sqrt(fan_in)) if leaf == "weight" else normal(0.1)
    if name.startswith("roi_heads.mask_head."):
        if ".predictor." in name:
            return normal(2.0 / math.sqrt(fan_in)) if leaf == "weight" else normal(0.5)
        return normal(math.sqrt(2.0 / fan_in)) if leaf == "weight" else normal(0.02)
    if name.startswith("sem_seg_head."):
        if ".predictor." in name:
            if leaf == "bias":
                return normal(0.5)
            w = normal(3.0 / math.sqrt(fan_in))  # rows centred: no class wins everywhere through the
            return w - w.mean(axis=1, keepdims=True)  # features' common (post-ReLU) offset
        if ".norm." in name:
            return uniform(0.8, 1.2) if leaf == "weight" else normal(0.1)
        return normal(math.sqrt(2.0 / fan_in))
    raise KeyError(f"no rule for {name}")


def detectron2_state(depth: int = 50, seed: int = SEED) -> dict[str, np.ndarray]:
    """The seeded weights, {detectron2 name: float32 array}."""
    return {name: _draw(name, shape, seed) for name, shape in detectron2_keys(depth).items()}


def state_sha256(state: dict[str, np.ndarray]) -> str:
    """One hash over every tensor's name and bytes, to tell if the generator still draws the same."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(np.ascontiguousarray(state[name]).tobytes())
    return h.hexdigest()


def stored_sha256(depth: int) -> str:
    with open(os.path.join(FIXTURES, "weights_sha256.json")) as f:
        return json.load(f)[f"r{depth}"]


def write_model_zoo_pkl(path: str, depth: int = 50, seed: int = SEED) -> str:
    """Save the seeded weights as a model-zoo style ``.pkl`` (a pickle of numpy arrays)."""
    state = detectron2_state(depth, seed)
    if seed == SEED and state_sha256(state) != stored_sha256(depth):
        raise AssertionError("tests/detectron2_weights.py no longer draws the weights the golden outputs were made "
                             "with (numpy changed its generator, or the rules were edited): regenerate the golden "
                             "files (tests/fixtures/detectron2/README.md)")
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "panoptic-pipeline tests",
                     "matching_heuristics": False}, f, protocol=pickle.HIGHEST_PROTOCOL)
    return path
