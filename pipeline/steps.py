"""The pipeline's steps as plain functions: a stage core + its MLflow logging.

The KFP components in ``pipeline/components.py`` are thin wrappers over these, so the same
code runs under kfp.local, on a cluster, and in tests without KFP. Each step takes its stage's
settings as one mapping (parsed by the stage's settings dataclass); all MLflow calls go
through ``components.common.tracking``.
"""

from __future__ import annotations

import json
import logging
import os

from components.common import storage
from components.common.hashing import shard_hash
from components.common.logs import setup_logging
from components.common.settings import parse_settings, settings_dict
from components.common.tracking import CHAMPION, get_alias, log_parent, stage_run, start_pipeline_run

log = logging.getLogger(__name__)



def _mark(run_id: str | None, task: str, state: str, mlflow_uri: str) -> None:
    """The task's state on the pipeline run (tag ``task.<name>``): a task still "running" when
    the pipeline ends died there (killed, evicted, out of memory); ``step_finalize`` names it."""
    log_parent(run_id or None, tags={f"task.{task}": state}, uri=mlflow_uri or None)


ERROR_TAG = "task_error."   # + the task's name: the one line its error is, for the user (errors.one_line)


def task(name: str):
    """A step's state on the pipeline run: "running" as it starts, "succeeded" or "failed" as it
    ends (a kill leaves "running"). A failure that is the input's or the environment's fault (a
    full disk, a server that refused) is also said as one line, ``panoptic: task NAME failed:
    LINE``, in the task's log and on the pipeline run (tag ``task_error.NAME``), so whoever runs
    the pipeline reads why without the traceback KFP's executor prints."""
    import functools
    import sys

    from components.common.errors import one_line

    def wrap(fn):
        @functools.wraps(fn)
        def run(**kwargs):
            run_id, uri = kwargs.get("run_id") or None, kwargs.get("mlflow_uri") or ""
            _mark(run_id, name, "running", uri)
            try:
                out = fn(**kwargs)
            except BaseException as e:
                line = one_line(e) if isinstance(e, Exception) else None
                if line:
                    print(f"panoptic: task {name} failed: {line}", file=sys.stderr, flush=True)
                try:   # one write: the state and, when there is one, why
                    log_parent(run_id, tags={f"task.{name}": "failed", **({ERROR_TAG + name: line[:5000]} if line
                                                                          else {})}, uri=uri or None)
                except Exception:   # the store itself may be what failed: the error below says so
                    pass
                raise
            _mark(run_id, name, "succeeded", uri)
            return out
        return run
    return wrap


def _flat(prefix: str, d: dict) -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(key + ".", v))
        else:
            out[key] = v if not isinstance(v, (list, tuple)) else json.dumps(list(v))
    return out


