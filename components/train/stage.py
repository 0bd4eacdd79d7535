"""The train stage's decisions, apart from where it logs them: which weights it starts from,
which config it trains, where the work lands, which launcher runs it, what the model's lineage
says, and (with ``train.sweep``) which trial's model it outputs.

``plan`` resolves everything before anything trains (so a log can say it, and a failure comes
early); ``train_model`` trains the plan here, with torchrun over this node's GPUs, or as a
PyTorchJob / TrainJob; ``search`` runs the sweep's trials (here, or as a Katib Experiment) and
makes the best one the plan's model; ``finish`` writes the Model artifact (model.pt, the
config, the lineage). The pipeline step (``pipeline/steps.py: step_train``) parses the settings,
calls these and logs what they return.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass

from components.common import storage
from components.common.cluster import ClusterSettings, uri_for_pods
from components.common.hashing import code_version, data_fingerprint, shard_hash
from components.common.tracking import CHAMPION, get_alias, resolve_model_uri
from components.data.records import load_index
from components.model.config import Config
from components.train.settings import TrainSettings, resolve_config, settings_fingerprint

log = logging.getLogger(__name__)
LINEAGE_FILE = "lineage.json"   # in the Model artifact, beside model.pt: what it was made from (register reads it)
CONFIG_FILE = "train_config.json"


@dataclass
class TrainPlan:
    """What the stage trains and where. ``output``: the trainer's folder (checkpoints, model.pt),
    beside the Model artifact, as a store URI every launched pod can reach; ``shards``: the
    training shards as those pods reach them; ``parent``: the registered version the weights
    come from ("" for none)."""

    settings: TrainSettings
    cfg: Config
    parent: str
    output: str
    shards: str
    index: dict
    fingerprint: str

    @property
    def config_uri(self) -> str:
        return storage.join(self.output, CONFIG_FILE)

    def lineage(self, cfg: Config | None = None, **extra) -> dict:
        return {"train_manifest_hash": self.index.get("source_manifest_hash", ""),
                "train_shards_hash": shard_hash(self.index), "data_fingerprint": self.fingerprint,
                "config": (cfg or self.cfg).name, "code_version": code_version(), "parent_model_version": self.parent,
                "init": self.settings.init, **extra}


def plan(settings: TrainSettings, *, register_name: str, train_shards: str, model_out: str,
         train_shards_uri: str = "", model_uri: str = "", mlflow_uri: str | None = None) -> TrainPlan:
    """Resolve the initial weights (``init=champion``: the champion's version, pinned; a
    ``models:/NAME@alias`` weights URI: its version, pinned), the config, and where things go.

    ``train_shards`` / ``model_out`` are this task's local paths; ``*_uri`` the same
    artifacts' store URIs (KFP's ``.uri``; default: the paths). Checkpoints go beside the Model
    artifact (``<model uri>/../checkpoints``) unless ``settings.checkpoint_uri`` says where."""
    champion_uri = parent = None
    if settings.init == "champion" and get_alias(register_name, CHAMPION, mlflow_uri) is not None:
        champion_uri, parent = resolve_model_uri(f"models:/{register_name}@{CHAMPION}", mlflow_uri)
    cfg = resolve_config(settings, champion_uri)
    if cfg.model.weights.startswith("models:/") and parent is None:   # a URI naming an alias: pin its version
        weights, parent = resolve_model_uri(cfg.model.weights, mlflow_uri)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=weights))
    output = uri_for_pods(settings.checkpoint_uri
                          or storage.join(storage.dirname(model_uri or model_out), "checkpoints"))
    index = load_index(train_shards)
    # what decide compares: the base settings (and the search), not the trial that won
    fingerprint = data_fingerprint(index.get("source_manifest_hash", ""), settings_fingerprint(settings, cfg))
    return TrainPlan(settings, cfg, parent or "", output, uri_for_pods(train_shards_uri or train_shards), index,
                     fingerprint)


def launcher(p: TrainPlan) -> str:
    """How the plan trains: "here", "torchrun" (this node's GPUs) or the job kind (several nodes)."""
    s = p.settings
    return s.launcher if s.nodes > 1 else "torchrun" if s.gpus_per_node > 1 else "here"


def train_model(p: TrainPlan, *, train_shards: str, cluster=None, env: dict | None = None, log_fn=None,
                val_shards: str = "", val_shards_uri: str = "") -> tuple[str, dict]:
    """Train the plan; returns the model.pt's URI (in ``p.output``) that ``settings.select``
    picks, and which one it is ({"checkpoint": "best" | "last", "iteration", ...}). ``env``: what
    the trainer's other processes need (MLflow's URI and run id); ``log_fn``: metrics, here;
    ``val_shards``: what ``solver.eval_period`` scores (this task's path; ``*_uri``: for pods)."""
    from components.common.settings import parse_settings

    storage.write_text(p.config_uri, json.dumps(p.cfg.to_dict(), indent=1, default=list))
    s, how = p.settings, launcher(p)
    evaluating = bool(p.cfg.solver.eval_period and val_shards)
    if how in ("pytorchjob", "trainjob"):
        from components.train.launcher import JobSpec, job_name, render_pytorchjob, render_trainjob, run_job

        cs = parse_settings(ClusterSettings, cluster, "cluster settings")
        spec = JobSpec(name=job_name(), image=s.image or cs.gpu_image, nodes=s.nodes, gpus_per_node=s.gpus_per_node,
                       shards=p.shards, output=p.output, config_uri=p.config_uri, env=env or {}, cluster=cs,
                       namespace=s.namespace or None, runtime=s.runtime,
                       val_shards=uri_for_pods(val_shards_uri or val_shards) if evaluating else "")
        run_job(render_pytorchjob(spec) if how == "pytorchjob" else render_trainjob(spec))
    elif how == "torchrun":
        import subprocess
        import sys

        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={s.gpus_per_node}",
               "-m", "components.train", "--shards", train_shards, "--output", p.output, "--config", p.config_uri,
               *(["--val-shards", val_shards] if evaluating else []), "--quiet"]
        subprocess.run(cmd, env={**os.environ, **(env or {})}, check=True)
    else:
        from components.train.trainer import train

        train(p.cfg, train_shards, p.output, device=s.device, log_fn=log_fn,
              val_shards=val_shards if evaluating else None)
    return chosen_model(p.output, s.select, p.cfg)


