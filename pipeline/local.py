"""The DAG on this machine: kfp.local with its SubprocessRunner (this venv) or its DockerRunner
(our images, as a cluster runs them).

With ``runner="docker"`` every task runs in ``panoptic-cpu`` / ``panoptic-cuda`` (the images the
DAG names: ``IMAGE_REGISTRY`` / ``IMAGE_TAG``, as ``make images`` tags them) on the host's network
(so an MLflow or S3 server on 127.0.0.1 answers), with the dataset mounted read-only, the
pipeline root read-write at the same path (kfp.local's own mount) and the MLflow store, by
default, in the pipeline root (``ROOT/mlflow.db``, artifacts beside it). The containers run as
the image's user (uid 1000) when this process is root, else as this user, so what they write
stays readable here. ``ContainerGuard`` makes a task whose container exits non-zero fail the run
(kfp 2.17's DockerRunner reads a container that is gone before it waits as exit code 0).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
import time
import uuid

from pipeline.stages import STAGES

log = logging.getLogger(__name__)

RUNNERS = ("subprocess", "docker")
# run-local's defaults: a CPU-sized run of the embedded default (the stages' own defaults otherwise)
LOCAL_SETTINGS = {"train": {"config": "tiny", "iterations": 300}, "preprocess": {"shard_images": 100}}
# what the containers see of this process's environment: object store and MLflow credentials
PASS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
            "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
RUN_LABEL = "panoptic.pipeline-run"
IMAGE_USER = "1000:1000"


class TaskFailed(RuntimeError):
    """A task of the local run failed; the message names it and says where its log is."""


def local_settings(overrides: dict | None = None) -> dict:
    """run-local's stage settings: LOCAL_SETTINGS with ``overrides`` ({stage: {key: value}}) on top."""
    out = {stage: dict(LOCAL_SETTINGS.get(stage, {})) for stage in STAGES}
    for stage, values in (overrides or {}).items():
        if stage not in out:
            raise ValueError(f"{stage!r} is not a stage; stages: {', '.join(STAGES)}")
        out[stage].update(values)
    return out


def run_local(data: str | None = None, *, runner: str = "subprocess", root: str = "runs/local",
              mlflow_uri: str | None = None, force: bool = False, settings: dict | None = None, synth_train: int = 200,
              synth_val: int = 50, verbose: bool = False, run_name: str = "", experiment: str = "") -> dict:
    """Run the whole DAG with kfp.local on this machine. ``runner``: ``subprocess`` (this venv)
    or ``docker`` (our images). ``settings``: {stage: {key: value}} over ``LOCAL_SETTINGS``.
    Returns a summary."""
    from kfp import local
    from mlflow.tracking import MlflowClient

    from components.common.tracking import DEFAULT_EXPERIMENT, run_address, runs_address, setup
    from pipeline.dag import build_pipeline

    experiment = experiment or DEFAULT_EXPERIMENT
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, not {runner!r}")
    if not data:
        data = "data/synth"
        if not os.path.exists(os.path.join(data, "annotations", "panoptic_val2017.json")):
            from components.synthetic.generator import SynthSettings, generate

            generate(data, SynthSettings(train=synth_train, val=synth_val, seed=0), progress=True)
    data = os.path.abspath(data) if "://" not in data else data
    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    default_store = os.path.join(root if runner == "docker" else os.getcwd(), "mlflow.db")
    mlflow_uri = mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{default_store}"
    log_path = os.path.join(root, "pipeline.log")
    t0, t_start = time.perf_counter(), time.time()
    with contextlib.ExitStack() as stack:
        if runner == "docker":
            kfp_runner, guard = docker_runner(root, data, mlflow_uri)
            stack.enter_context(guard)
        else:
            kfp_runner, guard = local.SubprocessRunner(use_venv=False), None
        # caching as on a cluster: only preprocess is cacheable (its inputs are values), so a forced
        # retrain on the same data reuses its shards; a cache entry whose files are gone is a miss
        local.init(runner=kfp_runner, pipeline_root=root, raise_on_error=True, enable_caching=True)
        stack.enter_context(_task_log(log_path, verbose))
        try:
            done = build_pipeline(None)(data_uri=data, mlflow_uri=mlflow_uri, force=force, run_name=run_name,
                                        experiment=experiment, **local_settings(settings))
        except RuntimeError as e:
            why, run_at = _failed_run(mlflow_uri, t_start, experiment)
            if guard is not None and guard.failure:
                raise TaskFailed(f"{why}{guard.failure}{run_at}") from None
            raise TaskFailed(f"{why}{_first_line(e)} (its log: {log_path}){run_at}") from None
        if guard is not None:
            guard.check()
    elapsed = time.perf_counter() - t0
    setup(mlflow_uri, experiment)
    run = MlflowClient(mlflow_uri).get_run(done.output)   # finalize's output: this run's MLflow run
    skipped = run.data.tags.get("decision") == "skip"
    # this run's files, as its tasks recorded them on its MLflow run (another run-local in the same
    # folder writes its own: the newest file is not necessarily ours)
    report, gate = run.data.tags.get("panoptic.report"), run.data.tags.get("panoptic.gate_report")
    return {"run_id": run.info.run_id, "url": run_address(run.info.run_id, run.info.experiment_id, mlflow_uri),
            "runs_url": runs_address(run.info.experiment_id, mlflow_uri),
            "metrics": run.data.metrics, "tags": run.data.tags, "skipped": skipped,
            "report": None if skipped else report, "seconds": elapsed,
            "gate_report": None if skipped else gate, "mlflow_uri": mlflow_uri,
            "log": None if verbose else log_path, "runner": runner}


