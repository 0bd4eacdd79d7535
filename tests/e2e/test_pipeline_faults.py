"""The whole DAG (kfp.local, `panoptic pipeline run-local` as a user types it) meeting faults of
its surroundings: a pipeline root whose disk fills up while training writes its checkpoint, and
two runs started at once into one model and one root, as two users (or a user and a schedule)
do on one machine.

A full root ends in one line naming the file and the fix, nothing registered, nothing half
written left; the re-run once space is freed converges to a champion (the finished preprocess
is reused from kfp's cache). Two overlapping runs register one version each and end with the
champion the gate picks between them, and every record says against which champion each version
was decided (the gate of one ran before the other's champion existed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from components.synthetic.generator import SynthSettings, generate
from tests.e2e.test_pipeline_local import OVERRIDE_SETS
from tests.integration.test_disk_faults import tmpfs

pytestmark = pytest.mark.slow
PANOPTIC = os.path.join(os.path.dirname(sys.executable), "panoptic")
MODEL = "panoptic-fpn"


def _cli(data: str, root: str, *extra: str) -> list[str]:
    return [PANOPTIC, "pipeline", "run-local", "--data", data, "--root", root, "--set", "train.config=tiny",
            "--set", "train.iterations=4", *OVERRIDE_SETS, "--set", "preprocess.shard_images=4", *extra]


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}   # the default store: ./mlflow.db


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("faults") / "coco")
    generate(root, SynthSettings(train=10, val=4, seed=5, min_side=128, max_side=192), progress=False)
    return root


def _client(cwd):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{cwd}/mlflow.db")


@pytest.mark.timeout(1800)
def test_a_root_that_fills_up_fails_in_one_line_and_the_rerun_converges(data, tmp_path):
    with tmpfs(str(tmp_path / "disk"), "60m") as disk:   # the shards fit; a tiny model's checkpoint (100 MB) does not
        root = os.path.join(disk, "root")
        full = subprocess.run(_cli(data, root), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
        assert full.returncode == 1 and "Traceback" not in full.stderr, full.stdout[-2000:] + full.stderr[-2000:]
        line = full.stderr.strip().splitlines()[-1]
        assert line.startswith(f"Error: task 'train' failed: {root}/"), line
        assert ": No space left on device (the disk is full: free space or write elsewhere)." in line
        assert "(failed task: train, marked FAILED)" in line
        assert "panoptic: task train failed: " in open(os.path.join(root, "pipeline.log")).read()
        client = _client(tmp_path)
        assert client.search_model_versions(f"name = '{MODEL}'") == []
        failed = client.search_runs([client.get_experiment_by_name(MODEL).experiment_id],
                                    "tags.`panoptic.kind` = 'pipeline'")
        assert [r.info.status for r in failed] == ["FAILED"]
        assert "No space left on device" in failed[0].data.tags["task_error.train"]
        left = [os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files]
        assert not [f for f in left if ".tmp-" in f or f.endswith((".pth", ".pt"))], left   # nothing half written
        assert [f for f in left if "/train/" in f] == [f for f in left if f.endswith("/train/checkpoints/"
                                                                                     "train_config.json")]

        assert subprocess.run(["mount", "-o", "remount,size=400m", disk]).returncode == 0   # space freed
        again = subprocess.run(_cli(data, root), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
        assert f"model: {MODEL} version 1, aliases: challenger,champion" in again.stdout
        assert "gate: no champion yet" in again.stdout
        versions = client.search_model_versions(f"name = '{MODEL}'")
        assert len(versions) == 1
        runs = client.search_runs([client.get_experiment_by_name(MODEL).experiment_id],
                                  "tags.`panoptic.kind` = 'pipeline'", order_by=["attributes.start_time ASC"])
        assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]
        assert versions[0].tags["pipeline_run_id"] == runs[1].info.run_id
        assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
        log = open(os.path.join(root, "pipeline.log")).read()
        assert "Executing task 'preprocess'" not in log.split("Pipeline 'panoptic-fpn' finished")[1]   # reused


@pytest.mark.timeout(1800)
def test_two_runs_at_once_register_one_version_each_and_the_gate_picks_the_champion(data, tmp_path):
    from components.register.core import gate, per_class_pq, version_metrics

    root = str(tmp_path / "root")   # one root and one store, as `run-local`'s defaults give two users
    procs = {seed: subprocess.Popen(_cli(data, root, "--set", f"train.seed={seed}"), cwd=tmp_path, env=_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (0, 1)}
    out = {seed: p.communicate(timeout=1500) for seed, p in procs.items()}
    for seed, p in procs.items():
        assert p.returncode == 0, out[seed][0][-2000:] + out[seed][1][-2000:]
    client = _client(tmp_path)
    exp = client.get_experiment_by_name(MODEL).experiment_id
    runs = client.search_runs([exp], "tags.`panoptic.kind` = 'pipeline'")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{MODEL}'")}
    assert sorted(versions) == ["1", "2"]                                       # one version per pipeline run
    assert sorted(v.tags["pipeline_run_id"] for v in versions.values()) == sorted(r.info.run_id for r in runs)
    champion = str(client.get_model_version_by_alias(MODEL, "champion").version)
    other = next(v for v in versions if v != champion)
    m = {v: version_metrics(client, MODEL, v) for v in versions}

    def beats(a, b):
        return gate(m[a]["PQ"], per_class_pq(m[a]), m[b]["PQ"], per_class_pq(m[b]), 0.0, 0.05, b).promote

    loser, winner = versions[other].tags, client.get_model_version(MODEL, champion).tags
    if loser.get("gate.promote") == "False":   # the champion came first; the other lost to it under the lock
        assert not beats(other, champion)
        assert f"not promoted: version {champion} was promoted meanwhile" in loser["gate.outcome"]
        assert winner["gate.reason"].startswith("no champion yet")
    else:                                      # the other was champion first; this one beat it under the lock
        assert beats(champion, other)
        assert winner["gate.reason"].startswith(f"version {other} was promoted meanwhile, and this one beats it too")
        assert winner["gate.champion"] == other
    for r in runs:   # each pipeline run's record says what its version's did
        v = next(k for k, x in versions.items() if x.tags["pipeline_run_id"] == r.info.run_id)
        said = versions[v].tags.get("gate.outcome") if v == other and loser.get("gate.promote") == "False" else \
            client.get_model_version(MODEL, v).tags["gate.reason"]
        assert said in r.data.tags["gate.reason"], (v, r.data.tags["gate.reason"])
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):   # the registry lock is released
        client.get_registered_model(f"{MODEL}.lock")
