"""The whole DAG in our images, through KFP's own DockerRunner (`panoptic pipeline run-local
--runner docker`), as a cluster user runs it: every task in panoptic-cpu / panoptic-cuda built
from this tree, the data mounted read-only, the MLflow store in the pipeline root; a first run
registers a champion, the next ends with "nothing new"; a task whose container fails fails the
run, also when it is gone before kfp asks for its exit code."""

import hashlib
import os
import subprocess
import sys
import threading
import time

import pytest

from components.synthetic.generator import SynthSettings, generate
from tests.e2e.test_pipeline_local import OVERRIDE_SETS

pytestmark = pytest.mark.slow


def _tree_digest(root: str) -> str:
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            st = os.stat(path)
            h.update(f"{os.path.relpath(path, root)} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _run_local(data, root, env, *extra):
    cli = [os.path.join(os.path.dirname(sys.executable), "panoptic"), "pipeline", "run-local", "--runner", "docker",
           "--data", data, "--root", root, "--set", "train.config=tiny", "--set", "train.iterations=4",
           *OVERRIDE_SETS, "--set", "preprocess.shard_images=4", *extra]
    return subprocess.run(cli, env=env, capture_output=True, text=True, timeout=1500)


@pytest.mark.timeout(3000)
def test_the_dag_runs_in_our_images_to_a_champion_then_nothing_new(images, tmp_path):
    data = str(tmp_path / "coco")
    generate(data, SynthSettings(train=10, val=4, seed=5, min_side=128, max_side=192), progress=False)
    before = _tree_digest(data)
    root = str(tmp_path / "root")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(images["env"])
    t0 = time.perf_counter()
    out = _run_local(data, root, env)
    first_s = time.perf_counter() - t0
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "version 1" in out.stdout and "PQ" in out.stdout, out.stdout
    store = f"sqlite:///{root}/mlflow.db"
    assert f"MLFLOW_TRACKING_URI={store}" in out.stdout   # the hint names the store the run used
    assert "Error" not in out.stdout + out.stderr          # no git or permission noise from the images

    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    champion = client.get_model_version_by_alias("panoptic-fpn", "champion")
    assert str(champion.version) == "1"
    exp = client.get_experiment_by_name("panoptic-fpn")
    assert exp.artifact_location.startswith(os.path.join(root, "mlruns"))   # beside the store, not in a container
    run = client.search_runs([exp.experiment_id], filter_string="tags.`panoptic.kind` = 'pipeline'")[0]
    import docker

    labels = docker.from_env().images.get(images["cpu"]).labels
    assert run.data.tags["image_tag"] == "ci"
    assert run.data.tags["mlflow.source.git.commit"] == labels["org.opencontainers.image.revision"] != "unknown"
    stages = {r.data.tags["panoptic.stage"] for r in client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")}
    assert stages == {"subset", "decide", "preprocess", "train", "evaluate", "register"}
    arts = {a.path for a in client.list_artifacts(champion.run_id)}
    assert arts, "the registered model's run has its artifacts"
    # the tasks ran as the image's user, and wrote only to the pipeline root
    if os.getuid() == 0:
        assert os.stat(os.path.join(root, "mlflow.db")).st_uid == 1000
    assert _tree_digest(data) == before
    # the Model artifact holds the model and what a consumer needs; checkpoints lie beside it
    model_dir = next(os.path.join(d, "model") for d, dirs, _ in os.walk(root) if d.endswith("/train") and
                     "model" in dirs)
    assert sorted(os.listdir(model_dir)) == ["lineage.json", "model.pt", "train_config.json"]
    assert os.path.isdir(os.path.join(os.path.dirname(model_dir), "checkpoints"))

    t0 = time.perf_counter()
    again = _run_local(data, root, env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "nothing new" in again.stdout and "version 1" in again.stdout
    print(f"\nDAG in containers: first run {first_s:.0f} s, 'nothing new' {time.perf_counter() - t0:.0f} s")


@pytest.mark.timeout(1200)
def test_a_failing_task_fails_the_run_naming_it(images, tmp_path):
    data = str(tmp_path / "coco")
    generate(data, SynthSettings(train=4, val=2, seed=5, min_side=128, max_side=160), progress=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(images["env"])
    out = _run_local(data, str(tmp_path / "root"), env, "--set", "subset.size=50")   # more images than there are
    assert out.returncode != 0
    assert "task 'select-subset' failed" in out.stderr, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr


@pytest.mark.timeout(600)
def test_the_guard_fails_a_container_that_is_gone_before_kfp_waits(images):
    """kfp 2.17's DockerRunner reads a container removed before its wait() as exit code 0; the
    engine's die event still has the code, and the guard raises it in the main thread."""
    import docker

    from pipeline.local import RUN_LABEL, ContainerGuard, TaskFailed

    client = docker.from_env()
    guard = ContainerGuard(client, "guard-test")
    with pytest.raises(TaskFailed, match=r"task 'select-subset' failed: its container .* exited with code 3"):
        with guard:
            guard.task = "select-subset"

            def start():   # as kfp starts a task: auto-removed, and nobody waits for it here
                client.containers.run(images["cpu"], ["sh", "-c", "exit 3"], auto_remove=True, detach=True,
                                      labels={RUN_LABEL: "guard-test"}, network_mode="host")

            threading.Thread(target=start).start()
            time.sleep(120)   # interrupted by the guard
    other = ContainerGuard(client, "guard-test-ok")
    with other:
        client.containers.run(images["cpu"], ["true"], remove=True, labels={RUN_LABEL: "guard-test-ok"},
                              network_mode="host")
        time.sleep(1)
    other.check()   # exit code 0: nothing raised
    assert subprocess.run(["docker", "ps", "-aq", "--filter", f"label={RUN_LABEL}=guard-test"], capture_output=True,
                          text=True).stdout.strip() == ""