def _log_file(ml, uri: str, artifact_path: str) -> None:
    """Log a (local or s3://) file as an MLflow artifact."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, os.path.basename(uri))
        with open(path, "wb") as f:
            f.write(storage.read_bytes(uri))
        ml.log_artifact(path, artifact_path)


def _manifest_hash(uri: str) -> str:
    from components.common.manifests import load_manifest

    return load_manifest(uri)["manifest_hash"]


def _config_name(train) -> str:
    """The config a pipeline run trains (its MLflow name shows it), from the train settings."""
    from components.train.settings import TrainSettings

    config = parse_settings(TrainSettings, train, "train settings").config
    return os.path.splitext(os.path.basename(config))[0] if config.endswith((".yaml", ".yml")) else config


def step_subset(*, data_uri: str, train_out: str, val_out: str, settings=None, train=None, mlflow_uri: str = "",
                experiment: str = "", run_name: str = "", kfp_run_id: str = "", kfp_run_name: str = "",
                kfp_ui: str = "", mlflow_run_id: str = "", link_out: str = "") -> str:
    """Select the train and val subsets; open the pipeline's MLflow run (named ``panoptic-fpn
    <config> <date time>`` unless ``run_name`` is given): ``mlflow_run_id`` when ``submit``
    created it, else the one tagged with ``kfp_run_id`` (a retry of this task), else a new one.
    The run carries the KFP run's id, name and address; ``link_out`` gets the MLflow run's
    address as Markdown (the task's artifact in KFP's UI). Returns the MLflow run's id."""
    setup_logging()
    from components.common.tracking import pipeline_run_name
    from components.select_subset.core import SubsetSettings

    s = parse_settings(SubsetSettings, settings, "subset settings")
    params = {"data_uri": data_uri, **{f"subset.{k}": v for k, v in _flat("", settings_dict(s)).items()}}
    name = run_name or pipeline_run_name(_config_name(train))
    kfp = kfp_tags(kfp_run_id, kfp_run_name, kfp_ui)
    run_id = (_adopt(mlflow_run_id, mlflow_uri, kfp) if mlflow_run_id else
              start_pipeline_run(mlflow_uri or None, experiment or None, name, tags=kfp, kfp_run_id=kfp_run_id))
    if link_out:
        write_link(link_out, run_id, mlflow_uri, kfp)
    _subset(run_id=run_id, mlflow_uri=mlflow_uri, params=params, cfg=s, data_uri=data_uri, train_out=train_out,
            val_out=val_out, experiment=experiment)
    return run_id


@task("select-subset")
def _subset(*, run_id: str, mlflow_uri: str, params: dict, cfg, data_uri: str, train_out: str, val_out: str,
            experiment: str) -> None:
    from components.common.datasets import TRAINING, VALIDATION, log_datasets, log_datasets_to, subset_dataset
    from components.select_subset.core import select_subset

    s = cfg
    log_parent(run_id, params=params, uri=mlflow_uri or None)
    train_subset = select_subset(s.train_config(), data_uri, s.train_split, train_out)
    val = select_subset(s.val_config(), data_uri, s.val_split, val_out)
    datasets = [(subset_dataset(train_subset.manifest), TRAINING), (subset_dataset(val.manifest), VALIDATION)]
    with stage_run("subset", run_id, mlflow_uri or None, experiment or None) as ml:
        ml.log_params(params)
        ml.log_metrics({"train_images": len(train_subset.image_ids), "val_images": len(val.image_ids)})
        ml.set_tags({"lineage.manifest_hash": train_subset.manifest["manifest_hash"],
                     "lineage.val_manifest_hash": val.manifest["manifest_hash"]})
        log_datasets(ml, datasets)
        for name in ("manifest.json", "category_histogram.csv", "category_histogram.png"):
            _log_file(ml, storage.join(train_out, name), "subset/train")
        _log_file(ml, storage.join(val_out, "manifest.json"), "subset/val")
        log_datasets_to(ml.MlflowClient(), run_id, datasets)
    log_parent(run_id, tags={"lineage.manifest_hash": train_subset.manifest["manifest_hash"],
                             "lineage.val_manifest_hash": val.manifest["manifest_hash"]}, uri=mlflow_uri or None)


def kfp_tags(kfp_run_id: str, kfp_run_name: str, kfp_ui: str) -> dict:
    """The KFP run's identity as MLflow tags: ``kfp.run_id``, ``kfp.run_name``, ``kfp.run_url``."""
    tags = {k: v for k, v in (("kfp.run_id", kfp_run_id), ("kfp.run_name", kfp_run_name)) if v}
    if kfp_run_id and kfp_ui:
        tags["kfp.run_url"] = f"{kfp_ui.rstrip('/')}/#/runs/details/{kfp_run_id}"
    return tags


def _adopt(run_id: str, mlflow_uri: str, tags: dict) -> str:
    """The pipeline run ``submit`` created for this KFP run: it must exist and be one."""
    from mlflow.tracking import MlflowClient

    from components.common.tracking import PIPELINE_TAG, tracking_uri

    client = MlflowClient(tracking_uri(mlflow_uri or None))
    run = client.get_run(run_id)
    if run.data.tags.get(PIPELINE_TAG) != "pipeline":
        raise ValueError(f"mlflow_run_id {run_id} is not a pipeline run of {tracking_uri(mlflow_uri or None)}: "
                         f"leave mlflow_run_id empty and the first task creates one")
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    return run_id


