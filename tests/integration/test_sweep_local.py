"""A local sweep through the pipeline's steps: three real trials (train + evaluate) as MLflow
child runs of the train stage, the best trial's model as the stage's output (what the gate
then sees), and `runs compare` listing the trials."""

from __future__ import annotations

import json
import os

import pytest

from components.register.compare import compare_runs, history
from pipeline.steps import step_subset, step_train
from tests.training import MICRO_OVERRIDES, preprocess_step

pytestmark = pytest.mark.integration


def test_local_sweep_logs_trials_and_outputs_the_best_model(synth_root, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    sweep = {"trials": 3, "seed": 1, "space": {"iterations": [2, 4], "solver.base_lr": {"min": 0.002, "max": 0.02},
                                                "input.copy_paste_prob": [0.0, 0.5]}}
    train = {"config": "tiny", "iterations": 3, "overrides": MICRO_OVERRIDES, "device": "cpu", "sweep": sweep}
    run = step_subset(data_uri=synth_root, train_out=str(tmp_path / "st"), val_out=str(tmp_path / "sv"),
                      settings={"size": 6, "val_size": 3}, train=train, mlflow_uri=uri)
    preprocess_step(data_uri=synth_root, subset={"size": 6, "val_size": 3}, train_manifest=str(tmp_path / "st"),
                    val_manifest=str(tmp_path / "sv"), train_out=str(tmp_path / "pt"), val_out=str(tmp_path / "pv"),
                    settings={"shard_images": 4, "workers": 0}, run_id=run, mlflow_uri=uri)
    model = step_train(train_shards=str(tmp_path / "pt"), model_out=str(tmp_path / "m"), settings=train, run_id=run,
                       mlflow_uri=uri, val_shards=str(tmp_path / "pv"))

    client = MlflowClient(uri)
    parent = client.get_run(run)
    [stage] = client.search_runs([parent.info.experiment_id],
                                 f"tags.mlflow.parentRunId = '{run}' and tags.`panoptic.stage` = 'train'")
    trials = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{stage.info.run_id}'")
    assert len(trials) == 3 and all(t.data.tags["panoptic.kind"] == "trial" for t in trials)
    pq = {int(t.data.tags["sweep.trial"]): t.data.metrics["PQ"] for t in trials}
    best = max(sorted(pq), key=lambda i: (pq[i], -i))
    # the pipeline run is named after the trial that won; the trials after the run as it started
    base, won = parent.info.run_name.split(" · sweep: ")
    assert won == f"trial {best} won"
    assert {t.info.run_name for t in trials} == {f"trial {i} · {base}" for i in range(3)}
    assert stage.data.tags["sweep.best_trial"] == str(best)
    assert [t.data.tags["sweep.best"] for t in sorted(trials, key=lambda t: t.data.tags["sweep.trial"])] == \
        [str(i == best) for i in range(3)]
    for t in trials:   # each trial is a real training: curves and its own params
        assert any(k.startswith("train/") for k in t.data.metrics) and "sweep.iterations" in t.data.params
    # the stage's model is the best trial's, byte for byte, and says what it was; the trials (with their
    # checkpoints) lie beside the Model artifact, not in it
    trial = tmp_path / "checkpoints" / "trials" / f"trial-{best:03d}" / "model.pt"
    assert open(model, "rb").read() == open(trial, "rb").read()
    assert sorted(os.listdir(tmp_path / "m")) == ["lineage.json", "model.pt", "train_config.json"]
    lineage = json.load(open(tmp_path / "m" / "lineage.json"))
    best_run = next(t for t in trials if t.data.tags["sweep.trial"] == str(best))
    assert {k: str(v) for k, v in json.loads(lineage["sweep_best"]).items()} == \
        {k[len("sweep."):]: v for k, v in best_run.data.params.items() if k.startswith("sweep.")}
    assert float(lineage["sweep_best_PQ"]) == pytest.approx(pq[best], abs=1e-6)
    config = json.load(open(tmp_path / "m" / "train_config.json"))
    assert config["solver"]["max_iter"] == json.loads(lineage["sweep_best"])["iterations"]
    # runs compare lists the trials with their PQ and says which won
    rows = [r for r in history() if r["kind"] == "trial"]
    assert sorted(r["PQ"] for r in rows) == sorted(pq.values())
    assert sum("the best" in r["reason"] for r in rows) == 1
    table = compare_runs(width=200)
    assert table.count("sweep trial") == 3 and "sweep.iterations" in compare_runs(wide=True)
