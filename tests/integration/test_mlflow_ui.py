"""What MLflow's own UI shows of a pipeline run, checked through MLflow's client against a real
server (PostgreSQL backend, S3 artifacts on moto): the experiment kind, run names, dataset
inputs with their digests (and search by digest), the per-class table, system metrics of the
train run, the registry's descriptions, and `runs compare` agreeing with all of it."""

from __future__ import annotations

import json
import os
import re

import pytest

from components.common.datasets import digest_of
from components.common.hashing import shard_hash
from components.common.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
from components.evaluate.tables import PER_CLASS_TABLE
from pipeline.steps import (
    step_decide,
    step_evaluate,
    step_promote,
    step_register,
    step_score_champion,
    step_subset,
    step_train,
)
from tests.integration.test_retraining import EVAL
from tests.servers import mlflow_server, moto_s3, postgres_database
from tests.training import MICRO_OVERRIDES, preprocess_step

pytestmark = pytest.mark.integration

EXPERIMENT = "ui-check"


@pytest.fixture(scope="module")
def pipeline_run(synth_root, tmp_path_factory):
    """One pipeline run, stage by stage as the DAG calls them, against a real server."""
    tmp = tmp_path_factory.mktemp("ui")
    with moto_s3("mlflow-artifacts"), postgres_database() as db, \
            mlflow_server(db, "s3://mlflow-artifacts/panoptic") as url:
        os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
        os.environ["MLFLOW_EXPERIMENT_NAME"] = EXPERIMENT
        try:
            train = {"config": "tiny", "iterations": 4, "overrides": MICRO_OVERRIDES}
            run = step_subset(data_uri=synth_root, train_out=str(tmp / "st"), val_out=str(tmp / "sv"),
                              settings={"size": 8, "val_size": 4}, train=train, mlflow_uri=url, experiment=EXPERIMENT)
            assert step_decide(train_manifest=str(tmp / "st"), train=train, run_id=run, mlflow_uri=url) == "train"
            preprocess_step(data_uri=synth_root, subset={"size": 8, "val_size": 4}, train_manifest=str(tmp / "st"),
                            val_manifest=str(tmp / "sv"), train_out=str(tmp / "pt"), val_out=str(tmp / "pv"),
                            settings={"shard_images": 4, "workers": 0}, run_id=run, mlflow_uri=url)
            model = step_train(train_shards=str(tmp / "pt"), model_out=str(tmp / "m"), settings=train, run_id=run,
                               mlflow_uri=url)
            step_evaluate(model_uri=model, val_shards=str(tmp / "pv"), out=str(tmp / "e"), settings=EVAL, run_id=run,
                          mlflow_uri=url)
            step_score_champion(val_shards=str(tmp / "pv"), out=str(tmp / "c"), settings=EVAL, run_id=run,
                                mlflow_uri=url)
            version, promote = step_register(model_uri=model, eval_dir=str(tmp / "e"), champion_dir=str(tmp / "c"),
                                             run_id=run, mlflow_uri=url)
            assert promote
            step_promote(version=version, run_id=run, mlflow_uri=url)
            yield {"url": url, "run": run, "version": version, "tmp": tmp}
        finally:
            os.environ.pop("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", None)
            os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)


def _stages(client, parent) -> dict:
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {r.data.tags["panoptic.stage"]: r for r in runs}


def _inputs(run) -> dict[str, tuple[str, str, dict]]:
    """dataset name -> (digest, context, profile)"""
    return {d.dataset.name: (d.dataset.digest, next(t.value for t in d.tags if t.key == "mlflow.data.context"),
                             json.loads(d.dataset.profile)) for d in run.inputs.dataset_inputs}


