"""Model and training configuration: dataclasses, loaded from YAML files (``configs/*.yaml``).

A YAML file may name a ``_base_`` file (relative to itself) whose values it overrides, as
detectron2's configs do. Unknown keys are errors naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from components.common.settings import SettingsError, close_to, typed

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the file."""


@dataclass(frozen=True)
class InputConfig:
    """How images are sized and augmented: a model config's ``input`` section (detectron2's INPUT).
    Defaults are ``panoptic_fpn_R_50_1x``'s (no LSJ, no copy-paste). The augmentations
    themselves are in ``augment.py``.

    Args:
        min_size_train: short sides to choose from at random (detectron2 "choice" sampling).
        max_size_train / max_size_test: cap on the long side.
        min_size_test: short side at test time.
        flip_prob: horizontal flip probability (train only).
        lsj_size: large-scale jitter to this square size instead of the shortest-edge resize
            (0: off; detectron2's new baselines use 1024).
        lsj_scale: the range of the jitter's scale.
        copy_paste_prob: probability of pasting instances of another training image (0: off).
        copy_paste_max_instances: at most this many instances pasted at once.
        copy_paste_min_visible: an occluded instance keeping less of its area than this is dropped.
        max_instances: at most this many thing instances of one image are trained on, the largest
            (COCO's most crowded image has under 100; the ROI heads' box matching grows with
            anchors x instances, so an image with 10,000 would take GBs): the rest are dropped,
            said in the log.
    """

    min_size_train: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    flip_prob: float = 0.5
    lsj_size: int = 0
    lsj_scale: tuple[float, float] = (0.1, 2.0)
    copy_paste_prob: float = 0.0
    copy_paste_max_instances: int = 10
    copy_paste_min_visible: float = 0.3
    max_instances: int = 500


@dataclass
class ModelConfig:
    """Panoptic FPN. Defaults are detectron2's ``panoptic_fpn_R_50_1x``.

    Where torchvision's parts differ from detectron2's, the option chooses:
        stride_in_1x1: ResNet bottleneck stride in the 1x1 conv (detectron2/MSRA, True) or in the
            3x3 conv (torchvision, "ResNet v1.5", False).
        roi_align_aligned: RoIAlign with the half-pixel shift (detectron2 ROIAlignV2, True) or
            without (torchvision's MultiScaleRoIAlign, False).
        pooler_sampling_ratio: 0 = adaptive (detectron2), 2 = torchvision's.
        box_loss_beta / rpn_box_loss_beta: smooth-L1 beta; detectron2 uses 0 (plain L1),
            torchvision 1/9.
        pixel_mean / pixel_std / input_format: detectron2's MSRA weights take BGR 0-255 with
            std 1; torchvision's ImageNet weights take RGB with ImageNet mean/std (in 0-255 units).
    """

    backbone: str = "resnet50"              # a name in the backbone table (components/model/backbones)
    backbone_options: dict = field(default_factory=dict)   # keyword arguments of its builder
    backbone_norm: str = "FrozenBN"         # FrozenBN (pretrained), GN or BN (from scratch)
    freeze_at: int = 2                      # frozen: stem + res2
    stride_in_1x1: bool = True
    fpn_channels: int = 256
    anchor_sizes: tuple = (32, 64, 128, 256, 512)
    anchor_ratios: tuple = (0.5, 1.0, 2.0)
    anchor_offset: float = 0.0              # first anchor at the cell's corner (detectron2's default)
    rpn_pre_nms_topk_train: int = 2000
    rpn_pre_nms_topk_test: int = 1000
    rpn_post_nms_topk_train: int = 1000
    rpn_post_nms_topk_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_iou_thresholds: tuple = (0.3, 0.7)
    rpn_box_loss_beta: float = 0.0
    roi_batch_size_per_image: int = 512
    roi_positive_fraction: float = 0.25
    roi_iou_threshold: float = 0.5
    roi_score_thresh_test: float = 0.05
    roi_nms_thresh_test: float = 0.5
    detections_per_image: int = 100
    box_reg_weights: tuple = (10.0, 10.0, 5.0, 5.0)
    box_loss_beta: float = 0.0
    box_head_fc_dim: int = 1024
    mask_head_convs: int = 4
    mask_head_dim: int = 256
    roi_align_aligned: bool = True
    pooler_sampling_ratio: int = 0
    sem_seg_conv_dims: int = 128
    sem_seg_norm: str = "GN"
    sem_seg_loss_weight: float = 0.5
    instance_loss_weight: float = 1.0
    combine_overlap_thresh: float = 0.5
    combine_stuff_area_thresh: int = 4096
    combine_instances_score_thresh: float = 0.5
    size_divisibility: int = 32
    input_format: str = "BGR"
    pixel_mean: tuple = (103.530, 116.280, 123.675)
    pixel_std: tuple = (1.0, 1.0, 1.0)
    weights: str = ""                       # "", a URL, a local path, s3://..., or "torchvision:NAME"