def _failed_run(mlflow_uri: str, since: float, experiment: str) -> tuple[str, str]:
    """(why, "; MLflow run: <address> (failed task: ...)") for the pipeline run the exit handler
    closed; why: "task 'NAME' failed: LINE. " for each task that failed saying why (``task_error.``)."""
    try:
        from mlflow.tracking import MlflowClient

        from components.common.tracking import PIPELINE_TAG, run_address
        from pipeline.steps import ERROR_TAG

        client = MlflowClient(mlflow_uri)
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id], f"tags.`{PIPELINE_TAG}` = 'pipeline' and "
                                  f"attributes.start_time >= {int(since * 1000)}",
                                  order_by=["attributes.start_time DESC"], max_results=1) if exp else []
    except Exception:   # the store may be what failed; the error above says what did
        return "", ""
    if not runs:
        return "", ""
    r = runs[0]
    failed = r.data.tags.get("pipeline.failed_task")
    tags = r.data.tags   # a task that failed and said why; one retried to success is "succeeded"
    why = "".join(f"task {k[len(ERROR_TAG):]!r} failed: {v}. " for k, v in sorted(tags.items())
                  if k.startswith(ERROR_TAG) and tags.get(f"task.{k[len(ERROR_TAG):]}") == "failed")
    return why, (f"; MLflow run: {run_address(r.info.run_id, r.info.experiment_id, mlflow_uri)}"
                 + (f" (failed task: {failed}, marked FAILED)" if failed else ""))


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# -- Docker ------------------------------------------------------------------------------------

def docker_runner(root: str, data: str, mlflow_uri: str):
    """(kfp.local DockerRunner, ContainerGuard) for a run with pipeline root ``root``."""
    import docker
    from docker.types import Mount
    from kfp import local

    from components.common.cluster import ClusterSettings
    from pipeline.settings import CPU_IMAGE, GPU_IMAGE

    try:
        client = docker.from_env()
        client.ping()
    except Exception as e:
        raise TaskFailed(f"no Docker engine answers ({type(e).__name__}: {str(e)[:200]}): start one "
                         f"(containers/engine.sh does it on Debian), or run with --runner subprocess") from None
    for image in (CPU_IMAGE, GPU_IMAGE):
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            raise TaskFailed(f"image {image} is not on this Docker engine: build it with `make images` "
                             f"(IMAGE_REGISTRY and IMAGE_TAG name it) or pull it") from None
    mounts = [Mount(target=path, source=path, type="bind", read_only=ro) for path, ro in _bind_paths(root, data,
                                                                                                   mlflow_uri)]
    uid = os.getuid()
    env = {k: os.environ[k] for k in PASS_ENV if os.environ.get(k)}
    if uid == 0:
        user = IMAGE_USER
        _chown_tree(root, 1000, 1000)   # the tasks write here: the image's user must own it
    else:
        user, env["HOME"] = f"{uid}:{os.getgid()}", "/tmp"   # this user's files stay this user's
    run = uuid.uuid4().hex[:12]
    kfp_runner = local.DockerRunner(network_mode="host", mounts=mounts, user=user, environment=env,
                                    labels={RUN_LABEL: run}, shm_size=_docker_size(ClusterSettings().shm_size))
    return kfp_runner, ContainerGuard(client, run)


def _bind_paths(root: str, data: str, mlflow_uri: str) -> list[tuple[str, bool]]:
    """(host path, read-only) to mount besides the pipeline root (kfp mounts that itself): the
    dataset read-only, a sqlite store's folder read-write when it lies outside the root."""
    out = []
    if "://" not in data:
        out.append((data, True))
    if mlflow_uri.startswith("sqlite:///"):
        folder = os.path.dirname(os.path.abspath(mlflow_uri[len("sqlite:///"):]))
        if not _inside(folder, root):
            os.makedirs(folder, exist_ok=True)
            out.append((folder, False))
            if os.getuid() == 0:
                _chown_tree(folder, 1000, 1000, only=("mlflow.db", "mlruns"))
    return out


def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root + os.sep)


def _chown_tree(path: str, uid: int, gid: int, only: tuple[str, ...] = ()) -> None:
    """Hand ``path`` (or, with ``only``, those entries of it) and what is under it to uid:gid."""
    os.chown(path, uid, gid)
    for name in (only or os.listdir(path)):
        top = os.path.join(path, name)
        if not os.path.exists(top):
            continue
        os.chown(top, uid, gid, follow_symlinks=False)
        for folder, dirs, files in os.walk(top):
            for n in dirs + files:
                os.chown(os.path.join(folder, n), uid, gid, follow_symlinks=False)