def write_link(path: str, run_id: str, mlflow_uri: str, kfp: dict | None = None, extra: str = "") -> str:
    """The MLflow run's address as Markdown (a KFP Markdown artifact, shown in the task's pane)."""
    from mlflow.tracking import MlflowClient

    from components.common.tracking import run_address, tracking_uri

    run = MlflowClient(tracking_uri(mlflow_uri or None)).get_run(run_id)
    url = run_address(run_id, run.info.experiment_id, mlflow_uri or None)
    lines = [f"# MLflow run: [{run.info.run_name}]({url})", "",
             f"- tracking URI: `{tracking_uri(mlflow_uri or None)}`", f"- run id: `{run_id}`",
             f"- status: {run.info.status}"]
    if kfp and kfp.get("kfp.run_id"):
        lines.append(f"- KFP run id (MLflow tag `kfp.run_id`): `{kfp['kfp.run_id']}`")
    text = "\n".join(lines) + ("\n\n" + extra if extra else "") + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return url


@task("decide")
def step_decide(*, train_manifest: str, train=None, register=None, force: bool = False, run_id: str = "",
                mlflow_uri: str = "") -> str:
    """"train", or "skip" when the champion was trained on this very data, config and code
    (and ``force`` is off). A registry failure fails the step: it never decides by default."""
    setup_logging()
    from components.common.hashing import data_fingerprint
    from components.register.core import RegisterSettings
    from components.train.settings import TrainSettings, resolve_config, settings_fingerprint

    ts = parse_settings(TrainSettings, train, "train settings")
    rs = parse_settings(RegisterSettings, register, "register settings")
    fingerprint = data_fingerprint(_manifest_hash(train_manifest), settings_fingerprint(ts, resolve_config(ts)))
    champion = get_alias(rs.name, CHAMPION, mlflow_uri or None)
    if force:
        decision, reason = "train", "forced"
    elif champion is None:
        decision, reason = "train", "no champion yet"
    elif champion.tags.get("data_fingerprint") == fingerprint:
        decision = "skip"
        reason = (f"nothing new: champion {rs.name} version {champion.version} was trained on the same data, "
                  f"config and code (fingerprint {fingerprint[:12]})")
    else:
        decision = "train"
        reason = (f"new training data, config or code (fingerprint {fingerprint[:12]}, champion version "
                  f"{champion.version}: {champion.tags.get('data_fingerprint', 'none')[:12]})")
    with stage_run("decide", run_id or None, mlflow_uri or None) as ml:
        ml.set_tags({"decision": decision, "decision.reason": reason, "lineage.data_fingerprint": fingerprint})
    log_parent(run_id or None, tags={"decision": decision, "decision.reason": reason,
                                     "lineage.data_fingerprint": fingerprint}, uri=mlflow_uri or None)
    log.info("decide: %s (%s)", decision, reason)
    return decision


def _log_data(ml, index: dict, shards_uri: str, context: str, parent_run_id: str | None = None) -> None:
    """The subset a shard folder was made from and the shards themselves, as MLflow dataset
    inputs of the active stage run (and of the pipeline run, for the shards it adds)."""
    from components.common.datasets import log_datasets, log_datasets_to, shards_dataset, subset_dataset_of_index

    log_datasets(ml, [(subset_dataset_of_index(index), context), (shards_dataset(index, shards_uri), context)])
    if parent_run_id:
        log_datasets_to(ml.MlflowClient(), parent_run_id, [(shards_dataset(index, shards_uri), context)])


