"""MLflow helpers shared by the stages: one run per pipeline run, a nested run per stage.

MLflow is imported only when used. The tracking URI is ``MLFLOW_TRACKING_URI``, else a
sqlite store in the working directory (the embedded default).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from contextlib import contextmanager

DEFAULT_EXPERIMENT = "panoptic-fpn"
PIPELINE_TAG = "panoptic.kind"
KFP_RUN_ID_TAG = "kfp.run_id"
CHAMPION = "champion"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"   # MLflow 3's "model training" experiments
SYSTEM_METRICS_INTERVAL_S = 5.0   # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it


# Bounded server calls. MLflow retries a failing request 7 times with exponential backoff: with
# the server gone, a stage said nothing for minutes (746 s once). Ours retry 5 times (0, 2, 4, 8,
# 16 s apart: a server restarting, a 503 storm of half a minute is ridden out), say each retry in
# the log and then which server failed; a user's own settings win.
for _name, _value in (("MLFLOW_HTTP_REQUEST_TIMEOUT", "30"), ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5"),
                      ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")):
    os.environ.setdefault(_name, _value)

log = logging.getLogger(__name__)


class _RetriesSaid(logging.Filter):
    """The retries MLflow's client makes (urllib3's, silent below DEBUG), said as one warning each:
    the request, what the server did and when the next try goes. urllib3's own "Retrying (...)"
    lines, which say the same in its repr, are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "urllib3.connectionpool":
            return not str(record.msg).startswith("Retrying (")
        retry = record.args[1] if isinstance(record.args, tuple) and len(record.args) == 2 else None
        history = getattr(retry, "history", None)
        if history:
            last = history[-1]
            what = (f"answered {last.status}" if last.status else
                    f"did not answer ({type(last.error).__name__ if last.error else 'no reply'})")
            path = str(last.url or "").split("?")[0]
            server = f"the MLflow server ({tracking_uri()})" if "/mlflow" in path else "the server"
            log.warning("%s %s: %s %s; retry %d of %s in %.0f s", last.method, path, server, what, len(history),
                        os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "?"), retry.get_backoff_time())
        return False


def _say_retries() -> None:
    said = _RetriesSaid()
    retries = logging.getLogger("urllib3.util.retry")
    retries.setLevel(logging.DEBUG)      # its one debug line per retry: filtered into ours
    retries.addFilter(said)
    logging.getLogger("urllib3.connectionpool").addFilter(said)


_say_retries()


class RegistryError(RuntimeError):
    """The model registry failed (unreachable, 5xx, refused): not the same as "no such model"."""