def _docker_size(quantity: str) -> str:
    """A Kubernetes quantity ("16Gi") as Docker writes sizes ("16g")."""
    m = re.fullmatch(r"(\d+)([KMG])i?", quantity)
    if not m:
        raise ValueError(f"{quantity!r}: expected a size like 16Gi")
    return m.group(1) + m.group(2).lower()


class ContainerGuard:
    """Fails the run when one of its containers exits non-zero.

    kfp 2.17's DockerRunner starts each task with ``auto_remove`` and, when the container is
    gone before it asks for the exit code, reports SUCCESS: a task that fails fast would pass.
    The engine's ``die`` events carry every container's exit code whatever happens to the
    container afterwards; this watches those of the run's containers (by label) and, at the
    first non-zero one, interrupts the run (SIGUSR1 to this process, raised as ``TaskFailed``
    in the main thread) and stops the run's other containers. The failed task is named from
    kfp's "Executing task" lines.
    """

    def __init__(self, client, run: str):
        self.client, self.run = client, run
        self.failure: TaskFailed | None = None
        self.task = "?"
        self._events = None
        self._thread = None
        self._previous = None
        self._filter = _TaskNameFilter(self)

    def __enter__(self):
        self._events = self.client.events(decode=True, filters={"type": "container", "event": "die",
                                                                 "label": f"{RUN_LABEL}={self.run}"})
        self._previous = signal.signal(signal.SIGUSR1, self._raise)
        logging.getLogger().addFilter(self._filter)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeFilter(self._filter)
        self._events.close()
        self._thread.join(timeout=5)
        signal.signal(signal.SIGUSR1, self._previous)
        if exc[0] is not None:
            self._stop_containers()
        return False

    def check(self) -> None:
        """After kfp's run: raise when any container of it failed (a failure seen too late to interrupt)."""
        if self.failure is not None:
            raise self.failure

    def _watch(self) -> None:
        try:
            for event in self._events:
                attrs = event.get("Actor", {}).get("Attributes", {})
                code = int(attrs.get("exitCode", "0"))
                if code != 0 and self.failure is None:
                    self.failure = TaskFailed(f"task {self.task!r} failed: its container ({attrs.get('image', '?')}) "
                                              f"exited with code {code}")
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
        except Exception:   # the stream closes when the guard exits
            return

    def _raise(self, signum, frame):
        raise self.failure or TaskFailed("a task's container failed")

    def _stop_containers(self) -> None:
        try:
            for c in self.client.containers.list(filters={"label": f"{RUN_LABEL}={self.run}"}):
                c.kill()
        except Exception as e:   # the engine may be gone too; say so, do not hide the first error
            log.warning("could not stop the run's containers: %s", e)


class _TaskNameFilter(logging.Filter):
    """Watches kfp.local's "Executing task 'NAME'" records (on the root logger) for the guard."""

    def __init__(self, guard: ContainerGuard):
        super().__init__()
        self.guard = guard

    def filter(self, record: logging.LogRecord) -> bool:
        from components.common.logs import strip_ansi

        m = re.match(r"Executing task '([^']+)'", strip_ansi(str(record.msg)))
        if m:
            self.guard.task = m.group(1)
        return True


# -- the console -------------------------------------------------------------------------------

@contextlib.contextmanager
def _task_log(path: str, verbose: bool):
    """Send this process's stdout/stderr (kfp.local streams every task's full log there) through
    a pipe into ``path`` as plain lines (colour codes and carriage-return redraws removed),
    echoing only the lines that say which task runs, how it ended, and errors. ``verbose``:
    everything to the console, as it comes."""
    if verbose:
        yield
        return
    from components.common.logs import strip_ansi

    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    # what the console shows of the tasks' logs: which task runs and how it ended, the training's
    # progress (iteration, loss, images/s, ETA), the sweep's trials, decide's verdict, errors
    keep = re.compile(r"Executing task|finished with status|cache hit|Pipeline .* finished|Error|Traceback|"
                      r"train \S+: \d+(/\d+)? it|train: \S+, \d+ iterations|sweep trial \d+|sweep: best|decide: ")

    def pump():
        with open(path, "a", encoding="utf-8") as log_file, os.fdopen(read_fd, "rb") as pipe:
            pending = b""
            for chunk in iter(lambda: pipe.read1(65536), b""):
                pending += chunk
                *lines, pending = re.split(rb"\r\n|\n|\r", pending)
                for raw in lines:
                    text = strip_ansi(raw.decode(errors="replace")).rstrip()
                    if text:
                        log_file.write(text + "\n")
                        if keep.search(text):
                            os.write(saved[0], (text.strip() + "\n").encode())
                log_file.flush()
            if pending.strip():
                log_file.write(strip_ansi(pending.decode(errors="replace")).rstrip() + "\n")

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)  # closes the pipe's last writer: the pump sees the end
        os.dup2(saved[1], 2)
        t.join(timeout=10)
        for fd in saved:
            os.close(fd)