def step_preprocess(*, data_uri: str, subset=None, train_manifest_hash: str, val_manifest_hash: str, train_out: str,
                    val_out: str, settings=None) -> dict:
    """Parquet shards of the subsets ``select_subset`` chose, without MLflow (``step_log_shards``
    logs them): the task's inputs are the data's address, the subset and preprocess settings and
    the manifests' hashes, all values, so KFP's cache (keyed on them) reuses the shards when they
    repeat. The subsets are chosen again here (deterministic) and must hash as given."""
    setup_logging()
    import tempfile

    from components.preprocess.core import PreprocessSettings, preprocess
    from components.select_subset.core import SubsetSettings, select_subset

    s = parse_settings(SubsetSettings, subset, "subset settings")
    cfg = parse_settings(PreprocessSettings, settings, "preprocess settings")
    out = {}
    with tempfile.TemporaryDirectory(prefix="panoptic-subset-") as tmp:
        for name, split_cfg, split, expected, folder in (
                ("train", s.train_config(), s.train_split, train_manifest_hash, train_out),
                ("val", s.val_config(), s.val_split, val_manifest_hash, val_out)):
            chosen = select_subset(split_cfg, data_uri, split, os.path.join(tmp, name))
            if chosen.manifest["manifest_hash"] != expected:
                raise RuntimeError(f"{data_uri} ({split}) changed since select_subset ran: its subset hashes "
                                   f"{chosen.manifest['manifest_hash'][:12]}, not {expected[:12]}; run the "
                                   f"pipeline again")
            r = preprocess(cfg, os.path.join(tmp, name, "manifest.json"), folder, progress=False)
            out[name] = {"rows": r.rows_written, "quarantined": r.quarantined}
    return out


@task("log-shards")
def step_log_shards(*, train_shards: str, val_shards: str, run_id: str = "", mlflow_uri: str = "") -> dict:
    """The preprocess stage's MLflow run (counts, shards as datasets, index and quarantine
    files), from the shards it wrote: apart from ``step_preprocess``, so that one can be cached."""
    setup_logging()
    from components.common.datasets import TRAINING, VALIDATION
    from components.data.records import load_index

    out = {}
    with stage_run("preprocess", run_id or None, mlflow_uri or None) as ml:
        for name, folder in (("train", train_shards), ("val", val_shards)):
            index = load_index(folder)
            if name == "train":
                ml.log_params({k: v for k, v in index["params"].items() if v is not None})
            _log_data(ml, index, folder, TRAINING if name == "train" else VALIDATION, run_id)
            ml.log_metrics({f"{name}_rows": index["rows_written"], f"{name}_quarantined": index["quarantined"],
                            f"{name}_shards": len(index["shards"])})
            ml.set_tag(f"lineage.{name}_shards_hash", shard_hash(index))
            _log_file(ml, storage.join(folder, "index.json"), f"preprocess/{name}")
            _log_file(ml, storage.join(folder, "quarantine.jsonl"), f"preprocess/{name}")
            out[name] = {"rows": index["rows_written"], "quarantined": index["quarantined"],
                         "shards_hash": shard_hash(index)}
    log_parent(run_id or None, tags={"lineage.shards_hash": out["train"]["shards_hash"]},
               metrics={"train_rows": out["train"]["rows"], "quarantined": out["train"]["quarantined"]},
               uri=mlflow_uri or None)
    return out