def chosen_model(output: str, select: str, cfg: Config) -> tuple[str, dict]:
    """(model.pt URI, what it is) for ``select`` in a trainer's output folder: the best model
    (``best/``, read back and checked: an int iteration within the run, a finite value in 0..1,
    the config's metric) or the last. ``best`` with no evaluation made is the last, said so."""
    import math

    from components.train.trainer import BEST_DIR

    last = (storage.join(output, "model.pt"), {"checkpoint": "last", "iteration": cfg.solver.max_iter})
    best_json = storage.join(output, BEST_DIR, "best.json")
    if select != "best" or not cfg.solver.eval_period or not storage.exists(best_json):
        if select == "best" and cfg.solver.eval_period:
            log.warning("train.select=best: no evaluation during training made a best model (%s); the last "
                        "iteration's model is the stage's", best_json)
        return last
    try:
        doc = json.loads(storage.read_bytes(best_json)[:1 << 20])
    except ValueError as e:
        raise ValueError(f"{best_json}: not JSON ({e}); delete {storage.join(output, BEST_DIR)} and train "
                         f"again") from None
    it, value = (doc.get("iteration"), doc.get("value")) if isinstance(doc, dict) else (None, None)
    if (not isinstance(it, int) or isinstance(it, bool) or not 1 <= it <= cfg.solver.max_iter
            or not isinstance(value, float) or not math.isfinite(value) or not 0 <= value <= 1
            or doc.get("metric") != cfg.solver.best_metric):
        raise ValueError(f"{best_json}: not a record of this run's best model ({str(doc)[:200]}); delete "
                         f"{storage.join(output, BEST_DIR)} and train again, or train.select=last")
    return storage.join(output, BEST_DIR, "model.pt"), {"checkpoint": "best", "iteration": it,
                                                        "metric": doc["metric"], "value": value}


def finish(p: TrainPlan, model: str, model_out: str, cfg: Config | None = None, **lineage) -> tuple[str, dict]:
    """The Model artifact: ``model`` copied to ``model_out/model.pt`` beside the config it was
    trained with and its lineage (``lineage`` adds to it). Returns (model.pt URI, lineage)."""
    out = storage.join(model_out, "model.pt")
    if model != out:
        storage.write_bytes(out, storage.read_bytes(model))
    doc = p.lineage(cfg, **lineage)
    storage.write_text(storage.join(model_out, LINEAGE_FILE), json.dumps(doc, indent=1))
    storage.write_text(storage.join(model_out, CONFIG_FILE), json.dumps((cfg or p.cfg).to_dict(), indent=1,
                                                                        default=list))
    return out, doc


def search(p: TrainPlan, *, train_shards: str, val_shards: str, val_shards_uri: str = "", cluster=None,
           evaluate_fn=None, ml=None, env: dict | None = None) -> tuple[str, Config, dict, dict, str]:
    """The stage as a search (``train.sweep``): trials here (``backend: local``, each a child run
    of ``ml``'s active run; ``evaluate_fn`` scores them) or a Katib Experiment (``katib``).
    Returns (the best trial's model.pt, its config, its assignment, its metrics, its name)."""
    from components.common.settings import parse_settings
    from components.train.sweep import (
        TRIAL_RECORD,
        katib_best,
        render_katib_experiment,
        run_local_sweep,
        trial_settings,
    )

    if not val_shards:
        raise ValueError("train.sweep needs the validation shards to rank its trials (val_shards)")
    s = p.settings
    sweep = s.sweep_settings()
    trials_out = storage.join(p.output, "trials")
    if sweep.backend == "local":
        best, _ = run_local_sweep(s, sweep, train_shards, val_shards, trials_out, evaluate_fn=evaluate_fn, ml=ml,
                                  device=s.device)
        assignment, model, metrics, name = best.assignment, best.model_uri, best.metrics, f"trial {best.index}"
    else:
        from components.train.launcher import job_name, run_job

        cs = parse_settings(ClusterSettings, cluster, "cluster settings")
        experiment = render_katib_experiment(
            job_name("panoptic-sweep"), sweep, s, image=s.image or cs.gpu_image, train_shards=p.shards,
            val_shards=uri_for_pods(val_shards_uri or val_shards), output=p.output, namespace=s.namespace or None,
            cluster=cs, gpus=s.gpus_per_node, env=env or {})
        status = run_job(experiment)

        def record(trial: str):
            uri = storage.join(trials_out, trial, TRIAL_RECORD)
            return json.loads(storage.read_bytes(uri)[:1 << 20]) if storage.exists(uri) else None

        name, assignment, metrics = katib_best({"metadata": experiment["metadata"], "status": status}, sweep, record)
        model = storage.join(trials_out, name, "model.pt")
        if ml is not None:
            ml.set_tags({"sweep.katib_experiment": experiment["metadata"]["name"], "sweep.best_trial": name})
    return model, resolve_config(trial_settings(s, assignment)), assignment, metrics, name
