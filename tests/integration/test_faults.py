"""Untrusted files and killed processes: the fault suite (tests/fault_suite.py) through every
command, SIGKILL of preprocess at three points and of register at two, each followed by a
re-run that must converge to what an uninterrupted run gives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from components.synthetic.generator import SynthSettings, generate
from components.train.trainer import train
from tests.fault_suite import render, run_suite
from tests.training import make_shards, micro_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    root = str(work / "coco")
    generate(root, SynthSettings(train=4, val=6, seed=11, min_side=96, max_side=160), progress=False)
    model = train(micro_config(solver={"max_iter": 1}), make_shards(root, str(work / "t")), str(work / "m"),
                  progress=False).model_uri
    return root, model, work


def test_fault_suite_every_case_is_named_or_quarantined_and_nothing_is_lost(base):
    root, model, work = base
    rec = run_suite(root, model, str(work / "cases"))
    print("\n" + render(rec))
    assert rec.failures == []
    c = rec.counts
    assert sum(c["data validate"].values()) >= 80 and sum(c["preprocess"].values()) >= 80
    assert sum(c["pq"].values()) >= 30 and sum(c["predict"].values()) >= 20 and sum(c["evaluate"].values()) >= 12
    assert all(v["traceback"] == 0 for v in c.values())
    assert c["preprocess"]["quarantine line"] >= 30  # the bad samples were kept out, and said so
    assert c["evaluate"]["named error"] == sum(c["evaluate"].values())  # a damaged shard is never read as data


def _run(args: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kill_at:
        env["PANOPTIC_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True, timeout=600)


def _tree(folder: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


def test_preprocess_killed_at_three_points_then_rerun_is_byte_identical(base, tmp_path):
    root, _, _ = base
    manifest = str(tmp_path / "subset")
    assert _run(["components.select_subset", "--source", root, "--split", "val2017", "--out", manifest]).returncode == 0
    def args(out):
        return ["components.preprocess", "--manifest", manifest, "--out", out, "--workers", "0", "--shard-images", "2",
                "--quiet"]

    clean = str(tmp_path / "clean")
    assert _run(args(clean)).returncode == 0
    out = str(tmp_path / "killed")
    for point in ("preprocess.shard_written:2", "preprocess.marker_written:1", "storage.before_rename:2"):
        r = _run(args(out), kill_at=point)
        assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr[-500:])
    assert any(n.startswith(".tmp-") for n in os.listdir(out) + os.listdir(os.path.join(out, "_done")))  # half-written
    r = _run(args(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert _tree(out) == _tree(clean)  # shards, markers, index.json, quarantine.jsonl: the same bytes


def test_register_killed_then_rerun_registers_one_version(base, tmp_path, monkeypatch):
    _, model, _ = base
    from components.common.tracking import start_pipeline_run
    from components.evaluate.core import EvaluateSettings, evaluate

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    shards = make_shards(base[0], str(tmp_path / "val"), split="val2017")
    evaluate(model, shards, str(tmp_path / "eval"), EvaluateSettings(report_samples=0), progress=False)
    run = start_pipeline_run(uri)
    args = ["components.register", "--model", model, "--eval-dir", str(tmp_path / "eval"), "--run-id", run]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for point in ("register.model_logged", "register.version_created", "register.tagged"):
        r = _run(args, kill_at=point)
        assert r.returncode == -signal.SIGKILL, (point, r.stderr[-1000:])
    r = _run(args)
    assert r.returncode == 0, r.stderr[-2000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    versions = client.search_model_versions("name = 'panoptic-fpn'")
    assert len(versions) == 1  # two kills after the version existed: found again, not registered twice
    v = versions[0]
    assert v.tags["pipeline_run_id"] == run and v.tags["gate"] == "pass"
    assert {k: str(v) for k, v in client.get_registered_model("panoptic-fpn").aliases.items()} == {
        "challenger": "1", "champion": "1"}