def test_experiment_kind_and_run_names(pipeline_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(pipeline_run["url"])
    parent = client.get_run(pipeline_run["run"])
    assert client.get_experiment(parent.info.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert re.fullmatch(r"panoptic-fpn tiny \d{4}-\d\d-\d\d \d\d:\d\d", parent.info.run_name), parent.info.run_name
    stages = _stages(client, parent)
    assert set(stages) == {"subset", "decide", "preprocess", "train", "evaluate", "register"}  # no champion to score
    for stage, r in stages.items():
        assert r.info.run_name == f"{stage} · {parent.info.run_name}"


def test_stage_runs_have_the_subsets_and_shards_as_datasets(pipeline_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(pipeline_run["url"])
    tmp = pipeline_run["tmp"]
    parent = client.get_run(pipeline_run["run"])
    stages = _stages(client, parent)
    train_manifest = json.load(open(tmp / "st" / "manifest.json"))
    val_manifest = json.load(open(tmp / "sv" / "manifest.json"))
    train_index = json.load(open(tmp / "pt" / "index.json"))
    val_index = json.load(open(tmp / "pv" / "index.json"))
    train_subset = (digest_of(train_manifest["manifest_hash"]), "training")
    val_subset = (digest_of(val_manifest["manifest_hash"]), "validation")
    train_shards = (digest_of(shard_hash(train_index)), "training")
    val_shards = (digest_of(shard_hash(val_index)), "validation")
    expected = {
        "subset": {"train2017 subset": train_subset, "val2017 subset": val_subset},
        "preprocess": {"train2017 subset": train_subset, "val2017 subset": val_subset,
                       "train2017 shards": train_shards, "val2017 shards": val_shards},
        "train": {"train2017 subset": train_subset, "train2017 shards": train_shards},
        "evaluate": {"val2017 subset": val_subset, "val2017 shards": val_shards},
    }
    for stage, want in expected.items():
        got = _inputs(stages[stage])
        assert {k: v[:2] for k, v in got.items()} == want, stage
    profile = _inputs(stages["subset"])["train2017 subset"][2]
    assert profile["images"] == 8 == train_manifest["num_images"]
    assert profile["categories"] == sum(1 for v in train_manifest["category_histogram"]["subset"].values() if v) > 0
    assert profile["hash"] == train_manifest["manifest_hash"]
    # the later stages describe the subset exactly as the subset stage did (one dataset in MLflow)
    assert _inputs(stages["train"])["train2017 subset"][2] == profile
    assert _inputs(stages["preprocess"])["train2017 shards"][2]["rows"] == train_index["rows_written"]
    # the pipeline run itself carries the data, so its row in the UI shows it too
    assert set(_inputs(parent)) == {"train2017 subset", "val2017 subset", "train2017 shards", "val2017 shards"}
    # search by dataset digest finds the runs that used it
    found = client.search_runs([parent.info.experiment_id], filter_string=f"dataset.digest = '{train_subset[0]}'")
    names = {r.data.tags.get("panoptic.stage", "pipeline") for r in found}
    assert names == {"pipeline", "subset", "preprocess", "train"}
    assert not client.search_runs([parent.info.experiment_id], filter_string=f"dataset.digest = '{'0' * 32}'")


def test_per_class_table_and_system_metrics(pipeline_run, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(pipeline_run["url"])
    stages = _stages(client, client.get_run(pipeline_run["run"]))
    evaluate = stages["evaluate"]
    table = json.load(open(client.download_artifacts(evaluate.info.run_id, PER_CLASS_TABLE, str(tmp_path))))
    cols = table["columns"]
    rows = [dict(zip(cols, row)) for row in table["data"]]
    metrics = json.load(open(pipeline_run["tmp"] / "e" / "metrics.json"))
    assert len(rows) == len(metrics["results"]["per_class"]) > 0
    for row in rows:
        r = metrics["results"]["per_class"][str(row["category_id"])]
        assert (row["TP"], row["FP"], row["FN"]) == (r["tp"], r["fp"], r["fn"])
        if row["present"]:
            assert row["PQ"] == pytest.approx(100 * r["pq"], abs=1e-3)
        else:
            assert row["PQ"] is None
    # the table is registered with the run, so the UI's evaluation view lists it
    logged = json.loads(evaluate.data.tags["mlflow.loggedArtifacts"])
    assert {"path": PER_CLASS_TABLE, "type": "table"} in logged
    for stage in ("train", "evaluate"):
        system = [k for k in stages[stage].data.metrics if k.startswith("system/")]
        assert "system/cpu_utilization_percentage" in system and "system/system_memory_usage_megabytes" in system, \
            (stage, system)
    assert any(k.startswith("train/") for k in stages["train"].data.metrics)  # the curves, beside them


def test_registry_descriptions_tell_the_story(pipeline_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(pipeline_run["url"])
    metrics = json.load(open(pipeline_run["tmp"] / "e" / "metrics.json"))
    v = client.get_model_version("panoptic-fpn", pipeline_run["version"])
    parent = client.get_run(pipeline_run["run"])
    d = v.description
    assert d.startswith(f"Panoptic FPN tiny, PQ {100 * metrics['PQ']:.2f} on {metrics['images']} validation images: ")
    assert "`" not in d.splitlines()[0] and "*" not in d.splitlines()[0]   # the versions list shows it raw
    rows = {line.split()[0]: line.split()[1:] for line in d.split("```")[1].strip().splitlines()[1:]}
    assert rows["things"] == [f"{100 * metrics[k]:.2f}" for k in ("PQ_th", "SQ_th", "RQ_th")]
    assert rows["stuff"] == [f"{100 * metrics[k]:.2f}" for k in ("PQ_st", "SQ_st", "RQ_st")]
    assert v.tags["gate.reason"] in d and "promoted to champion" in d
    assert digest_of(metrics["val_manifest_hash"]) in d
    assert f"[{parent.info.run_name}]({pipeline_run['url']}/#/experiments/{parent.info.experiment_id}/runs/" \
           f"{parent.info.run_id})" in d
    model = client.get_registered_model("panoptic-fpn")
    assert f"Champion: version {pipeline_run['version']} (PQ {100 * metrics['PQ']:.2f}" in model.description
    assert "challenger" in model.description and "margin" in model.description


def test_runs_compare_agrees_with_the_ui(pipeline_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    from components.register.compare import history

    monkeypatch.setenv("MLFLOW_TRACKING_URI", pipeline_run["url"])
    client = MlflowClient(pipeline_run["url"])
    parent = client.get_run(pipeline_run["run"])
    [row] = [r for r in history(EXPERIMENT) if r["kind"] == "pipeline"]
    assert row["name"] == parent.info.run_name
    assert row["PQ"] == parent.data.metrics["PQ"]
    subset = next(d.dataset for d in parent.inputs.dataset_inputs if d.dataset.name == "train2017 subset")
    assert row["data"] == f"train2017 subset ({subset.digest[:8]})"
    assert row["version"] == pipeline_run["version"] and row["aliases"] == "challenger,champion"
