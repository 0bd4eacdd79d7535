"""Stage 3: train Panoptic FPN on the Parquet shards, on CPU or GPU, one process or DDP.

A training loop to read top to bottom (torchvision's references/detection style), iteration
based like detectron2: SGD + momentum, linear warmup, multi-step LR, optional gradient
clipping, AMP (bf16/fp16) and channels_last on GPU. Launch with ``torchrun`` for DDP: the
process group comes from the env:// variables (gloo on CPU, nccl on GPU), same code path.

Checkpoints go to ``{output}/checkpoints/`` (local or ``s3://``) every
``solver.checkpoint_period`` iterations and when SIGTERM arrives (preemptible nodes). A run
started on the same output resumes from the latest checkpoint: model, optimizer, scheduler,
grad scaler, iteration, RNG states and data position, so a resumed run ends with the same
weights as an uninterrupted one.

With ``solver.eval_period`` and validation shards, the run scores PQ/SQ/RQ every that many
iterations and at its end (detectron2's EvalHook), logs them as step metrics (``val/PQ`` ...),
and keeps the best model by ``solver.best_metric`` in ``{output}/best/`` (``model.pt`` and
``best.json``: iteration, metric, value) beside the last (detectron2's BestCheckpointer).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import random
import re
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from components.common import faults, storage
from components.common.coco_panoptic import CategoryMaps
from components.common.devices import pick_device
from components.common.logs import progress as progress_bar
from components.data.reader import ShardDataset, collate
from components.data.records import load_index
from components.model.artifact import save_model
from components.model.config import Config
from components.model.panoptic_fpn import PanopticFPN
from components.model.weights import UnsafeCheckpointError, load_weights, refused_global

log = logging.getLogger(__name__)
CHECKPOINT_DIR = "checkpoints"
KEEP_CHECKPOINTS = 3
BEST_DIR = "best"          # {output}/best/model.pt and best.json: the best evaluation's model


@dataclass
class TrainResult:
    output: str
    model_uri: str
    iterations: int
    resumed_from: int
    preempted: bool
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)   # each evaluation during training
    best: dict | None = None                          # best.json's content, when one was kept


# -- distributed -----------------------------------------------------------------------------

def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1). Returns (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# -- optimizer and schedule ------------------------------------------------------------------

CONVNEXT_LAYERS = 6   # ConvNeXt's detection recipe: 6 layer groups between the stem and the heads


def convnext_layer(name: str) -> int:
    """A parameter's depth for layer-wise LR decay in a ConvNeXt-T (torchvision's ``features``:
    0 stem, 1/3/5/7 the stages' blocks, 2/4/6 the downsampling layers), as ConvNeXt's detection
    recipe counts it: stem 0, stage 1 1, stage 2 2, stage 3 3 + block // 3, stage 4 6, and the
    rest (the output norms, the FPN, the heads) 7. The LR factor is ``layer_decay ** (7 - depth)``."""
    parts = name.split(".")
    if parts[:3] != ["backbone", "body", "features"] or len(parts) < 5:
        return CONVNEXT_LAYERS + 1
    stage = int(parts[3])
    return {0: 0, 1: 1, 2: 2, 3: 2, 4: 3, 6: CONVNEXT_LAYERS, 7: CONVNEXT_LAYERS}.get(
        stage, 3 + int(parts[4]) // 3 if stage == 5 else CONVNEXT_LAYERS + 1)


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """The optimizer's parameter groups: each trainable parameter's weight decay (norm layers
    ``weight_decay_norm``, biases ``weight_decay_bias``, names with a ``no_decay_keys`` part 0,
    the rest ``weight_decay``) and LR factor (``backbone_lr_factor`` on ``backbone.body``, and
    ConvNeXt's layer-wise ``layer_decay``: ``convnext_layer``), one group per distinct pair, in
    the order first met. An SGD config with detectron2's defaults has its two groups (weights,
    norms) as detectron2 builds them."""
    s = cfg.solver
    norm_types = (torch.nn.GroupNorm, torch.nn.BatchNorm2d, torch.nn.LayerNorm)
    bias_decay = s.weight_decay if s.weight_decay_bias < 0 else s.weight_decay_bias
    # (LR factor, weight decay, a norm layer's): weights and norms apart even at equal decay, as before
    groups: dict[tuple, list] = {(1.0, s.weight_decay, False): [], (1.0, s.weight_decay_norm, True): []}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{module_name}.{name}" if module_name else name
            if isinstance(module, norm_types):
                decay = s.weight_decay_norm
            elif any(key in full for key in s.no_decay_keys):
                decay = 0.0
            elif name == "bias":
                decay = bias_decay
            else:
                decay = s.weight_decay
            factor = s.backbone_lr_factor if full.startswith("backbone.body.") else 1.0
            if s.layer_decay != 1.0:
                factor *= s.layer_decay ** (CONVNEXT_LAYERS + 1 - convnext_layer(full))
            groups.setdefault((factor, decay, isinstance(module, norm_types)), []).append(p)
    return [{"params": params, "weight_decay": decay, "lr": s.lr() * factor}
            for (factor, decay, _), params in groups.items() if params]


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """SGD with momentum (detectron2's) or AdamW, over ``param_groups``."""
    s = cfg.solver
    groups = param_groups(model, cfg)
    if s.optimizer == "AdamW":
        return torch.optim.AdamW(groups, lr=s.lr(), betas=tuple(s.betas))
    return torch.optim.SGD(groups, lr=s.lr(), momentum=s.momentum)


def lr_factor(it: int, cfg: Config) -> float:
    """The LR at iteration ``it`` over the base LR: linear warmup from ``warmup_factor``, then
    x``gamma`` at each step (detectron2's WarmupMultiStepLR) or a cosine from 1 to
    ``base_lr_end / lr`` over the whole run (its WarmupCosineLR)."""
    import math

    s = cfg.solver
    if s.lr_scheduler == "cosine":
        end = s.base_lr_end / s.lr() if s.lr() > 0 else 0.0
        factor = end + 0.5 * (1 - end) * (1 + math.cos(math.pi * min(it, s.max_iter) / s.max_iter))
    else:
        factor = s.gamma ** sum(1 for step in s.steps if it >= step)
    if it < s.warmup_iters:
        alpha = it / s.warmup_iters
        factor *= s.warmup_factor * (1 - alpha) + alpha
    return factor


# -- checkpoints -----------------------------------------------------------------------------

def _rng_state() -> dict:
    """The generators' states as tensors and plain data (a checkpoint loads with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": py_gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    # the generators take CPU byte tensors, wherever the checkpoint was mapped
    torch.set_rng_state(state["torch"].cpu())
    n, p = state["numpy"], state["python"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate((p["version"], tuple(int(w) for w in p["words"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])


def load_checkpoint(uri: str) -> dict:
    """A training checkpoint, read without running code (``weights_only``: tensors and plain
    data; no numpy object is admitted). Raises ``CheckpointError`` for a file that is not a
    whole checkpoint of ours (truncated, torn, someone else's)."""
    try:
        ckpt = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"{uri}: refused: this checkpoint needs {refused_global(e)} to load, which could "
                                    f"run code; delete it to start over") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"{uri}: not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    missing = [k for k in ("iteration", "model", "optimizer", "scheduler", "scaler", "rng", "config")
               if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{uri}: not a checkpoint of this trainer (no {', '.join(missing)})")
    return ckpt


def save_checkpoint(output: str, iteration: int, model, optimizer, scheduler, scaler, cfg: Config,
                    best: dict | None = None) -> str:
    buf = io.BytesIO()
    torch.save({"iteration": iteration, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state(),
                "config": json.loads(json.dumps(cfg.to_dict(), default=list)),
                **({"best": best} if best else {})}, buf)
    name = f"model_{iteration:07d}.pth"
    folder = storage.join(output, CHECKPOINT_DIR)
    storage.write_bytes(storage.join(folder, name), buf.getvalue())
    storage.write_text(storage.join(folder, "last_checkpoint"), name)  # written after the file: never dangling
    old = sorted(n for n in storage.listdir(folder) if n.startswith("model_") and n.endswith(".pth"))
    for n in old[:-KEEP_CHECKPOINTS]:
        storage.delete(storage.join(folder, n))
    return storage.join(folder, name)


CHECKPOINT_NAME = re.compile(r"model_(\d{7})\.pth")


class CheckpointError(ValueError):
    """A checkpoint the run cannot resume from; the message names it and the way out."""


def latest_checkpoint(output: str) -> str | None:
    """The checkpoint ``last_checkpoint`` names (a checkpoint file of this folder: a name that
    leaves it is refused), else the newest ``model_NNNNNNN.pth``; None when there is none."""
    candidates = checkpoint_candidates(output)
    return candidates[0] if candidates else None


def checkpoint_candidates(output: str) -> list[str]:
    """The folder's checkpoints, the one to resume from first: ``last_checkpoint``'s, then the
    others newest first. Only plain ``model_NNNNNNN.pth`` names of this folder count."""
    folder = storage.join(output, CHECKPOINT_DIR)
    if not storage.exists(folder):
        return []
    names = sorted((n for n in storage.listdir(folder) if CHECKPOINT_NAME.fullmatch(n)), reverse=True)
    marker = storage.join(folder, "last_checkpoint")
    if storage.exists(marker):
        named = storage.read_bytes(marker)[:200].decode("utf-8", "replace").strip()
        if named in names:
            names.remove(named)
            names.insert(0, named)
        elif named:
            log.warning("%s names %r, not a checkpoint of this folder: ignored (resuming from the newest one "
                        "there is)", marker, named)
    return [storage.join(folder, n) for n in names]


def resume_point(output: str) -> tuple[str, dict] | None:
    """(uri, checkpoint) to resume from: the first readable candidate. An unreadable one (a torn
    write, a truncated copy) is skipped with a warning naming it; when none is readable the run
    stops rather than start over on top of them."""
    candidates = checkpoint_candidates(output)
    bad = []
    for uri in candidates:
        try:
            ckpt = load_checkpoint(uri)
        except (CheckpointError, UnsafeCheckpointError) as e:
            log.warning("%s; resuming from an earlier checkpoint", e)
            bad.append(uri)
            continue
        if bad:
            log.warning("resuming from %s: skipped %d unreadable newer checkpoint(s): %s", uri, len(bad),
                        ", ".join(bad))
        return uri, ckpt
    if bad:
        raise CheckpointError(f"{storage.join(output, CHECKPOINT_DIR)}: none of its {len(bad)} checkpoint(s) is "
                              f"readable; delete the folder to start over (or --no-resume)")
    return None


# settings that change how a run is logged or fed, not what it learns: free to differ on resume
RESUME_FREE = ("log_period", "data.num_workers", "solver.checkpoint_period", "solver.eval_period", "model.weights",
               "solver.max_iter")   # running on (or stopping earlier) is what a resume is for
# what a run's length decides (components/model/config.py: with_length): free when the length changed
LENGTH_DERIVED = ("solver.steps", "solver.warmup_iters", "solver.checkpoint_period")


def config_changes(saved: dict, cfg: Config) -> dict[str, tuple]:
    """{key: (checkpoint's value, this run's)} of the settings that differ from the checkpoint's."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = json.loads(json.dumps(v, default=list))
        return out

    old, new = flat(saved), flat(json.loads(json.dumps(cfg.to_dict(), default=list)))
    free = RESUME_FREE
    if old.get("solver.max_iter") != new.get("solver.max_iter"):
        # a run resumed longer (or shorter): its schedule follows the new length (with_length), as
        # a fresh run of that length would have it
        free += LENGTH_DERIVED
        moved = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in LENGTH_DERIVED if old.get(k) != new.get(k)]
        if moved:
            log.info("resumed to %s iterations (from %s): the schedule follows the length (%s)",
                     new.get("solver.max_iter"), old.get("solver.max_iter"), "; ".join(moved))
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and k not in free}


# -- evaluation during training -------------------------------------------------------------

def best_so_far(ckpt: dict | None, metric: str, uri: str = "") -> dict | None:
    """The best evaluation a checkpoint recorded ({"iteration", "metric", "value"}), checked
    (a checkpoint is a file: an int iteration, a finite value in 0..1, the same metric), or None."""
    import math

    best = (ckpt or {}).get("best")
    if best is None:
        return None
    it, value = (best.get("iteration"), best.get("value")) if isinstance(best, dict) else (None, None)
    if (not isinstance(it, int) or isinstance(it, bool) or it < 1 or not isinstance(value, float)
            or not math.isfinite(value) or not 0 <= value <= 1 or best.get("metric") != metric):
        log.warning("%s: its record of the best evaluation (%r) is not one of this run's; the best is chosen "
                    "afresh from the evaluations that follow", uri, str(best)[:200])
        return None
    return {"iteration": it, "metric": metric, "value": value}


def _evaluate_during_training(model, rows, categories, cfg: Config, done: int, rank: int, world: int) -> dict:
    """One evaluation: the record logged and kept in train_metrics.json. The global random
    generators are put back as they were, so a run with evaluations trains the same weights as
    one without."""
    from components.common.metrics import summary_metrics
    from components.model.scoring import score_in_memory

    state = _rng_state()
    t0 = time.perf_counter()
    try:
        results, n = score_in_memory(model, rows, categories, cfg.input, max_images=cfg.solver.eval_images,
                                     rank=rank, world=world)
    finally:
        _set_rng_state(state)
    return {"iter": done, **{f"val/{k}": v for k, v in summary_metrics(results).items()}, "val/images": n,
            "val/eval_s": time.perf_counter() - t0, "_results": results}


def _keep_if_best(output: str, record: dict, best: dict | None, model, cfg: Config, categories) -> dict | None:
    """Write ``{output}/best/`` when ``record`` beats ``best`` (strictly; a non-finite value
    never does). Returns the best after it."""
    import math

    metric = cfg.solver.best_metric
    value = float(record[f"val/{metric}"])
    if not math.isfinite(value) or (best is not None and value <= best["value"]):
        return best
    folder = storage.join(output, BEST_DIR)
    save_model(model, cfg, categories, storage.join(folder, "model.pt"))
    best = {"iteration": record["iter"], "metric": metric, "value": value}
    storage.write_text(storage.join(folder, "best.json"),   # after the model: never names a missing one
                       json.dumps({**best, "metrics": {k[4:]: v for k, v in record.items()
                                                       if k.startswith("val/")}}, indent=1))
    return best


# -- the loop --------------------------------------------------------------------------------

class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each iteration."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. under some launchers): no handler
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _reduce_losses(losses: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    names = sorted(losses)
    values = torch.stack([losses[k].detach().float() for k in names])
    if world > 1:
        dist.all_reduce(values)
        values /= world
    return dict(zip(names, values.tolist()))


def train(cfg: Config, shards: str, output: str, *, device: str | None = None, resume: bool = True,
          stop_after: int | None = None, progress: bool = True, log_fn=None,
          allow_config_change: bool = False, val_shards: str | None = None, eval_at: tuple = ()) -> TrainResult:
    """Train on ``shards`` (a preprocess output folder) and write checkpoints + ``model.pt`` to ``output``.

    Args:
        cfg: the configuration (``load_config``).
        shards: shard folder with ``index.json``, local or ``s3://``.
        output: folder for checkpoints, ``model.pt`` and ``train_metrics.json``, local or ``s3://``.
        device: "cpu", "cuda", "cuda:1" or None/"auto".
        resume: continue from the latest checkpoint in ``output`` if there is one.
        stop_after: stop (as if preempted, with a checkpoint) after this many iterations in total.
        log_fn: called with (metrics dict, iteration) every ``log_period`` iterations (MLflow).
        allow_config_change: resume although ``cfg`` differs from the checkpoint's config (the
            changes are logged); without it such a resume is refused, naming the keys.
        val_shards: the validation shards ``solver.eval_period`` evaluates on (None: no
            evaluation during training; with a period set, a warning says so).
        eval_at: iterations to evaluate at besides the period's (a sweep's rungs).
    """
    dev = pick_device(device)
    rank, world = init_distributed(dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    s = cfg.solver
    if s.ims_per_batch % world:
        raise ValueError(f"solver.ims_per_batch {s.ims_per_batch} is not divisible by the {world} processes")
    per_rank = s.ims_per_batch // world

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    index = load_index(shards)
    categories = CategoryMaps.from_json(index["categories"])
    model = PanopticFPN.from_config(cfg, categories).to(dev)
    if s.channels_last and dev.type == "cuda" and not model.use_channels_last():
        log.info("solver.channels_last: backbone %s gains nothing from it; left as is", cfg.model.backbone)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))
    use_amp = s.amp != "off" and dev.type == "cuda"
    amp_dtype = torch.bfloat16 if s.amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and s.amp == "fp16")

    start = 0
    # loaded on the CPU: load_state_dict copies into the model's and optimizer's devices, and
    # the RNG states must stay CPU tensors (a GPU map broke resume on CUDA)
    point = resume_point(output) if resume else None
    ckpt_uri, ckpt = point if point else (None, None)
    if ckpt_uri:
        changes = config_changes(ckpt["config"], cfg)
        if changes:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:12])
            if not allow_config_change:
                raise CheckpointError(f"{ckpt_uri}: this run's config differs from the checkpoint's ({listed}); resume "
                                      f"with the checkpoint's config, train into another --output, or allow it "
                                      f"(--allow-config-change)")
            if "solver.optimizer" in changes:
                raise CheckpointError(f"{ckpt_uri}: solver.optimizer changed ({listed}): an optimizer's state does "
                                      f"not carry over to another; train into another --output")
            log.warning("resuming %s with a changed config: %s", ckpt_uri, listed)
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{ckpt_uri}: does not fit this model ({str(e).splitlines()[0][:300]}); train "
                                  f"into another --output") from None
        start = int(ckpt["iteration"])
        if changes:   # the restored optimizer and scheduler carry the checkpoint's LR, decay, momentum: this run's
            fresh = build_optimizer(model, cfg).param_groups
            for group, new in zip(optimizer.param_groups, fresh):
                group.update({k: v for k, v in new.items() if k != "params"}, initial_lr=new["lr"])
            scheduler.base_lrs = [g["lr"] for g in fresh]
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base * lr_factor(start, cfg)
    elif cfg.model.weights:
        load_weights(model, cfg.model.weights, categories)

    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=True)

    dataset = ShardDataset(shards, categories, cfg.input, train=True, infinite=True, seed=cfg.seed,
                           shuffle_buffer=cfg.data.shuffle_buffer, rank=rank, world_size=world)
    dataset.resume_after(start, per_rank)
    loader = DataLoader(dataset, batch_size=per_rank, num_workers=cfg.data.num_workers, collate_fn=collate,
                        pin_memory=dev.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed),
                        persistent_workers=False)
    batches = iter(loader)
    if ckpt_uri:
        _set_rng_state(ckpt["rng"])  # after the loader's iterator exists: it draws no global randomness later

    history: list[dict] = []
    evals: list[dict] = []
    metrics_uri = storage.join(output, "train_metrics.json")
    if start and storage.exists(metrics_uri):
        saved = json.loads(storage.read_text(metrics_uri))
        history = [h for h in saved["history"] if h["iter"] <= start]
        evals = [e for e in saved.get("evals", []) if e["iter"] <= start]
    eval_rows = None
    if (s.eval_period or eval_at) and val_shards:
        eval_rows = ShardDataset(val_shards, categories, cfg.input, train=False, with_gt=True, raw=True, rank=0,
                                 world_size=1)
    elif s.eval_period and not rank:
        log.warning("solver.eval_period is %d but no validation shards were given (--val-shards): no "
                    "evaluation during training, no best checkpoint", s.eval_period)
    best = best_so_far(ckpt, s.best_metric, ckpt_uri or "") if ckpt_uri else None
    if eval_rows is not None and not start and rank == 0:   # a run started over: an old run's best is no rival
        for name in ("best.json", "model.pt"):
            if storage.exists(storage.join(output, BEST_DIR, name)):
                storage.delete(storage.join(output, BEST_DIR, name))
    last_eval = None
    end = min(s.max_iter, stop_after) if stop_after else s.max_iter
    preempted = False
    done = start
    bar = progress_bar(total=s.max_iter, initial=start, desc=f"train {cfg.name}", unit="it",
                       enabled=progress and not rank)
    t_last, it_last = time.perf_counter(), start
    model.train()
    # the first iteration whose loss was not finite, kept on the device (-1: none) and read only
    # when the loop syncs anyway (logging, checkpoints, the end): no host sync per step
    nonfinite_at = torch.full((), -1, dtype=torch.int64, device=dev)
    with _Preemption() as preemption:
        for it in range(start, end):
            batch = next(batches)
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
                losses = ddp_model(batch)
            loss = sum(losses.values())
            nonfinite_at = torch.where((nonfinite_at < 0) & ~torch.isfinite(loss.detach()), it + 1, nonfinite_at)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if s.clip_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            done = it + 1
            bar.update(1)
            faults.point("train.iteration")

            check = (done % cfg.log_period == 0 or done == end or done % s.checkpoint_period == 0
                     or (world == 1 and preemption.requested))
            if check:
                first_bad = int(nonfinite_at)
                if first_bad >= 0:   # before any checkpoint or record of what followed it
                    raise FloatingPointError(f"the loss stopped being finite at iteration {first_bad} (losses at "
                                             f"{done}: {_reduce_losses(losses, 1)}); lower solver.base_lr or enable "
                                             f"solver.clip_grad_norm")
            if done % cfg.log_period == 0 or done == end:
                values = _reduce_losses(losses, world)
                now = time.perf_counter()
                record = {"iter": done, "total_loss": sum(values.values()), **values,
                          "lr": optimizer.param_groups[0]["lr"],
                          "images_per_s": (done - it_last) * s.ims_per_batch / max(now - t_last, 1e-9)}
                if dev.type == "cuda":
                    record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
                t_last, it_last = now, done
                history.append(record)
                bar.set_postfix(loss=f"{record['total_loss']:.3f}", lr=f"{record['lr']:.4f}",
                                **{"img/s": f"{record['images_per_s']:.1f}"})
                if rank == 0 and log_fn:
                    log_fn(record, done)
            if eval_rows is not None and (done in eval_at or (s.eval_period and (done % s.eval_period == 0
                                                                              or done == s.max_iter))):
                record = _evaluate_during_training(model, eval_rows, categories, cfg, done, rank, world)
                last_eval = record.pop("_results")
                if rank == 0:
                    best = _keep_if_best(output, record, best, model, cfg, categories)
                    record["best"] = best["iteration"] == done if best else False
                evals.append(record)
                log.info("iteration %d: PQ %.2f SQ %.2f RQ %.2f on %d validation images (%.1f s)%s", done,
                         100 * record["val/PQ"], 100 * record["val/SQ"], 100 * record["val/RQ"],
                         record["val/images"], record["val/eval_s"],
                         f"; best {s.best_metric} so far" if record.get("best") else "")
                if rank == 0 and log_fn:
                    log_fn({k: v for k, v in record.items() if k.startswith("val/")}, done)
            stop_now = preemption.requested or done == end
            if world > 1:  # every rank must agree to stop (SIGTERM may reach one first): agreed at the
                stop_now = done == end   # loop's sync points only, not with a collective every step
                if check:
                    flag = torch.tensor([float(preemption.requested)], device=dev)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    stop_now = stop_now or bool(flag.item())
            if (done % s.checkpoint_period == 0 or stop_now) and rank == 0:
                save_checkpoint(output, done, model, optimizer, scheduler, scaler, cfg, best)
                storage.write_text(metrics_uri, json.dumps({"history": history, "evals": evals}, indent=1))
            if stop_now:
                preempted = done < s.max_iter
                break
    bar.close()
    model_uri = storage.join(output, "model.pt")
    if rank == 0 and not preempted:
        save_model(model, cfg, categories, model_uri)
        doc = {"history": history, "evals": evals}
        if last_eval is not None:   # the last evaluation's per-class figures (the evaluate stage has them all)
            doc["last_eval_per_class"] = {str(k): v for k, v in last_eval["per_class"].items()}
        storage.write_text(metrics_uri, json.dumps(doc, indent=1))
    if world > 1:
        dist.barrier()
    return TrainResult(output=output, model_uri=model_uri, iterations=done, resumed_from=start,
                       preempted=preempted, history=history, evals=evals, best=best)