@dataclass
class SolverConfig:
    """detectron2's SOLVER, 1x schedule. ``base_lr`` is for ``reference_batch`` images; with
    ``scale_lr`` the LR is multiplied by ims_per_batch / reference_batch (the linear scaling
    rule detectron2's reference configs follow).

    ``optimizer``: ``SGD`` (with ``momentum``) or ``AdamW`` (with ``betas``). Weight decay:
    ``weight_decay`` for weights, ``weight_decay_norm`` for norm layers' parameters,
    ``weight_decay_bias`` for biases (-1: ``weight_decay``, detectron2's default), 0 for
    parameters whose name contains one of ``no_decay_keys`` (Swin's relative-position tables).
    ``backbone_lr_factor`` multiplies the LR of the backbone's trunk (``backbone.body``);
    ``layer_decay`` (ConvNeXt only; 1: off) the LR of each layer group by decay ** (its distance
    from the heads), as ConvNeXt's detection recipe does.
    ``lr_scheduler``: ``multistep`` (x``gamma`` at each of ``steps``) or ``cosine`` (from
    the LR to ``base_lr_end`` over ``max_iter``); both after the linear warmup."""

    ims_per_batch: int = 16
    base_lr: float = 0.02
    reference_batch: int = 16
    scale_lr: bool = True
    optimizer: str = "SGD"
    momentum: float = 0.9
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0
    weight_decay_bias: float = -1.0
    no_decay_keys: tuple = ()
    backbone_lr_factor: float = 1.0
    layer_decay: float = 1.0
    lr_scheduler: str = "multistep"
    base_lr_end: float = 0.0
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    steps: tuple = (60000, 80000)
    gamma: float = 0.1
    max_iter: int = 90000
    clip_grad_norm: float = 0.0             # 0 = off
    checkpoint_period: int = 5000
    # evaluation during training (detectron2's TEST.EVAL_PERIOD): PQ on the validation shards every
    # this many iterations and at the end (0: off), on their first eval_images images (0: all); the
    # best by best_metric is kept beside the last (``{output}/best/``)
    eval_period: int = 0
    eval_images: int = 0
    best_metric: str = "PQ"
    amp: str = "off"                        # off | bf16 | fp16 (GPU only)
    channels_last: bool = False

    def lr(self) -> float:
        return self.base_lr * self.ims_per_batch / self.reference_batch if self.scale_lr else self.base_lr


@dataclass
class DataConfig:
    num_workers: int = 2
    shuffle_buffer: int = 64


@dataclass
class Config:
    name: str = "r50_1x"
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    log_period: int = 20

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "input": InputConfig, "solver": SolverConfig, "data": DataConfig}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: str) -> dict:
    try:
        if "://" in path:  # a resolved config written next to a job's output (s3://...)
            from components.common import storage

            doc = yaml.safe_load(storage.read_text(path)) or {}
        else:
            with open(path) as f:
                doc = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; built-in configs: {', '.join(builtin_configs())}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = doc.pop("_base_", None)
    if base:
        doc = _merge(_read_yaml(os.path.join(os.path.dirname(path), base)), doc)
    return doc


