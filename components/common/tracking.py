"""MLflow helpers shared by the stages. MLflow is imported only when used."""

from __future__ import annotations

import os


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else a sqlite store in the working directory (the embedded default)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def metric_logger(prefix: str = ""):
    """A ``(metrics, step)`` callback logging numbers to the active (or a new) MLflow run."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())

    def log(metrics: dict, step: int) -> None:
        if mlflow.active_run() is None:
            mlflow.start_run(run_id=os.environ.get("MLFLOW_RUN_ID"))
        mlflow.log_metrics({prefix + k: float(v) for k, v in metrics.items() if k != "iter"}, step=step)

    return log
