"""The pipeline's steps as plain functions: a stage core + its MLflow logging.

The KFP components in ``pipeline/components.py`` are thin wrappers over these, so the same
code runs under kfp.local, on a cluster, and in tests without KFP. All MLflow calls go
through ``components.common.tracking``.
"""

from __future__ import annotations

import json
import os

from components.common import storage
from components.common.tracking import log_parent, shard_hash, stage_run, start_pipeline_run


def _flat(prefix: str, d: dict) -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(key + ".", v))
        else:
            out[key] = v if not isinstance(v, (list, tuple)) else json.dumps(list(v))
    return out


def step_subset(*, data_uri: str, train_out: str, val_out: str, size: str, val_size: str, strategy: str, seed: int,
                mlflow_uri: str = "", experiment: str = "", run_name: str = "", train_split: str = "train2017",
                val_split: str = "val2017", min_per_category: int = 50) -> str:
    """Select the train and val subsets; create the pipeline's MLflow run. Returns its id."""
    from components.select_subset.core import SubsetConfig, select_subset

    def as_size(v):
        return None if str(v) in ("", "all") else float(v)

    params = {"data_uri": data_uri, "subset.size": size, "subset.val_size": val_size, "subset.strategy": strategy,
              "subset.seed": seed}
    run_id = start_pipeline_run(mlflow_uri or None, experiment or None, run_name or None)
    log_parent(run_id, params=params, uri=mlflow_uri or None)
    train = select_subset(SubsetConfig(size=as_size(size), strategy=strategy, seed=seed,
                                       min_per_category=min_per_category), data_uri, train_split, train_out)
    val = select_subset(SubsetConfig(size=as_size(val_size), seed=seed), data_uri, val_split, val_out)
    with stage_run("subset", run_id, mlflow_uri or None, experiment or None) as ml:
        ml.log_params(params)
        ml.log_metrics({"train_images": len(train.image_ids), "val_images": len(val.image_ids)})
        ml.set_tags({"lineage.manifest_hash": train.manifest["manifest_hash"],
                     "lineage.val_manifest_hash": val.manifest["manifest_hash"]})
        for name in ("manifest.json", "category_histogram.csv", "category_histogram.png"):
            _log_file(ml, storage.join(train_out, name), "subset/train")
        _log_file(ml, storage.join(val_out, "manifest.json"), "subset/val")
    log_parent(run_id, tags={"lineage.manifest_hash": train.manifest["manifest_hash"]}, uri=mlflow_uri or None)
    return run_id