def from_dict(doc: dict, source: str = "<dict>") -> Config:
    kwargs: dict[str, Any] = {}
    for key, value in doc.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: `{key}` must be a mapping")
            cls = SECTIONS[key]
            names = {f.name: f for f in dataclasses.fields(cls)}
            for k in value:
                if k not in names:
                    raise ConfigError(f"{source}: unknown key `{key}.{k}`{close_to(k, names)}; known: "
                                      f"{', '.join(sorted(names))}")
            hints = typing.get_type_hints(cls)
            if key == "solver" and value.get("amp") is False:   # YAML 1.1 reads a bare `off` as false
                value = {**value, "amp": "off"}
            try:
                conv = {k: typed(v, hints[k], f"{source}: {key}.{k}") for k, v in value.items()}
            except SettingsError as e:
                raise ConfigError(str(e)) from None
            kwargs[key] = cls(**conv)
        elif key in {f.name for f in dataclasses.fields(Config)}:
            try:
                kwargs[key] = typed(value, typing.get_type_hints(Config)[key], f"{source}: {key}")
            except SettingsError as e:
                raise ConfigError(str(e)) from None
        else:
            hint = close_to(key, [*SECTIONS, "name", "seed", "log_period"])
            raise ConfigError(f"{source}: unknown top-level key `{key}`{hint}; known: name, seed, log_period, "
                              f"{', '.join(SECTIONS)}")
    cfg = Config(**kwargs)
    validate(cfg, source)
    return cfg


def validate(cfg: Config, source: str) -> None:
    m, s = cfg.model, cfg.solver
    from components.model.backbone_names import BACKBONES

    if m.backbone not in BACKBONES:
        raise ConfigError(f"{source}: model.backbone {m.backbone!r} is not one of {', '.join(sorted(BACKBONES))}")
    if not isinstance(m.backbone_options, dict):
        raise ConfigError(f"{source}: model.backbone_options must be a mapping of the builder's arguments")
    if m.backbone_norm not in ("FrozenBN", "GN", "BN"):
        raise ConfigError(f"{source}: model.backbone_norm must be FrozenBN, GN or BN")
    if m.input_format not in ("RGB", "BGR"):
        raise ConfigError(f"{source}: model.input_format must be RGB or BGR")
    if len(m.pixel_mean) != 3 or len(m.pixel_std) != 3:
        raise ConfigError(f"{source}: model.pixel_mean and model.pixel_std need 3 values")
    if s.optimizer not in ("SGD", "AdamW"):
        raise ConfigError(f"{source}: solver.optimizer must be SGD or AdamW, not {s.optimizer!r}")
    if s.lr_scheduler not in ("multistep", "cosine"):
        raise ConfigError(f"{source}: solver.lr_scheduler must be multistep or cosine, not {s.lr_scheduler!r}")
    if s.layer_decay != 1.0 and m.backbone != "convnext_t":
        raise ConfigError(f"{source}: solver.layer_decay is ConvNeXt's layer-wise LR decay; backbone {m.backbone} "
                          f"has no layer groups for it (use solver.backbone_lr_factor)")
    if s.weight_decay_bias < 0 and s.weight_decay_bias != -1:
        raise ConfigError(f"{source}: solver.weight_decay_bias = {s.weight_decay_bias}: -1 (weight_decay) or >= 0")
    if len(s.betas) != 2:
        raise ConfigError(f"{source}: solver.betas needs 2 values, not {list(s.betas)}")
    if not all(isinstance(k, str) and k for k in s.no_decay_keys):
        raise ConfigError(f"{source}: solver.no_decay_keys is a list of parameter-name parts, not "
                          f"{list(s.no_decay_keys)}")
    if s.amp not in ("off", "bf16", "fp16"):
        raise ConfigError(f"{source}: solver.amp must be off, bf16 or fp16, not {s.amp!r}")
    if s.ims_per_batch < 1 or s.max_iter < 1:
        raise ConfigError(f"{source}: solver.ims_per_batch and solver.max_iter must be >= 1")
    from components.common.metrics import METRIC_KEYS

    if s.best_metric not in METRIC_KEYS:
        raise ConfigError(f"{source}: solver.best_metric must be one of {', '.join(METRIC_KEYS)}, "
                          f"not {s.best_metric!r}")
    if list(s.steps) != sorted(s.steps):
        raise ConfigError(f"{source}: solver.steps must be increasing")
    _check_ranges(cfg, source)