def tracking_uri(uri: str | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def setup(uri: str | None = None, experiment: str | None = None):
    """Point MLflow at the store and the experiment, creating the experiment as a model-training
    one (MLflow 3's experiment kind: its UI opens on runs, not on GenAI traces). A kind someone
    chose in the UI is left as it is."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    name = experiment_name(experiment)
    location = artifact_location(uri, name)
    if location and mlflow.get_experiment_by_name(name) is None:
        try:
            mlflow.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as e:   # another stage created it first
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    exp = mlflow.set_experiment(name)
    if EXPERIMENT_KIND_TAG not in exp.tags:
        mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    if exp.tags.get(RUNS_VIEW_TAG) != RUNS_VIEW:
        mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, RUNS_VIEW_TAG, RUNS_VIEW)
    return mlflow


# The runs table as our links open it: MLflow's UI shows Source, Models and Dataset until a user
# picks columns; a shared view (an experiment tag the UI reads for ``?viewStateShareKey=KEY``,
# what its own "Share" button writes) opens it on the figures and the gate's decision instead.
RUNS_VIEW_KEY = "panoptic-runs"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW_KEY}"
RUNS_VIEW = json.dumps({
    "selectedColumns": [*(f"metrics.`{k}`" for k in ("PQ", "SQ", "RQ")),
                        *(f"tags.`{k}`" for k in ("gate.promote", "model.version", "model.aliases")),
                        "attributes.`Dataset`", "attributes.`Duration`"],
    "orderByKey": "attributes.start_time", "orderByAsc": False,
}, separators=(",", ":"))


def runs_address(experiment_id: str, uri: str | None = None) -> str:
    """The experiment's runs table, opened on PQ/SQ/RQ and the decision (``RUNS_VIEW``)."""
    return f"{ui_address(uri)}/#/experiments/{experiment_id}/runs?viewStateShareKey={RUNS_VIEW_KEY}"


def experiment_name(experiment: str | None = None) -> str:
    return experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment of a sqlite store keeps its artifacts: beside the database file
    (``<folder of the .db>/mlruns/<experiment>``). MLflow's default is ``./mlruns`` of whichever
    process creates the experiment: in a container (kfp.local's DockerRunner), one that is gone
    with it. None for other stores (a server decides)."""
    if not uri.startswith("sqlite:///"):
        return None
    folder = os.path.dirname(os.path.abspath(uri[len("sqlite:///"):]))
    return os.path.join(folder, "mlruns", re.sub(r"[^A-Za-z0-9._-]+", "_", experiment))


def pipeline_run_name(config: str, when: float | None = None) -> str:
    """``panoptic-fpn <config> <YYYY-MM-DD HH:MM>`` (UTC): the name of a pipeline run in MLflow."""
    import time

    return f"{DEFAULT_EXPERIMENT} {config} {time.strftime('%Y-%m-%d %H:%M', time.gmtime(when))}"


def stage_run_name(stage: str, pipeline_run: str | None) -> str:
    """``<stage> · <pipeline run>``: which pipeline run a stage belongs to, readable in any list."""
    return f"{stage} · {pipeline_run}" if pipeline_run else stage


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
                       tags: dict | None = None, kfp_run_id: str = "") -> str:
    """The MLflow run of one pipeline run; returns its id (stages log under it). With
    ``kfp_run_id``, the one already tagged with it when there is one (a retried first task, or
    ``submit`` created it): one MLflow run per KFP run."""
    mlflow = setup(uri, experiment)
    if kfp_run_id:
        found = find_pipeline_run(kfp_run_id, uri, experiment)
        if found is not None:
            client = mlflow.MlflowClient()
            for k, v in (tags or {}).items():
                client.set_tag(found.info.run_id, k, str(v))
            return found.info.run_id
    from mlflow.tracking.context.registry import resolve_tags

    sha = git_sha()
    source = {"mlflow.source.git.commit": sha} if sha != "unknown" else {}
    all_tags = resolve_tags({PIPELINE_TAG: "pipeline", **source, "image_tag": os.environ.get("IMAGE_TAG", "local"),
                             **(tags or {}), **({KFP_RUN_ID_TAG: kfp_run_id} if kfp_run_id else {})})
    # created, not started: it stays RUNNING across the tasks until the exit handler closes it
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name(experiment_name(experiment))
    return client.create_run(exp.experiment_id, run_name=run_name, tags=all_tags).info.run_id


def find_pipeline_run(kfp_run_id: str, uri: str | None = None, experiment: str | None = None):
    """The MLflow pipeline run tagged with this KFP run's id, or None."""
    mlflow = setup(uri, experiment)
    found = mlflow.search_runs(experiment_names=[experiment_name(experiment)],
                               filter_string=f"tags.`{KFP_RUN_ID_TAG}` = '{_quoted(kfp_run_id)}' and "
                                             f"tags.`{PIPELINE_TAG}` = 'pipeline'",
                               order_by=["attributes.start_time ASC"], max_results=1, output_format="list")
    return found[0] if found else None


def _quoted(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._:/-]{1,200}", value):
        raise ValueError(f"{value!r} is not a KFP run id (letters, digits and ._:/- only)")
    return value


def ui_address(uri: str | None = None) -> str:
    """Where a browser opens MLflow for this tracking URI: the server itself for http(s); for a
    local store, ``PANOPTIC_MLFLOW_UI`` or what ``mlflow ui`` serves by default."""
    uri = tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return os.environ.get("PANOPTIC_MLFLOW_UI", "http://127.0.0.1:5000").rstrip("/")


def run_address(run_id: str, experiment_id: str, uri: str | None = None) -> str:
    """The MLflow UI's page of one run (a bare address opens MLflow 3 on its GenAI overview)."""
    return f"{ui_address(uri)}/#/experiments/{experiment_id}/runs/{run_id}"


@contextmanager
def stage_run(stage: str, parent_run_id: str | None, uri: str | None = None, experiment: str | None = None,
              system_metrics: bool = False):
    """Log one stage: a run named ``<stage> · <pipeline run>`` nested under ``parent_run_id`` (or
    a lone run named ``<stage>`` when there is none).

    Yields the mlflow module with the stage run active; params/metrics/artifacts logged
    inside land in the stage run. ``log_parent`` below writes to the pipeline run itself.
    ``system_metrics``: MLflow samples CPU/GPU utilisation and memory into the stage run
    (``system/...``) while it is open (every ``SYSTEM_METRICS_INTERVAL_S`` seconds).
    """
    mlflow = setup(uri, experiment)
    if system_metrics and not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    if parent_run_id:
        # the stage run is created under the pipeline run, which is never made active here: it
        # stays RUNNING until the exit handler gives it its final status
        from mlflow.tracking.context.registry import resolve_tags

        client = mlflow.MlflowClient()
        parent = client.get_run(parent_run_id)
        child = client.create_run(parent.info.experiment_id, run_name=stage_run_name(stage, parent.info.run_name),
                                  tags=resolve_tags({"mlflow.parentRunId": parent_run_id, "panoptic.stage": stage}))
        with mlflow.start_run(run_id=child.info.run_id, log_system_metrics=system_metrics) as run:
            yield mlflow
            if system_metrics:
                _last_system_sample(run.info.run_id)
    else:
        with mlflow.start_run(run_name=stage, log_system_metrics=system_metrics) as run:
            mlflow.set_tag("panoptic.stage", stage)
            yield mlflow
            if system_metrics:
                _last_system_sample(run.info.run_id)


def _last_system_sample(run_id: str) -> None:
    """One more system-metrics sample as the stage ends, from the run's own monitor (stopped
    first): MLflow drops the samples of its last interval, so a stage shorter than the interval
    would have none, and a fresh monitor would restart the cumulative counters (network
    megabytes) at 0."""
    from mlflow.tracking import fluent

    monitor = fluent.run_id_to_system_metrics_monitor.get(run_id)
    if monitor is None:
        return
    monitor.finish()   # joins its thread; end_run's finish() then finds nothing left to do
    monitor.collect_metrics()
    monitor.publish_metrics(monitor.aggregate_metrics())
    monitor.mlflow_logger.flush()


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


def is_not_found(error: Exception) -> bool:
    """Whether an MLflow error says the registered model or alias does not exist (the only
    answer that means "no champion yet"); timeouts, 5xx and the like are not."""
    from mlflow.exceptions import MlflowException

    if not isinstance(error, MlflowException):
        return False
    if error.error_code == "RESOURCE_DOES_NOT_EXIST":
        return True
    return error.error_code == "INVALID_PARAMETER_VALUE" and "alias" in str(error) and "not found" in str(error)


def get_alias(name: str, alias: str = CHAMPION, uri: str | None = None):
    """The model version holding ``alias``, or None when the model or alias does not exist.
    Any other registry failure raises ``RegistryError``: a caller must never take an outage
    for "no champion" (that would promote whatever comes next)."""
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri(uri)).get_model_version_by_alias(name, alias)
    except Exception as e:
        if is_not_found(e):
            return None
        raise RegistryError(f"cannot look up {name}@{alias} in the MLflow registry at {tracking_uri(uri)}: "
                            f"{type(e).__name__}: {str(e)[:300]}") from e


def resolve_model_uri(uri: str, tracking: str | None = None) -> tuple[str, str | None]:
    """``models:/name@alias`` -> (``models:/name/version``, "name/version"): the concrete version,
    so that every process (and the lineage) sees the same one. Other URIs come back as they are."""
    if uri.startswith("models:/") and "@" in uri:
        name, alias = uri[len("models:/"):].split("@", 1)
        version = get_alias(name, alias, tracking)
        if version is None:
            raise FileNotFoundError(f"{uri}: no version of {name} holds the alias {alias!r} in the registry at "
                                    f"{tracking_uri(tracking)} (is it in another store? set MLFLOW_TRACKING_URI "
                                    f"to that one)")
        return f"models:/{name}/{version.version}", f"{name}/{version.version}"
    if uri.startswith("models:/"):
        return uri, uri[len("models:/"):]
    return uri, None


def check_store_exists(store: str, wanted: str) -> None:
    """A lookup in a file store that is not there fails naming it, and creates nothing (MLflow
    would make an empty ``mlflow.db`` in the current folder)."""
    for scheme in ("sqlite:///", "file://"):
        if store.startswith(scheme):
            path = store[len(scheme):] or "."
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"{wanted}: there is no MLflow store at {store} (the tracking URI: {os.path.abspath(path)} does "
                    f"not exist); set MLFLOW_TRACKING_URI to the store that holds the model (sqlite:////abs/path/"
                    f"mlflow.db, or the server's http://HOST:5000)")


def download_model_file(uri: str, tracking: str | None = None) -> str:
    """The local path of the ``model.pt`` inside an MLflow model (``models:/...``, ``runs:/...``)."""
    import glob
    import tempfile

    import mlflow

    store = tracking_uri(tracking)
    check_store_exists(store, uri)
    mlflow.set_tracking_uri(store)
    uri, _ = resolve_model_uri(uri, tracking)
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tempfile.mkdtemp(prefix="panoptic-model-"))
    found = sorted(glob.glob(os.path.join(local, "**", "model.pt"), recursive=True))
    if not found:
        raise FileNotFoundError(f"{uri}: the MLflow model holds no model.pt (not a panoptic-fpn model?)")
    return found[0]


def metric_logger(prefix: str = ""):
    """A ``(metrics, step)`` callback logging numbers to the active MLflow run."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())

    def log(metrics: dict, step: int) -> None:
        if mlflow.active_run() is None:
            mlflow.start_run(run_id=os.environ.get("MLFLOW_RUN_ID"))
        # a key with its own namespace ("val/PQ") is logged as it is
        mlflow.log_metrics({k if "/" in k else prefix + k: float(v) for k, v in metrics.items() if k != "iter"},
                           step=step)

    return log