def _log_file(ml, uri: str, artifact_path: str) -> None:
    """Log a (local or s3://) file as an MLflow artifact."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, os.path.basename(uri))
        with open(path, "wb") as f:
            f.write(storage.read_bytes(uri))
        ml.log_artifact(path, artifact_path)


def step_preprocess(*, train_manifest: str, val_manifest: str, train_out: str, val_out: str, shard_images: int,
                    max_bad_fraction: float, run_id: str = "", mlflow_uri: str = "", workers: int = 2) -> dict:
    from components.preprocess.core import PreprocessConfig, load_index, preprocess

    cfg = PreprocessConfig(shard_images=shard_images, max_bad_fraction=max_bad_fraction, workers=workers)
    out = {}
    with stage_run("preprocess", run_id or None, mlflow_uri or None) as ml:
        ml.log_params({"shard_images": shard_images, "max_bad_fraction": max_bad_fraction})
        for name, manifest, folder in (("train", train_manifest, train_out), ("val", val_manifest, val_out)):
            r = preprocess(cfg, manifest, folder, progress=False)
            index = load_index(folder)
            ml.log_metrics({f"{name}_rows": r.rows_written, f"{name}_quarantined": r.quarantined,
                            f"{name}_shards": len(r.shards)})
            ml.set_tag(f"lineage.{name}_shards_hash", shard_hash(index))
            _log_file(ml, storage.join(folder, "index.json"), f"preprocess/{name}")
            _log_file(ml, storage.join(folder, "quarantine.jsonl"), f"preprocess/{name}")
            out[name] = {"rows": r.rows_written, "quarantined": r.quarantined, "shards_hash": shard_hash(index)}
    log_parent(run_id or None, tags={"lineage.shards_hash": out["train"]["shards_hash"]},
               metrics={"train_rows": out["train"]["rows"], "quarantined": out["train"]["quarantined"]},
               uri=mlflow_uri or None)
    return out


def step_train(*, train_shards: str, model_out: str, config: str, iterations: int = 0, overrides: str = "",
               run_id: str = "", mlflow_uri: str = "", checkpoint_uri: str = "", nodes: int = 1,
               gpus_per_node: int = 0, image: str = "", namespace: str = "") -> str:
    """Train in this process (nodes == 1) or as a PyTorchJob on the Training Operator (nodes > 1).
    Returns the model.pt URI."""
    from components.model.config import load_config, parse_overrides

    over = parse_overrides([o for o in overrides.split(";") if o.strip()]) if overrides else {}
    cfg = load_config(config, over)
    if iterations and iterations != cfg.solver.max_iter:
        cfg = scale_schedule(cfg, int(iterations))
    output = checkpoint_uri or model_out
    with stage_run("train", run_id or None, mlflow_uri or None) as ml:
        ml.log_params({k: v for k, v in _flat("", cfg.to_dict()).items() if len(str(v)) < 500})
        log_parent(run_id or None, params={"config": cfg.name, "iterations": cfg.solver.max_iter,
                                           "batch": cfg.solver.ims_per_batch, "nodes": nodes},
                   uri=mlflow_uri or None)
        if nodes > 1:
            from components.train.launcher import PyTorchJobSpec, run_pytorchjob

            spec = PyTorchJobSpec(image=image, nodes=nodes, gpus_per_node=gpus_per_node, shards=train_shards,
                                  output=output, config=config, overrides=overrides, iterations=iterations,
                                  mlflow_uri=mlflow_uri, namespace=namespace or None)
            run_pytorchjob(spec)
        else:
            from components.train.trainer import train

            def log(metrics, step):
                ml.log_metrics({f"train/{k}": float(v) for k, v in metrics.items() if k != "iter"}, step=step)

            train(cfg, train_shards, output, progress=False, log_fn=log)
        model_uri = storage.join(output, "model.pt")
        if output != model_out:
            storage.write_bytes(storage.join(model_out, "model.pt"), storage.read_bytes(model_uri))
        if storage.exists(storage.join(output, "train_metrics.json")):
            _log_file(ml, storage.join(output, "train_metrics.json"), "train")
    return storage.join(model_out, "model.pt")


def scale_schedule(cfg, iterations: int):
    """Run ``iterations`` instead of ``max_iter``: LR steps (and warmup, if longer than a tenth)
    scale by the same factor, as detectron2's schedule scaling does."""
    import dataclasses

    f = iterations / cfg.solver.max_iter
    solver = dataclasses.replace(cfg.solver, max_iter=iterations,
                                 steps=tuple(max(1, round(s * f)) for s in cfg.solver.steps),
                                 warmup_iters=min(cfg.solver.warmup_iters, max(1, iterations // 10)),
                                 checkpoint_period=min(cfg.solver.checkpoint_period, iterations))
    return dataclasses.replace(cfg, solver=solver)


def step_evaluate(*, model_uri: str, val_shards: str, out: str, run_id: str = "", mlflow_uri: str = "",
                  batch_size: int = 2, device: str = "auto") -> dict:
    from components.evaluate.core import EvalConfig, evaluate

    r = evaluate(model_uri, val_shards, out, EvalConfig(batch_size=batch_size, device=device), progress=False)
    keys = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")
    with stage_run("evaluate", run_id or None, mlflow_uri or None) as ml:
        ml.log_metrics({k: r.metrics[k] for k in keys})
        ml.log_metrics({"eval_images_per_s": r.metrics["timing"]["images_per_s_inference"],
                        "pq_overhead_vs_inference": r.metrics["timing"]["pq_overhead_vs_inference"]})
        for name in ("metrics.json", "per_class.csv", "report.html"):
            _log_file(ml, storage.join(out, name), "evaluate")
    log_parent(run_id or None, metrics={k: r.metrics[k] for k in keys}, uri=mlflow_uri or None)
    return r.metrics


def step_register(*, model_uri: str, eval_dir: str, name: str, margin: float, tolerance: float, run_id: str = "",
                  mlflow_uri: str = "", lineage: dict | None = None) -> tuple[str, bool]:
    """Register (alias challenger) and decide the gate; promotion is a separate step."""
    from components.register.core import register

    r = register(model_uri, eval_dir, name=name, margin=margin, tolerance=tolerance, parent_run_id=run_id or None,
                 uri=mlflow_uri or None, promote=False, lineage=lineage)
    return r.version, r.decision.promote


def step_promote(*, name: str, version: str, run_id: str = "", mlflow_uri: str = "") -> None:
    from components.register.core import promote_champion

    promote_champion(name, version, uri=mlflow_uri or None)
    log_parent(run_id or None, tags={"model.aliases": "challenger,champion"}, uri=mlflow_uri or None)