MAX_SIDE = 8192   # an input side beyond this is no photo: it allocates GBs before anything fails
# (section, key): (low, high, what) - inclusive bounds; a tuple field is checked item by item
RANGES = {
    ("model", "freeze_at"): (0, 5, "0 (nothing) to 5 (the whole ResNet)"),
    ("model", "fpn_channels"): (1, 4096, None), ("model", "anchor_sizes"): (1, MAX_SIDE, None),
    ("model", "anchor_ratios"): (1e-3, 1e3, None),
    ("model", "rpn_pre_nms_topk_train"): (1, 10**6, None), ("model", "rpn_pre_nms_topk_test"): (1, 10**6, None),
    ("model", "rpn_post_nms_topk_train"): (1, 10**6, None), ("model", "rpn_post_nms_topk_test"): (1, 10**6, None),
    ("model", "rpn_nms_thresh"): (0, 1, None), ("model", "rpn_batch_size_per_image"): (1, 10**5, None),
    ("model", "rpn_positive_fraction"): (0, 1, None), ("model", "rpn_iou_thresholds"): (0, 1, None),
    ("model", "rpn_box_loss_beta"): (0, 100, None), ("model", "roi_batch_size_per_image"): (1, 10**5, None),
    ("model", "roi_positive_fraction"): (0, 1, None), ("model", "roi_iou_threshold"): (0, 1, None),
    ("model", "roi_score_thresh_test"): (0, 1, None), ("model", "roi_nms_thresh_test"): (0, 1, None),
    ("model", "detections_per_image"): (1, 10**4, None), ("model", "box_reg_weights"): (1e-6, 1e6, None),
    ("model", "box_loss_beta"): (0, 100, None), ("model", "box_head_fc_dim"): (1, 65536, None),
    ("model", "mask_head_convs"): (0, 64, None), ("model", "mask_head_dim"): (1, 4096, None),
    ("model", "pooler_sampling_ratio"): (0, 64, None), ("model", "sem_seg_conv_dims"): (1, 4096, None),
    ("model", "sem_seg_loss_weight"): (0, 1e3, None), ("model", "instance_loss_weight"): (0, 1e3, None),
    ("model", "combine_overlap_thresh"): (0, 1, None), ("model", "combine_stuff_area_thresh"): (0, MAX_SIDE**2, None),
    ("model", "combine_instances_score_thresh"): (0, 1, None), ("model", "size_divisibility"): (1, 1024, None),
    ("model", "pixel_mean"): (-1e4, 1e4, None), ("model", "pixel_std"): (1e-6, 1e4, None),
    ("input", "min_size_train"): (1, MAX_SIDE, None), ("input", "max_size_train"): (1, MAX_SIDE, None),
    ("input", "min_size_test"): (1, MAX_SIDE, None), ("input", "max_size_test"): (1, MAX_SIDE, None),
    ("input", "flip_prob"): (0, 1, None), ("input", "lsj_size"): (0, MAX_SIDE, "0 (off) or a side"),
    ("input", "lsj_scale"): (1e-3, 100, None), ("input", "copy_paste_prob"): (0, 1, None),
    ("input", "copy_paste_max_instances"): (0, 10**4, None), ("input", "copy_paste_min_visible"): (0, 1, None),
    ("input", "max_instances"): (1, 10**4, None),
    ("solver", "base_lr"): (0, 100, None), ("solver", "reference_batch"): (1, 10**6, None),
    ("solver", "momentum"): (0, 1, None), ("solver", "weight_decay"): (0, 10, None),
    ("solver", "betas"): (0, 0.999999, None), ("solver", "weight_decay_bias"): (-1, 10, "-1 (weight_decay) or 0..10"),
    ("solver", "backbone_lr_factor"): (0, 100, None), ("solver", "layer_decay"): (0.01, 1, None),
    ("solver", "base_lr_end"): (0, 100, None),
    ("solver", "weight_decay_norm"): (0, 10, None), ("solver", "warmup_iters"): (0, 10**9, None),
    ("solver", "warmup_factor"): (0, 1, None), ("solver", "steps"): (1, 10**9, None),
    ("solver", "gamma"): (0, 1, None), ("solver", "max_iter"): (1, 10**9, None),
    ("solver", "clip_grad_norm"): (0, 1e6, "0 (off) or a norm"), ("solver", "checkpoint_period"): (1, 10**9, None),
    ("solver", "ims_per_batch"): (1, 10**5, None),
    ("solver", "eval_period"): (0, 10**9, "0 (off) or a period"),
    ("solver", "eval_images"): (0, 10**8, "0 (all) or a count"),
    ("data", "num_workers"): (0, 256, None), ("data", "shuffle_buffer"): (1, 10**6, None),
}