@task("train")
def step_train(*, train_shards: str, model_out: str, settings=None, cluster=None, register=None,
               run_id: str = "", mlflow_uri: str = "", val_shards: str = "", train_shards_uri: str = "",
               val_shards_uri: str = "", model_uri: str = "") -> str:
    """The train stage (``components/train/stage.py`` decides; this logs): one config trained here,
    with torchrun over this node's GPUs, or as a PyTorchJob / TrainJob; with ``train.sweep``, the
    trials (ranked on ``val_shards``) and the best one's model. Returns the Model artifact's
    model.pt URI. ``*_uri``: the artifacts' store URIs (KFP's ``.uri``), which launched pods get;
    the paths are this task's local copies."""
    setup_logging()
    from components.register.core import RegisterSettings
    from components.train import stage
    from components.train.settings import TrainSettings

    ts = parse_settings(TrainSettings, settings, "train settings")
    name = parse_settings(RegisterSettings, register, "register settings").name
    plan = stage.plan(ts, register_name=name, train_shards=train_shards, model_out=model_out,
                      train_shards_uri=train_shards_uri, model_uri=model_uri, mlflow_uri=mlflow_uri or None)
    log.info("train: %s, %d iterations at batch %d, %s (%s)%s", plan.cfg.name, plan.cfg.solver.max_iter,
             plan.cfg.solver.ims_per_batch, stage.launcher(plan), ts.init,
             f", weights of {plan.parent}" if plan.parent else "")
    with stage_run("train", run_id or None, mlflow_uri or None, system_metrics=True) as ml:
        _log_data(ml, plan.index, train_shards, "training")
        env = {"MLFLOW_TRACKING_URI": mlflow_uri, "MLFLOW_RUN_ID": ml.active_run().info.run_id} if mlflow_uri else {}
        if ts.sweep:
            sweep = ts.sweep_settings()
            ml.log_params({"sweep.trials": sweep.trials, "sweep.algorithm": sweep.algorithm,
                           "sweep.backend": sweep.backend, "sweep.objective": sweep.objective,
                           "sweep.space": json.dumps(sweep.space, sort_keys=True), "config": plan.cfg.name,
                           "init": ts.init})
            model, cfg, assignment, metrics, winner = stage.search(
                plan, train_shards=train_shards, val_shards=val_shards, val_shards_uri=val_shards_uri,
                cluster=cluster, evaluate_fn=evaluate_trial, ml=ml,
                env={"MLFLOW_TRACKING_URI": mlflow_uri} if mlflow_uri else {})
            out, lineage = stage.finish(plan, model, model_out, cfg, sweep_best=json.dumps(assignment, sort_keys=True),
                                        **{f"sweep_best_{sweep.objective}": f"{metrics[sweep.objective]:.6f}"})
            log.info("sweep: best trial %s (%s %.4f)", lineage["sweep_best"], sweep.objective,
                     metrics[sweep.objective])
            parent = {"tags": {"sweep.best": lineage["sweep_best"]}, "params": {"sweep.trials": sweep.trials},
                      "name": (plan.cfg.name, cfg.name, winner)}
        else:
            cfg = plan.cfg
            ml.log_params({k: v for k, v in _flat("", cfg.to_dict()).items() if len(str(v)) < 500})
            ml.log_params({"init": ts.init, "nodes": ts.nodes, "gpus_per_node": ts.gpus_per_node})

            def log_metrics(metrics, step):   # losses as train/..., evaluations under their own val/...
                ml.log_metrics({k if "/" in k else f"train/{k}": float(v) for k, v in metrics.items() if k != "iter"},
                               step=step)

            model, chosen = stage.train_model(plan, train_shards=train_shards, cluster=cluster, env=env,
                                              log_fn=log_metrics, val_shards=val_shards, val_shards_uri=val_shards_uri)
            out, lineage = stage.finish(plan, model, model_out, **{f"model_{k}": str(v) for k, v in chosen.items()})
            value = f", {chosen['metric']} {100 * chosen['value']:.2f}" if "value" in chosen else ""
            log.info("train: the stage's model is the %s one (iteration %s%s)", chosen["checkpoint"],
                     chosen["iteration"], value)
            if storage.exists(storage.join(plan.output, "train_metrics.json")):
                _log_file(ml, storage.join(plan.output, "train_metrics.json"), "train")
            parent = {"tags": {}, "params": {"nodes": ts.nodes}}
        ml.set_tags({f"lineage.{k}": v for k, v in lineage.items()})
        _log_file(ml, storage.join(model_out, stage.CONFIG_FILE), "train")
    log_parent(run_id or None, params={"config": cfg.name, "iterations": cfg.solver.max_iter,
                                       "batch": cfg.solver.ims_per_batch, "init": ts.init, **parent["params"]},
               tags={"lineage.parent_model_version": plan.parent, **parent["tags"]}, uri=mlflow_uri or None)
    if "name" in parent and run_id:   # the pipeline run is called after what won, not the base config
        _rename_run(run_id, *parent["name"], mlflow_uri or None)
    return out


