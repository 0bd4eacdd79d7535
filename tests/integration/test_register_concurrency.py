"""Registrations that overlap, against a real MLflow server (PostgreSQL, S3 artifacts on moto):
`panoptic register` processes started together, and forced into the interleavings that used to
go wrong (a worse model gated before the better one was promoted, then promoted after it). The
registry ends with one version per pipeline run and model file, and the champion is always the
best version that passed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.servers import mlflow_server, moto_s3, postgres_database
from tests.training import make_shards, micro_config

pytestmark = pytest.mark.integration
PANOPTIC = os.path.join(os.path.dirname(sys.executable), "panoptic")


@pytest.fixture(scope="module")
def evaluations(synth_root, tmp_path_factory):
    """Two models and their evaluations on the same validation shards, with PQ set to 0.40 (A) and
    0.60 (B) in their metrics.json, and counts that add up to it (the gate checks the figures
    against them; the model files stay theirs)."""
    from components.evaluate.core import EvaluateSettings, evaluate
    from components.train.trainer import train

    tmp = tmp_path_factory.mktemp("concurrent")
    shards = make_shards(synth_root, str(tmp / "train"))
    val = make_shards(synth_root, str(tmp / "val"), split="val2017")
    out = {}
    for name, iters, pq in (("A", 1, 0.40), ("B", 2, 0.60)):
        model = train(micro_config(solver={"max_iter": iters}), shards, str(tmp / f"m{name}"), progress=False).model_uri
        folder = str(tmp / f"eval{name}")
        evaluate(model, val, folder, EvaluateSettings(report_samples=0, num_workers=0), progress=False)
        path = os.path.join(folder, "metrics.json")
        m = json.load(open(path))
        m["PQ"] = pq
        for r in m["results"]["per_class"].values():
            r["pq"] = pq
        m["counts"] = {c: {"tp": 10, "fp": 0, "fn": 0, "iou": 10 * pq} for c in m["results"]["per_class"]}
        json.dump(m, open(path, "w"))
        out[name] = (model, folder)
    return out


@pytest.fixture(scope="module")
def server():
    with moto_s3("mlflow-artifacts"), postgres_database() as db, \
            mlflow_server(db, "s3://mlflow-artifacts/concurrent") as url:
        yield url


def _register(evaluation, run_id: str, server: str, name: str, pause: str | None = None):
    model, folder = evaluation
    env = {**os.environ, "MLFLOW_TRACKING_URI": server}
    if pause:
        env["PANOPTIC_PAUSE_AT"] = pause
    return subprocess.Popen([PANOPTIC, "register", "--model", model, "--eval-dir", folder, "--name", name,
                             "--run-id", run_id, "--tolerance", "1.0"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _pipeline_run(server: str) -> str:
    from components.common.tracking import start_pipeline_run

    return start_pipeline_run(server)


def _versions(server: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server)
    return client, client.search_model_versions(f"name = '{name}'")


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("interleaving", ["together", "worse waits after its gate", "better waits after its gate"])
def test_two_registrations_at_once_end_with_the_best_champion(interleaving, evaluations, server):
    name = "concurrent-" + interleaving.split()[0]
    runs = {"A": _pipeline_run(server), "B": _pipeline_run(server)}
    pause = {"together": {}, "worse waits after its gate": {"A": "register.gated:15"},
             "better waits after its gate": {"B": "register.gated:15"}}[interleaving]
    procs = {k: _register(evaluations[k], runs[k], server, name, pause.get(k)) for k in ("A", "B")}
    outputs = {k: p.communicate(timeout=900) for k, p in procs.items()}
    for k, p in procs.items():
        assert p.returncode == 0, (k, outputs[k])
    client, versions = _versions(server, name)
    assert len(versions) == 2
    assert sorted(v.tags["pipeline_run_id"] for v in versions) == sorted(runs.values())
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.tags["pipeline_run_id"] == runs["B"]            # 0.60 beats 0.40, whoever came last
    assert client.get_registered_model(name).name == name
    if interleaving == "worse waits after its gate":   # A passed its gate (no champion yet) and then lost it
        loser = next(v for v in versions if v.tags["pipeline_run_id"] == runs["A"])
        assert f"gate: PASS, not promoted: version {champion.version} was promoted meanwhile" in outputs["A"][0]
        assert loser.tags["gate.promote"] == "False" and "not promoted" in loser.tags["gate.outcome"]
        assert loser.description.startswith("**Not promoted**") and "**promoted to champion**" not in \
            loser.description
        assert client.get_run(loser.tags["register_run_id"]).data.tags["gate.promote"] == "False"
        parent = client.get_run(runs["A"]).data.tags
        assert parent["gate.promote"] == "False" and parent["gate.reason"].startswith("passed the gate but not")
        assert parent["model.aliases"] == "challenger"
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):   # the lock is released
        client.get_registered_model(f"{name}.lock")


@pytest.mark.timeout(1800)
def test_the_same_registration_twice_at_once_makes_one_version(evaluations, server):
    name = "concurrent-retry"
    run = _pipeline_run(server)
    procs = [_register(evaluations["B"], run, server, name) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, (out, err)
    client, versions = _versions(server, name)
    assert len(versions) == 1 and versions[0].tags["pipeline_run_id"] == run
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(versions[0].version)


def test_a_gate_figure_that_is_not_a_finite_fraction_promotes_nothing(evaluations, server, tmp_path):
    """NaN, 999, a negative or a string for PQ; an evaluation of another model: refused in one
    line, and the registry keeps its champion."""
    name = "concurrent-hostile"
    run = _pipeline_run(server)
    p = _register(evaluations["A"], run, server, name)
    assert p.wait(timeout=900) == 0
    client, _ = _versions(server, name)
    before = client.get_model_version_by_alias(name, "champion").version
    model_b, folder_b = evaluations["B"]
    for k, value in enumerate(("NaN", "999", "-0.5", '"high"', "Infinity")):
        folder = tmp_path / f"eval-{k}"
        shutil.copytree(folder_b, folder)
        text = open(folder / "metrics.json").read()
        m = json.loads(text)
        text = text.replace(f'"PQ": {json.dumps(m["PQ"])}', f'"PQ": {value}', 1)
        open(folder / "metrics.json", "w").write(text)
        r = subprocess.run([PANOPTIC, "register", "--model", model_b, "--eval-dir", str(folder), "--name", name],
                           env={**os.environ, "MLFLOW_TRACKING_URI": server}, capture_output=True, text=True)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "Error:" in r.stderr and "metrics.json" in r.stderr, r.stderr
    r = subprocess.run([PANOPTIC, "register", "--model", evaluations["A"][0], "--eval-dir", folder_b, "--name", name],
                       env={**os.environ, "MLFLOW_TRACKING_URI": server}, capture_output=True, text=True)
    assert r.returncode == 1 and "is the evaluation of model" in r.stderr, r.stderr
    assert client.get_model_version_by_alias(name, "champion").version == before
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