def _check_ranges(cfg: Config, source: str) -> None:
    """Every number of the config finite and in its range (a model config inside an artifact is
    checked the same way when it is read): a zero period divides by zero, a negative size trains
    nonsense, a 30,000-px test side allocates GBs."""
    import math

    for (section, key), (low, high, what) in RANGES.items():
        value = getattr(getattr(cfg, section), key)
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low <= v <= high:
                raise ConfigError(f"{source}: {section}.{key} = {value!r}: must be {what or f'in {low}..{high}'}")
    if cfg.log_period < 1:
        raise ConfigError(f"{source}: log_period = {cfg.log_period}: must be >= 1")
    if cfg.input.max_size_test < cfg.input.min_size_test:
        raise ConfigError(f"{source}: input.max_size_test {cfg.input.max_size_test} is below input.min_size_test "
                          f"{cfg.input.min_size_test}")


def builtin_configs() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


def load_config(name_or_path: str, overrides: dict | None = None) -> Config:
    """A built-in config by name (``builtin_configs()``: ``r50_1x``, ``r101_3x``, ``tiny`` ...) or a YAML (or JSON)
    file path or URI, with ``overrides`` (nested, or dotted keys: ``{"solver.base_lr": 0.01}``).

    The run's length has one meaning: a ``solver.max_iter`` override scales the schedule with it
    (``with_length``: LR steps, warmup, checkpoint period), unless the same overrides set those
    too. (detectron2's MAX_ITER alone would leave r50_1x's 60k/80k steps beyond a short run.)"""
    path = name_or_path if name_or_path.endswith((".yaml", ".yml", ".json")) else \
        os.path.join(CONFIG_DIR, f"{name_or_path}.yaml")
    doc = _read_yaml(path)
    over = nested(overrides or {})
    length = over.get("solver", {}).get("max_iter") if isinstance(over.get("solver"), dict) else None
    if length is not None:
        over["solver"] = {k: v for k, v in over["solver"].items() if k != "max_iter"}
    cfg = from_dict(_merge(doc, over) if over else doc, path)
    if length is None:
        return cfg
    explicit = set(over.get("solver", {})) & {"steps", "warmup_iters", "checkpoint_period"}
    try:
        length = typed(length, int, f"{path}: solver.max_iter")
    except SettingsError as e:
        raise ConfigError(str(e)) from None
    scaled = with_length(cfg, length)
    keep = {k: getattr(cfg.solver, k) for k in explicit}
    cfg = dataclasses.replace(scaled, solver=dataclasses.replace(scaled.solver, **keep))
    validate(cfg, path)
    return cfg


def with_length(cfg: Config, iterations: int) -> Config:
    """``cfg`` run for ``iterations`` instead of its ``max_iter``: the LR steps scale by the same
    factor, the warmup keeps its length up to a tenth of the run, the checkpoint period is at
    most the run."""
    if iterations < 1:
        raise ConfigError(f"solver.max_iter must be >= 1, not {iterations}")
    s = cfg.solver
    if iterations == s.max_iter:
        return cfg
    f = iterations / s.max_iter
    solver = dataclasses.replace(s, max_iter=iterations, steps=tuple(max(1, round(x * f)) for x in s.steps),
                                 warmup_iters=min(s.warmup_iters, max(1, iterations // 10)),
                                 checkpoint_period=min(s.checkpoint_period, iterations))
    return dataclasses.replace(cfg, solver=solver)


def nested(overrides: dict) -> dict:
    """Dotted keys (``{"solver.base_lr": 0.01}``) as nested mappings; nested ones stay."""
    out: dict = {}
    for key, value in overrides.items():
        node = out
        parts = str(key).split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p} is not a section")
        node[parts[-1]] = _merge(node.get(parts[-1], {}), value) if isinstance(value, dict) else value
    return out


def parse_overrides(items: list[str]) -> dict:
    """``["solver.max_iter=100", "model.weights=x.pth"]`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out
