"""Scheduled retraining against a real MLflow server (PostgreSQL backend, S3 artifacts on moto):
the gate compares champion and challenger on the same validation data, a registry fault never
promotes, a warm start loads the champion's weights. (The skip of a run with nothing new, and
the forced retrain, run through kfp.local in tests/e2e.)"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager

import pytest
import torch

from components.common.tracking import RegistryError, start_pipeline_run
from components.evaluate.core import EvaluateSettings, evaluate
from components.register.core import IncomparableMetrics, RegisterSettings, register
from components.select_subset.core import SplitSettings, select_subset
from components.train.trainer import train
from pipeline.steps import (
    step_decide,
    step_evaluate,
    step_promote,
    step_register,
    step_score_champion,
    step_subset,
    step_train,
)
from tests.fault_proxy import FaultProxy
from tests.servers import faulty_proxy, mlflow_server, moto_s3, postgres_database
from tests.training import MICRO_OVERRIDES, make_shards, micro_config

pytestmark = pytest.mark.integration

EVAL = {"report_samples": 1, "batch_size": 2, "num_workers": 0}


@pytest.fixture(scope="module")
def server():
    with moto_s3("mlflow-artifacts"), postgres_database() as db, \
            mlflow_server(db, "s3://mlflow-artifacts/panoptic") as url:
        yield url


@pytest.fixture(scope="module")
def data(synth_root, tmp_path_factory):
    """Train shards, two different validation subsets of the same split (A and B), two models."""
    tmp = tmp_path_factory.mktemp("retrain")
    train_shards = make_shards(synth_root, str(tmp / "train"))
    val = {}
    for name, seed in (("A", 0), ("B", 1)):
        m = select_subset(SplitSettings(size=4, seed=seed), synth_root, "val2017", str(tmp / f"val{name}")).manifest_uri
        from components.preprocess.core import PreprocessSettings, preprocess

        preprocess(PreprocessSettings(shard_images=4, workers=0), m, str(tmp / f"val{name}" / "shards"), progress=False)
        val[name] = str(tmp / f"val{name}" / "shards")
    m1 = train(micro_config(solver={"max_iter": 2}), train_shards, str(tmp / "m1"), progress=False).model_uri
    m2 = train(micro_config(solver={"max_iter": 3}), train_shards, str(tmp / "m2"), progress=False).model_uri
    return {"train": train_shards, "val": val, "m1": m1, "m2": m2, "tmp": tmp}


def _versions(url: str, name: str = "panoptic-fpn") -> list:
    from mlflow.tracking import MlflowClient

    return MlflowClient(url).search_model_versions(f"name = '{name}'")


def test_champion_is_rescored_on_the_challengers_validation_data(server, data, tmp_path):
    val = data["val"]
    assert json.load(open(os.path.join(val["A"], "index.json")))["source_manifest_hash"] != \
        json.load(open(os.path.join(val["B"], "index.json")))["source_manifest_hash"]
    run1 = start_pipeline_run(server)
    step_evaluate(model_uri=data["m1"], val_shards=val["A"], out=str(tmp_path / "evalA"), settings=EVAL, run_id=run1,
                  mlflow_uri=server)
    assert step_score_champion(val_shards=val["A"], out=str(tmp_path / "champA"), settings=EVAL, run_id=run1,
                               mlflow_uri=server) == "none"
    version, promote = step_register(model_uri=data["m1"], eval_dir=str(tmp_path / "evalA"),
                                     champion_dir=str(tmp_path / "champA"), run_id=run1, mlflow_uri=server)
    assert promote
    step_promote(version=version, run_id=run1, mlflow_uri=server)

    # the next run's validation subset is B: the champion's PQ on A says nothing about B
    run2 = start_pipeline_run(server)
    challenger = step_evaluate(model_uri=data["m2"], val_shards=val["B"], out=str(tmp_path / "evalB"), settings=EVAL,
                               run_id=run2, mlflow_uri=server)
    with pytest.raises(IncomparableMetrics, match="measured on validation samples"):
        register(data["m2"], str(tmp_path / "evalB"), RegisterSettings(promote=False), uri=server)  # nothing to compare
    assert step_score_champion(val_shards=val["B"], out=str(tmp_path / "champB"), settings=EVAL, run_id=run2,
                               mlflow_uri=server) == "re-scored"
    rescored = json.load(open(tmp_path / "champB" / "champion.json"))
    direct = evaluate(data["m1"], val["B"], str(tmp_path / "m1_on_B"), EvaluateSettings(**EVAL), progress=False).metrics
    assert rescored["metrics"]["PQ"] == pytest.approx(direct["PQ"], abs=1e-9)  # the champion's model, on B
    assert rescored["metrics"]["val_manifest_hash"] == challenger["val_manifest_hash"]
    assert rescored["metrics"]["val_samples_digest"] == challenger["val_samples_digest"]
    version2, promote2 = step_register(model_uri=data["m2"], eval_dir=str(tmp_path / "evalB"),
                                       champion_dir=str(tmp_path / "champB"), run_id=run2, mlflow_uri=server)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server)
    reg_run = client.get_model_version("panoptic-fpn", version2).tags["register_run_id"]
    gate = json.load(open(client.download_artifacts(reg_run, "gate.json", str(tmp_path))))
    assert gate["champion"]["source"] == "re-scored" and gate["champion"]["version"] == version
    assert gate["champion"]["PQ"] == pytest.approx(direct["PQ"])
    assert gate["champion"]["val_manifest_hash"] == gate["challenger"]["val_manifest_hash"] \
        == challenger["val_manifest_hash"]
    assert gate["champion"]["val_samples_digest"] == gate["challenger"]["val_samples_digest"] \
        == challenger["val_samples_digest"]
    assert gate["decision"]["champion_pq"] == pytest.approx(direct["PQ"])
    assert gate["decision"]["promote"] == promote2 == (challenger["PQ"] > direct["PQ"])
    # registering again for the same pipeline run and model file adds no version
    again, _ = step_register(model_uri=data["m2"], eval_dir=str(tmp_path / "evalB"),
                             champion_dir=str(tmp_path / "champB"), run_id=run2, mlflow_uri=server)
    assert again == version2 and len(_versions(server)) == 2


def test_a_registry_server_error_fails_register_and_promotes_nothing(server, data, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast: the fault is permanent here
    before = len(_versions(server))
    champion = MlflowClient(server).get_model_version_by_alias("panoptic-fpn", "champion").version
    evaluate(data["m2"], data["val"]["B"], str(tmp_path / "eval"), EvaluateSettings(**EVAL), progress=False)
    with faulty_proxy(server, fail=("registered-models/alias",)) as proxy:
        with pytest.raises(RegistryError, match="cannot look up panoptic-fpn@champion"):
            register(data["m2"], str(tmp_path / "eval"), RegisterSettings(), uri=proxy.url)
        with pytest.raises(RegistryError):  # nor does a scheduled run decide "no champion, train"
            step_decide(train_manifest=os.path.join(data["tmp"], "train", "subset"), mlflow_uri=proxy.url)
        assert proxy.hits
        assert len(_versions(server)) == before
        assert MlflowClient(server).get_model_version_by_alias("panoptic-fpn", "champion").version == champion
    # the registry answers again: the retry goes through
    champion_eval = evaluate(data["m1"], data["val"]["B"], str(tmp_path / "champ"), EvaluateSettings(**EVAL),
                             progress=False).metrics
    r = register(data["m2"], str(tmp_path / "eval"), RegisterSettings(promote=False), uri=server,
                 champion_eval=champion_eval)
    assert len(_versions(server)) == before + 1 and r.version


def test_warm_start_from_the_champion_loads_its_weights(server, data, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from components.model.artifact import load_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    champion = MlflowClient(server).get_model_version_by_alias("panoptic-fpn", "champion")
    settings = {"config": "tiny", "init": "champion", "overrides": {**MICRO_OVERRIDES, "solver.base_lr": 0.0},
                "iterations": 1}
    model_uri = step_train(train_shards=data["train"], model_out=str(tmp_path / "warm"), settings=settings,
                           mlflow_uri=server)
    lineage = json.load(open(tmp_path / "warm" / "lineage.json"))
    assert lineage["parent_model_version"] == f"panoptic-fpn/{champion.version}" and lineage["init"] == "champion"
    cfg = json.load(open(tmp_path / "warm" / "train_config.json"))
    assert cfg["model"]["weights"] == f"models:/panoptic-fpn/{champion.version}"  # pinned, not the moving alias
    # one step at learning rate 0 leaves the weights as they were before the first step
    warm, _, _ = load_model(model_uri)
    theirs, _, _ = load_model("models:/panoptic-fpn@champion")
    a, b = warm.state_dict(), theirs.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_registry_outage_mid_pipeline_fails_each_stage_promotes_nothing_and_a_retry_completes(server, data, tmp_path,
                                                                                             monkeypatch, synth_root):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = MlflowClient(server)
    champion_before = client.get_model_version_by_alias("panoptic-fpn", "champion").version
    versions_before = len(_versions(server))
    run = start_pipeline_run(server)  # the run began while the server answered
    # register's input as the evaluate stage leaves it (that stage itself now stops before it
    # evaluates when MLflow is down: its run, with system metrics, opens first)
    evaluate(data["m2"], data["val"]["B"], str(tmp_path / "e"), EvaluateSettings(**EVAL), progress=False)
    subset = os.path.join(data["tmp"], "train", "subset")
    train_settings = {"config": "tiny", "iterations": 1, "overrides": MICRO_OVERRIDES}
    stages = {
        "subset": lambda uri: step_subset(data_uri=synth_root, train_out=str(tmp_path / "s_t"),
                                          val_out=str(tmp_path / "s_v"), settings={"size": 4}, mlflow_uri=uri),
        "decide": lambda uri: step_decide(train_manifest=subset, train=train_settings, run_id=run, mlflow_uri=uri),
        "train": lambda uri: step_train(train_shards=data["train"], model_out=str(tmp_path / "m"),
                                        settings=train_settings, run_id=run, mlflow_uri=uri),
        "evaluate": lambda uri: step_evaluate(model_uri=data["m2"], val_shards=data["val"]["B"],
                                              out=str(tmp_path / "e"), settings=EVAL, run_id=run, mlflow_uri=uri),
        "score champion": lambda uri: step_score_champion(val_shards=data["val"]["B"], out=str(tmp_path / "c"),
                                                          settings=EVAL, run_id=run, mlflow_uri=uri),
        "register": lambda uri: step_register(model_uri=data["m2"], eval_dir=str(tmp_path / "e"),
                                              champion_dir=str(tmp_path / "c"), run_id=run, mlflow_uri=uri),
    }
    with faulty_proxy(server, fail=("/api/",)) as proxy:
        for name, step in stages.items():
            with pytest.raises(Exception) as e:  # each stage stops, saying what it could not reach
                step(proxy.url)
            assert proxy.url in str(e.value) or "500" in str(e.value) or "INTERNAL_ERROR" in str(e.value), (name, e)
    assert len(_versions(server)) == versions_before
    assert client.get_model_version_by_alias("panoptic-fpn", "champion").version == champion_before
    # the server answers again: the same steps complete the run (evaluate first: register needs it)
    for name in ("evaluate", "score champion", "register"):
        stages[name](server)
    assert len(_versions(server)) == versions_before + 1


def test_evaluation_during_training_is_logged_per_step_and_the_best_iteration_is_registered(server, data, tmp_path):
    import hashlib

    from mlflow.tracking import MlflowClient

    run = start_pipeline_run(server)
    settings = {"config": "tiny", "iterations": 6, "select": "best",
                "overrides": {**MICRO_OVERRIDES, "solver.eval_period": 2, "solver.eval_images": 3}}
    model_out = tmp_path / "model"
    model_uri = step_train(train_shards=data["train"], val_shards=data["val"]["A"], model_out=str(model_out),
                           settings=settings, run_id=run, mlflow_uri=server)
    client = MlflowClient(server)
    train_run = next(r for r in client.search_runs(client.get_run(run).info.experiment_id,
                                                   f"tags.mlflow.parentRunId = '{run}'")
                     if r.data.tags.get("mlflow.runName", "").startswith("train"))
    curve = client.get_metric_history(train_run.info.run_id, "val/PQ")
    assert sorted(m.step for m in curve) == [2, 4, 6]   # MLflow's chart of PQ against iteration
    best = json.load(open(tmp_path / "checkpoints" / "best" / "best.json"))
    assert best["value"] == max(m.value for m in curve)
    lineage = json.load(open(model_out / "lineage.json"))
    assert lineage["model_checkpoint"] == "best" and lineage["model_iteration"] == str(best["iteration"])

    def digest(p):
        return hashlib.sha256(open(p, "rb").read()).hexdigest()

    assert digest(model_uri) == digest(tmp_path / "checkpoints" / "best" / "model.pt")
    step_evaluate(model_uri=model_uri, val_shards=data["val"]["A"], out=str(tmp_path / "eval"), settings=EVAL,
                  run_id=run, mlflow_uri=server)
    version, _ = step_register(model_uri=model_uri, eval_dir=str(tmp_path / "eval"), run_id=run, mlflow_uri=server,
                               settings={"name": "panoptic-best"})
    tags = client.get_model_version("panoptic-best", version).tags
    assert tags["model_digest"] == digest(tmp_path / "checkpoints" / "best" / "model.pt")
    assert tags["model_checkpoint"] == "best" and tags["model_iteration"] == str(best["iteration"])
    assert f"iteration {best['iteration']}" in client.get_model_version("panoptic-best", version).description


def _champion_on(server, val_shards, tmp_path) -> dict:
    step_score_champion(val_shards=val_shards, out=str(tmp_path / "champ"), settings=EVAL, mlflow_uri=server)
    return json.loads((tmp_path / "champ" / "champion.json").read_text())["metrics"]


@contextmanager
def _said():
    """The warnings our loggers give inside the block (the steps' setup_logging stops them
    propagating to pytest's capture)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("components")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_a_version_create_whose_answer_is_lost_makes_one_version(server, data, tmp_path):
    """The server makes the version and the connection closes before its answer: MLflow's client
    retries the create (a second version of one registration); register keeps the first."""
    evaluate(data["m2"], data["val"]["B"], str(tmp_path / "eval"), EvaluateSettings(**EVAL), progress=False)
    champion = _champion_on(server, data["val"]["B"], tmp_path)
    before = {v.version for v in _versions(server)}
    with FaultProxy(server) as proxy, _said() as said:
        proxy.inject("cut", count=1, match=r"/model-versions/create$", method="POST")
        r = register(data["m2"], str(tmp_path / "eval"), RegisterSettings(promote=False), uri=proxy.url,
                     champion_eval=champion)
    assert proxy.hits == [("cut", "POST", "/api/2.0/mlflow/model-versions/create")]
    text = "\n".join(rec.getMessage() for rec in said)
    assert "POST /api/2.0/mlflow/model-versions/create: the MLflow server" in text and "retry 1 of 5" in text
    assert "kept version" in text
    made = {v.version for v in _versions(server)} - before
    assert made == {r.version}


def test_the_registry_going_away_for_seconds_mid_register_is_ridden_out(server, data, tmp_path):
    """Every request dropped for 6 s (a server restarting) from the moment register starts: the
    retries carry it through, each said, and it registers one version."""
    evaluate(data["m2"], data["val"]["B"], str(tmp_path / "eval"), EvaluateSettings(**EVAL), progress=False)
    champion = _champion_on(server, data["val"]["B"], tmp_path)
    before = len(_versions(server))
    with FaultProxy(server) as proxy, _said() as said:
        proxy.inject("drop", seconds=6)
        r = register(data["m2"], str(tmp_path / "eval"), RegisterSettings(promote=False), uri=proxy.url,
                     champion_eval=champion)
    assert proxy.hits and all(h[0] == "drop" for h in proxy.hits)
    assert any("did not answer" in rec.getMessage() and "retry" in rec.getMessage() for rec in said)
    assert len(_versions(server)) == before + 1 and r.version


def test_a_lock_create_whose_answer_is_lost_is_our_lock_not_a_wait(server, data, tmp_path):
    """The registry makes the lock and the answer is lost: the client's retry hears "already
    exists", and the holder it reads is this process itself: it holds the lock (it waited 600 s on
    itself before), registers one version and releases the lock."""
    import time

    from mlflow.tracking import MlflowClient

    evaluate(data["m2"], data["val"]["B"], str(tmp_path / "eval"), EvaluateSettings(**EVAL), progress=False)
    champion = _champion_on(server, data["val"]["B"], tmp_path)
    before = len(_versions(server))
    t = time.monotonic()
    with FaultProxy(server) as proxy:
        proxy.inject("cut", count=1, match=r"/registered-models/create$", method="POST")
        r = register(data["m2"], str(tmp_path / "eval"), RegisterSettings(promote=False), uri=proxy.url,
                     champion_eval=champion)
    assert proxy.hits == [("cut", "POST", "/api/2.0/mlflow/registered-models/create")]
    assert time.monotonic() - t < 120    # far from the lock's stale time, let alone its 600 s wait
    assert len(_versions(server)) == before + 1 and r.version
    assert not MlflowClient(server).search_registered_models("name = 'panoptic-fpn.lock'")   # released
