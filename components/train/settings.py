"""The train stage's settings, and the one place they become a training config.

Single-node and multi-node training (PyTorchJob, TrainJob) both run ``resolve_config``'s
output: the same schedule scaling, overrides and initial weights, whichever launcher runs it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from components.model.config import Config, load_config, nested

INITS = ("config", "scratch", "imagenet", "coco", "champion")
LAUNCHERS = ("pytorchjob", "trainjob")
SELECTS = ("best", "last")
IMAGENET = {"resnet18": "torchvision:resnet18_imagenet", "resnet50": "torchvision:resnet50_imagenet",
            "resnet101": "torchvision:resnet101_imagenet", "swin_t": "torchvision:swin_t_imagenet",
            "convnext_t": "torchvision:convnext_t_imagenet"}
# detectron2's model zoo (detectron2/model_zoo/model_zoo.py): Panoptic FPN trained on COCO panoptic,
# the 3x schedule of each backbone it has; the notebook this project grew from fine-tuned from these
COCO_PANOPTIC = {
    "resnet50": "detectron2://COCO-PanopticSegmentation/panoptic_fpn_R_50_3x/139514569/model_final_c10459.pkl",
    "resnet101": "detectron2://COCO-PanopticSegmentation/panoptic_fpn_R_101_3x/139514519/model_final_cafdb1.pkl",
}
# the input a checkpoint's family was trained on: (format, pixel mean, pixel std) in 0-255 units
PIXELS = {"detectron2://": ("BGR", (103.53, 116.28, 123.675), (1.0, 1.0, 1.0)),        # MSRA and the model zoo
          "torchvision:": ("RGB", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))}  # ImageNet statistics
PIXEL_KEYS = ("model.input_format", "model.pixel_mean", "model.pixel_std")


@dataclass(frozen=True)
class TrainSettings:
    """Args:
        config: a built-in config (``components/model/configs/``: ``r50_1x``, ``r101_3x``, ``tiny`` ...) or a
            YAML path/URI.
        iterations: the run's length: this many iterations instead of the config's ``max_iter``, the
            LR steps, warmup and checkpoint period scaled with it (0: the config's schedule). The
            same as overriding ``solver.max_iter``: the run's length has that one meaning.
        overrides: config keys and values applied to the config, ``{"solver.base_lr": 0.01}``
            (``--set train.solver.base_lr=0.01`` on the command line).
        init: initial weights: ``config`` (the config's ``model.weights``: detectron2's ImageNet
            ResNets for r50/r101), ``scratch`` (none: only for configs that freeze nothing and
            normalise with GN/BN), ``imagenet`` (torchvision's ImageNet backbone), ``coco``
            (detectron2's model-zoo Panoptic FPN of the config's backbone, trained on COCO
            panoptic; its heads' rows picked for the data's categories when they are COCO's),
            ``champion`` (the registered champion, when there is one: fine-tuning), or a weights
            URI (``models:/...``, ``runs:/...``, a path, s3://, a URL). The pixel format and
            statistics follow the weights (``PIXELS``) unless overrides set them.
        nodes / gpus_per_node: more than one node runs a ``launcher`` job on the cluster; more
            than one GPU on one node runs torchrun here.
        launcher: ``pytorchjob`` (Training Operator v1) or ``trainjob`` (Kubeflow Trainer v2).
        runtime: the TrainJob's ClusterTrainingRuntime.
        image: the training pods' image ("": the pipeline's CUDA image).
        namespace: the job's namespace ("": the namespace this step runs in).
        checkpoint_uri: where checkpoints go, so a retried step resumes ("": next to model.pt).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        sweep: a hyper-parameter search (``components/train/sweep.py``'s ``SweepSettings``): the
            stage trains its trials and outputs the best one's model ({}: train once).
        select: the model the stage outputs (and register registers): ``best``, the best evaluation
            during training (``solver.eval_period`` on the validation shards; its iteration goes in
            the lineage), or the last iteration's when there was no evaluation; ``last``: always the
            last iteration's.
    """

    config: str = "r50_1x"
    iterations: int = 0
    overrides: dict = field(default_factory=dict)
    init: str = "config"
    nodes: int = 1
    gpus_per_node: int = 1
    launcher: str = "pytorchjob"
    runtime: str = "torch-distributed"
    image: str = ""
    namespace: str = ""
    checkpoint_uri: str = ""
    device: str = "auto"
    sweep: dict = field(default_factory=dict)
    select: str = "best"

    def __post_init__(self):
        if not all(isinstance(k, str) for k in self.overrides):
            raise ValueError("overrides maps config keys (section.key) to values")
        length = nested(self.overrides).get("solver", {}).get("max_iter")
        if length is not None and self.iterations and length != self.iterations:
            raise ValueError(f"iterations {self.iterations} and solver.max_iter {length} disagree: the run's length is "
                             f"one setting, use iterations")
        if self.select not in SELECTS:
            raise ValueError(f"select must be one of {', '.join(SELECTS)}, not {self.select!r}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {', '.join(LAUNCHERS)}, not {self.launcher!r}")
        if self.nodes < 1 or self.gpus_per_node < 0 or self.iterations < 0:
            raise ValueError("nodes must be >= 1, gpus_per_node and iterations >= 0")
        if self.sweep:
            self.sweep_settings()   # fails early, naming the bad key

    def sweep_settings(self):
        from components.common.settings import parse_settings

        return parse_settings(SweepSettings, dict(self.sweep), "train.sweep")


def init_weights(settings: TrainSettings, cfg: Config, champion_uri: str | None) -> str:
    """The ``model.weights`` spec ``settings.init`` asks for (``champion_uri``: the champion's
    concrete model URI, or None when there is none yet: then the config's own weights)."""
    if settings.init == "config":
        return cfg.model.weights
    if settings.init == "scratch":
        return ""
    if settings.init == "imagenet":
        if cfg.model.backbone not in IMAGENET:
            raise ValueError(f"no ImageNet weights known for backbone {cfg.model.backbone!r}")
        return IMAGENET[cfg.model.backbone]
    if settings.init == "coco":
        if cfg.model.backbone not in COCO_PANOPTIC:
            raise ValueError(f"train.init=coco: detectron2's model zoo has Panoptic FPN for "
                             f"{', '.join(COCO_PANOPTIC)}, not {cfg.model.backbone}; use init=imagenet")
        return COCO_PANOPTIC[cfg.model.backbone]
    if settings.init == "champion":
        return champion_uri or cfg.model.weights
    return settings.init  # a URI


def pixels_of(weights: str) -> tuple | None:
    """(input format, pixel mean, pixel std) the weights were trained with, when known by address."""
    return next((v for prefix, v in PIXELS.items() if weights.startswith(prefix)), None)


def check_initial_weights(cfg: Config) -> None:
    """Frozen layers never stay random: FrozenBN or ``freeze_at`` > 0 need weights to freeze."""
    m = cfg.model
    frozen_bn = m.backbone_norm == "FrozenBN" and m.backbone.startswith("resnet")   # the others use LayerNorm
    if m.weights or (m.freeze_at == 0 and not frozen_bn):
        return
    frozen = ([f"freeze_at={m.freeze_at} (the stem{' and res2' if m.freeze_at > 1 else ''} never train)"]
              if m.freeze_at else []) + (["backbone_norm=FrozenBN (its statistics never learn)"] if frozen_bn else [])
    raise ValueError(f"{cfg.name}: no initial weights, but model.{' and model.'.join(frozen)}: those layers would "
                     f"stay random. Start from weights (train.init=imagenet, train.init=coco, or a weights file: "
                     f"train.init=PATH), or train from scratch with a config that freezes nothing and learns its "
                     f"norms (r50_scratch_gn_3x, or --set train.model.freeze_at=0 --set train.model.backbone_norm=GN)")


def resolve_config(settings: TrainSettings, champion_uri: str | None = None) -> Config:
    """The training config that every launcher runs: config + overrides, the schedule scaled to
    ``iterations``, ``model.weights`` from ``init`` and the pixel format and statistics those
    weights were trained with (unless overrides set them). Refuses frozen random layers."""
    import logging

    overrides = dict(settings.overrides)
    if settings.iterations:
        overrides["solver.max_iter"] = settings.iterations   # load_config scales the schedule with it
    cfg = load_config(settings.config, overrides)
    model = dataclasses.replace(cfg.model, weights=init_weights(settings, cfg, champion_uri))
    pixels = pixels_of(model.weights)
    if pixels and not any(k in overrides for k in PIXEL_KEYS):
        fmt, mean, std = pixels
        if (model.input_format, tuple(model.pixel_mean), tuple(model.pixel_std)) != (fmt, mean, std):
            logging.getLogger(__name__).info("%s: %s input, pixel mean %s, std %s, as %s was trained", cfg.name, fmt,
                                             list(mean), list(std), model.weights)
        model = dataclasses.replace(model, input_format=fmt, pixel_mean=mean, pixel_std=std)
    cfg = dataclasses.replace(cfg, model=model)
    check_initial_weights(cfg)
    return cfg


def settings_fingerprint(settings: TrainSettings, cfg: Config) -> str:
    """What decides the trained model besides the data: the config, and the search when there is one."""
    sweep = json.dumps(settings.sweep, sort_keys=True, default=list) if settings.sweep else ""
    chosen = "|select:last" if settings.select == "last" and cfg.solver.eval_period else ""
    return config_fingerprint(cfg) + (f"|sweep:{sweep}" if sweep else "") + chosen


def config_fingerprint(cfg: Config) -> str:
    """The config as it shapes what is learned: everything but the initial weights (a warm start
    from the champion on unchanged data learns nothing new)."""
    d = cfg.to_dict()
    d["model"].pop("weights", None)
    return json.dumps(d, sort_keys=True, default=list)


# ---- a search over the train settings (components/train/sweep.py runs it) ----------------

TRAIN_KEYS = ("config", "iterations")     # search names that are train settings, not config keys
ALGORITHMS = ("random", "grid", "bayesianoptimization", "tpe")   # the last two: Katib's suggestion services
LOCAL_ALGORITHMS = ("random", "grid")
BACKENDS = ("local", "katib")
EARLY_STOPPING = {"local": ("", "halving"), "katib": ("", "medianstop")}


@dataclass(frozen=True)
class SweepSettings:
    """Args:
        trials: how many (0: no sweep, the stage trains once).
        space: name -> list of values, or {"min", "max", "log": false, "type": "double"|"int"}.
        algorithm: random (seeded draws) or grid (the lists' product, in order; ranges need lists);
            on Katib also bayesianoptimization (scikit-optimize's Gaussian process) and tpe
            (hyperopt's Tree-structured Parzen Estimator), seeded by ``seed``.
        objective: the metric maximised (PQ, PQ_th, PQ_st, RQ ...).
        seed: the random draws' seed.
        backend: local (trials here, one by one) or katib (a Katib Experiment on the cluster).
        parallel: trials at once (katib).
        max_failed: failed trials Katib accepts before it fails the experiment.
        early_stopping: stop bad trials before their end. ``halving`` (local): successive halving;
            every trial trains to its first rung (1/eta^K of its iterations, K = floor(log_eta
            trials)), is scored there on the validation shards, and only the best 1/eta go on to
            the next rung, until the last trains to its end. ``medianstop`` (katib): Katib's median
            stopping rule on the objective each trial prints every ``report_period`` iterations
            (a trial below the median of the completed trials' first ``start_step`` reports stops).
        eta: successive halving's reduction factor (>= 2).
        report_period: medianstop: iterations between a trial's intermediate scores.
        min_trials_required / start_step: medianstop's settings (Katib's names and defaults).
    """

    trials: int = 0
    space: dict = field(default_factory=dict)
    algorithm: str = "random"
    objective: str = "PQ"
    seed: int = 0
    backend: str = "local"
    parallel: int = 2
    max_failed: int = 1
    early_stopping: str = ""
    eta: int = 3
    report_period: int = 0
    min_trials_required: int = 3
    start_step: int = 4

    def __post_init__(self):
        # KFP hands a mapping over as a protobuf Struct, whose numbers are all floats (80 -> 80.0):
        # a whole number in a list of values is an int again (an LR of 1.0 works as 1 too)
        object.__setattr__(self, "space", {
            name: [int(v) if isinstance(v, float) and v.is_integer() else v for v in spec]
            if isinstance(spec, (list, tuple)) else spec for name, spec in dict(self.space).items()})
        if self.trials < 0:
            raise ValueError("sweep.trials must be >= 0")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"sweep.algorithm must be one of {', '.join(ALGORITHMS)}, not {self.algorithm!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"sweep.backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.backend == "local" and self.algorithm not in LOCAL_ALGORITHMS:
            raise ValueError(f"sweep.algorithm {self.algorithm} runs in Katib's suggestion service: backend: katib "
                             f"(the local backend has {', '.join(LOCAL_ALGORITHMS)})")
        if self.early_stopping not in EARLY_STOPPING[self.backend]:
            raise ValueError(f"sweep.early_stopping for backend {self.backend} must be one of "
                             f"{', '.join(repr(e) for e in EARLY_STOPPING[self.backend])}, not {self.early_stopping!r}")
        if self.eta < 2:
            raise ValueError(f"sweep.eta must be >= 2, not {self.eta}")
        if self.early_stopping == "medianstop":
            if self.report_period < 1:
                raise ValueError("sweep.early_stopping=medianstop needs sweep.report_period (iterations between a "
                                 "trial's intermediate scores), e.g. 1000")
            if self.min_trials_required < 1 or self.start_step < 1:
                raise ValueError("sweep.min_trials_required and sweep.start_step must be >= 1 (Katib's medianstop)")
        if self.trials and not self.space:
            raise ValueError("sweep.space is empty: name at least one setting to search")
        for name, spec in self.space.items():
            if isinstance(spec, (list, tuple)):
                if not spec:
                    raise ValueError(f"sweep.space.{name}: an empty list")
            elif isinstance(spec, dict):
                if set(spec) - {"min", "max", "log", "type"} or "min" not in spec or "max" not in spec:
                    raise ValueError(f"sweep.space.{name}: a range is {{min, max, log, type}}, got {spec}")
                if not float(spec["min"]) < float(spec["max"]):
                    raise ValueError(f"sweep.space.{name}: min must be below max")
                if spec.get("log") and float(spec["min"]) <= 0:
                    raise ValueError(f"sweep.space.{name}: a log range needs min > 0")
                if self.algorithm == "grid":
                    raise ValueError(f"sweep.space.{name}: grid search needs lists of values, not ranges")
            else:
                raise ValueError(f"sweep.space.{name}: a list of values or a range {{min, max}}, not {spec!r}")