def _rename_run(run_id: str, base: str, won: str, trial: str, uri: str | None) -> None:
    from mlflow.tracking import MlflowClient

    from components.common.tracking import tracking_uri

    client = MlflowClient(tracking_uri(uri))
    name = client.get_run(run_id).info.run_name or ""
    new = (name.replace(f" {base} ", f" {won} ", 1) if f" {base} " in name else name) + f" · sweep: {trial} won"
    client.update_run(run_id, name=new)


def evaluate_trial(model_uri: str, val_shards: str, out: str) -> dict:
    """A sweep trial's score: the evaluate stage on the validation shards, without a report."""
    from components.evaluate.core import evaluate
    from components.evaluate.settings import EvaluateSettings

    return evaluate(model_uri, val_shards, out, EvaluateSettings(report_samples=0), progress=False).metrics


@task("evaluate")
def step_evaluate(*, model_uri: str, val_shards: str, out: str, settings=None, run_id: str = "",
                  mlflow_uri: str = "") -> dict:
    setup_logging()
    from components.common.metrics import METRIC_KEYS
    from components.data.records import load_index
    from components.evaluate.coco_ap import metric_names
    from components.evaluate.core import EvaluateSettings, evaluate
    from components.evaluate.tables import PER_CLASS_TABLE, per_class_table

    cfg = parse_settings(EvaluateSettings, settings, "evaluate settings")
    with stage_run("evaluate", run_id or None, mlflow_uri or None, system_metrics=True) as ml:
        _log_data(ml, load_index(val_shards), val_shards, "validation")
        r = evaluate(model_uri, val_shards, out, cfg, progress=False)
        ml.log_metrics({k: r.metrics[k] for k in METRIC_KEYS})
        ml.log_metrics({k: r.metrics[k] for k in metric_names() if r.metrics.get(k) is not None})   # COCO AP
        ml.log_metrics({"eval_images_per_s": r.metrics["timing"]["images_per_s_inference"],
                        "pq_overhead_vs_inference": r.metrics["timing"]["pq_overhead_vs_inference"]})
        index = load_index(val_shards)
        ml.log_table(per_class_table(r.metrics["results"], index["categories"]), PER_CLASS_TABLE)
        for name in ("metrics.json", "per_class.csv", "report.html"):
            _log_file(ml, storage.join(out, name), "evaluate")
    # where this run's report lies (run-local prints it: the run's own, not the newest file around)
    log_parent(run_id or None, metrics={k: r.metrics[k] for k in METRIC_KEYS},
               tags={"panoptic.report": storage.join(out, "report.html")}, uri=mlflow_uri or None)
    return r.metrics


