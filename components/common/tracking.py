"""MLflow helpers shared by the stages: one run per pipeline run, a nested run per stage.

MLflow is imported only when used. The tracking URI is ``MLFLOW_TRACKING_URI``, else a
sqlite store in the working directory (the embedded default).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from contextlib import contextmanager

DEFAULT_EXPERIMENT = "panoptic-fpn"
PIPELINE_TAG = "panoptic.kind"


def tracking_uri(uri: str | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def setup(uri: str | None = None, experiment: str | None = None):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(uri))
    mlflow.set_experiment(experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT)
    return mlflow


def git_sha() -> str:
    if os.environ.get("GIT_SHA"):
        return os.environ["GIT_SHA"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_pipeline_run(uri: str | None = None, experiment: str | None = None, run_name: str | None = None,
                       tags: dict | None = None) -> str:
    """Create the MLflow run of one pipeline run; returns its id (stages log under it)."""
    mlflow = setup(uri, experiment)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags({PIPELINE_TAG: "pipeline", "git_sha": git_sha(),
                         "image_tag": os.environ.get("IMAGE_TAG", "local"), **(tags or {})})
        return run.info.run_id


@contextmanager
def stage_run(stage: str, parent_run_id: str | None, uri: str | None = None, experiment: str | None = None):
    """Log one stage: a run nested under ``parent_run_id`` (or a lone run when there is none).

    Yields the mlflow module with the stage run active; params/metrics/artifacts logged
    inside land in the stage run. ``log_parent`` below writes to the pipeline run itself.
    """
    mlflow = setup(uri, experiment)
    if parent_run_id:
        with mlflow.start_run(run_id=parent_run_id):
            with mlflow.start_run(run_name=stage, nested=True):
                mlflow.set_tag("panoptic.stage", stage)
                yield mlflow
    else:
        with mlflow.start_run(run_name=stage):
            mlflow.set_tag("panoptic.stage", stage)
            yield mlflow


def log_parent(parent_run_id: str | None, *, params: dict | None = None, metrics: dict | None = None,
               tags: dict | None = None, uri: str | None = None) -> None:
    """Log to the pipeline run (params/metrics users compare across pipeline runs)."""
    if not parent_run_id:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(uri))
    run = client.get_run(parent_run_id)
    for k, v in (params or {}).items():
        if k not in run.data.params:
            client.log_param(parent_run_id, k, v)
    for k, v in (metrics or {}).items():
        client.log_metric(parent_run_id, k, float(v))
    for k, v in (tags or {}).items():
        client.set_tag(parent_run_id, k, str(v))


def shard_hash(index: dict) -> str:
    """One hash over the shards' own hashes: the lineage of a training set."""
    return hashlib.sha256(json.dumps([s["sha256"] for s in index["shards"]]).encode()).hexdigest()


def metric_logger(prefix: str = ""):
    """A ``(metrics, step)`` callback logging numbers to the active MLflow run."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())

    def log(metrics: dict, step: int) -> None:
        if mlflow.active_run() is None:
            mlflow.start_run(run_id=os.environ.get("MLFLOW_RUN_ID"))
        mlflow.log_metrics({prefix + k: float(v) for k, v in metrics.items() if k != "iter"}, step=step)

    return log