@task("score-champion")
def step_score_champion(*, val_shards: str, out: str, settings=None, register=None, run_id: str = "",
                        mlflow_uri: str = "") -> str:
    """The champion's metrics on *these* validation shards, in ``out/champion.json``: the ones it
    was registered with when it was measured on the same validation manifest, else a fresh
    evaluation of its model here. Returns "none", "logged" or "re-scored"."""
    setup_logging()
    from components.common.hashing import samples_digest
    from components.data.records import load_index, shard_image_ids
    from components.evaluate.core import EvaluateSettings
    from components.register.core import RegisterSettings, champion_metrics

    name = parse_settings(RegisterSettings, register, "register settings").name
    max_images = parse_settings(EvaluateSettings, settings, "evaluate settings").max_images
    champion = get_alias(name, CHAMPION, mlflow_uri or None)
    current = load_index(val_shards).get("source_manifest_hash")
    # the samples the challenger's evaluation (same settings) scores: the champion's must be these
    scored = samples_digest(current or "", shard_image_ids(val_shards)[:max_images])
    if champion is None:
        doc = {"status": "none"}
    else:
        logged = champion_metrics(champion, mlflow_uri or None)
        if logged.get("val_samples_digest") == scored:
            doc = {"status": "logged", "version": str(champion.version), "metrics": {**logged, "source": "logged"}}
        else:
            m = _evaluate_champion(name, champion.version, val_shards, storage.join(out, "evaluation"), settings,
                                   mlflow_uri)
            doc = {"status": "re-scored", "version": str(champion.version), "metrics": {**m, "source": "re-scored"},
                   "previous_val_manifest_hash": logged.get("val_manifest_hash"),
                   "previous_val_samples_digest": logged.get("val_samples_digest")}
    storage.write_text(storage.join(out, "champion.json"), json.dumps(doc, indent=1))
    if champion is not None:
        with stage_run("score-champion", run_id or None, mlflow_uri or None) as ml:
            ml.set_tags({"champion.version": str(champion.version), "champion.source": doc["status"],
                         "lineage.val_manifest_hash": current or ""})
            ml.log_metrics({f"champion_{k}": doc["metrics"][k] for k in ("PQ", "SQ", "RQ")})
    return doc["status"]


def _evaluate_champion(name: str, version, val_shards: str, out: str, settings, mlflow_uri: str) -> dict:
    from components.evaluate.core import EvaluateSettings, evaluate

    cfg = parse_settings(EvaluateSettings, settings, "evaluate settings")
    # the model is fetched from this step's store: the URI given, not one an earlier call left in
    # the environment (a setdefault here once fetched from a store of a call before)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    if mlflow_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    try:
        return evaluate(f"models:/{name}/{version}", val_shards, out, cfg, progress=False).metrics
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


@task("register")
def step_register(*, model_uri: str, eval_dir: str, champion_dir: str = "", settings=None, run_id: str = "",
                  mlflow_uri: str = "", val_shards: str = "", report_out: str = "") -> tuple[str, bool]:
    """Register (alias challenger) and decide the gate against the champion's metrics on the same
    validation data (``champion_dir/champion.json``); promotion is a separate step. With a
    champion and ``val_shards``, gate.html compares the two (also written to ``report_out``)."""
    setup_logging()
    from components.register.core import RegisterSettings, register

    cfg = parse_settings(RegisterSettings, settings, "register settings")
    champion_eval = None
    if champion_dir and storage.exists(storage.join(champion_dir, "champion.json")):
        doc = storage.read_json(storage.join(champion_dir, "champion.json"), "champion")
        champion_eval = doc.get("metrics") if isinstance(doc, dict) else None
    from components.train.stage import LINEAGE_FILE

    lineage_uri = storage.join(storage.dirname(model_uri), LINEAGE_FILE)
    lineage = storage.read_json(lineage_uri, "lineage") if storage.exists(lineage_uri) else {}
    if not isinstance(lineage, dict) or not all(isinstance(v, (str, int, float)) for v in lineage.values()):
        raise ValueError(f"{lineage_uri}: a lineage is a mapping of names to plain values; re-run the train step")
    r = register(model_uri, eval_dir, RegisterSettings(cfg.name, cfg.margin, cfg.tolerance, promote=False),
                 champion_eval=champion_eval, parent_run_id=run_id or None, uri=mlflow_uri or None, lineage=lineage,
                 val_shards=val_shards or None, champion_eval_dir=storage.join(champion_dir, "evaluation")
                 if champion_dir else None, report_out=report_out or None)
    if report_out and storage.exists(report_out):
        log_parent(run_id or None, tags={"panoptic.gate_report": report_out}, uri=mlflow_uri or None)
    return r.version, r.decision.promote


@task("promote-champion")
def step_promote(*, version: str, register=None, run_id: str = "", mlflow_uri: str = "") -> None:
    setup_logging()
    from components.register.core import RegisterSettings, promote_champion

    cfg = parse_settings(RegisterSettings, register, "register settings")
    why = promote_champion(cfg.name, version, uri=mlflow_uri or None, cfg=cfg)
    if not why:
        log_parent(run_id or None, tags={"model.aliases": "challenger,champion"}, uri=mlflow_uri or None)
    else:
        log_parent(run_id or None, tags={"gate.promote": "False", "gate.reason": f"passed the gate but not promoted: "
                                         f"{why}"[:4000]}, uri=mlflow_uri or None)


def step_finalize(*, state: str, error: str = "", kfp_run_id: str = "", mlflow_uri: str = "", experiment: str = "",
                  link_out: str = "") -> str:
    """The exit handler's step, run however the pipeline ended: the MLflow pipeline run of this
    KFP run (found by its ``kfp.run_id`` tag) gets its final status. When the pipeline failed,
    the tasks still "running" or "failed" (``task.<name>`` tags) are named on it
    (``pipeline.failed_task``), and every run of it left RUNNING (a task killed by the cluster
    never closes its own) is marked FAILED. Returns the MLflow run's id ("" when the first task
    died before creating it)."""
    setup_logging()
    from mlflow.tracking import MlflowClient

    from components.common.tracking import find_pipeline_run, tracking_uri

    run = find_pipeline_run(kfp_run_id, mlflow_uri or None, experiment or None) if kfp_run_id else None
    if run is None:
        log.error("finalize: no MLflow pipeline run is tagged kfp.run_id=%s in %s: the first task failed before "
                  "creating one (KFP state %s%s)", kfp_run_id, tracking_uri(mlflow_uri or None), state,
                  f": {error}" if error else "")
        if link_out:
            with open(link_out, "w", encoding="utf-8") as f:
                f.write(f"# No MLflow run\n\nThe pipeline ended {state} before its first task created one.\n")
        return ""
    client = MlflowClient(tracking_uri(mlflow_uri or None))
    run_id = run.info.run_id
    tasks = {k[len("task."):]: v for k, v in client.get_run(run_id).data.tags.items() if k.startswith("task.")}
    ok = state in ("SUCCEEDED", "SUCCESS")
    if ok:
        client.set_tag(run_id, "pipeline.status", "SUCCEEDED")
        client.set_terminated(run_id, "FINISHED")
        extra = "The pipeline succeeded."
    else:
        failed = sorted(t for t, v in tasks.items() if v in ("running", "failed"))
        named = ", ".join(failed) or "none of ours (see the KFP run's graph)"
        left = _running_descendants(client, run.info.experiment_id, run_id)
        for child in left:
            client.set_tag(child.info.run_id, "panoptic.failed", f"its task died (pipeline {state})")
            client.set_terminated(child.info.run_id, "FAILED")
        for t in failed:
            client.set_tag(run_id, f"task.{t}", "failed")
        client.set_tag(run_id, "pipeline.status", "FAILED")
        client.set_tag(run_id, "pipeline.failed_task", named)
        if error:
            client.set_tag(run_id, "pipeline.error", error[:5000])
        client.set_terminated(run_id, "FAILED")
        log.error("finalize: pipeline %s; failed task(s): %s; %d MLflow run(s) left RUNNING marked FAILED", state,
                  named, len(left))
        extra = f"The pipeline **failed** in: {named}."
    if link_out:
        write_link(link_out, run_id, mlflow_uri, {"kfp.run_id": kfp_run_id}, extra=extra)
    return run_id


def _running_descendants(client, experiment_id: str, run_id: str) -> list:
    """The runs under ``run_id`` (stage runs, sweep trials under them) still RUNNING."""
    out, frontier = [], [run_id]
    while frontier:
        children = []
        for parent in frontier:
            children += client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000)
        out += [c for c in children if c.info.status == "RUNNING"]
        frontier = [c.info.run_id for c in children]
    return out
