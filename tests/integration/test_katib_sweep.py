"""A Katib sweep as Katib runs it, through the pipeline's steps to a registered model: the train
step creates the Experiment through the real ``kubernetes`` client; the Kubernetes stand-in
admits it as Katib's webhook does (tests/kube_rules.py) and its Katib controller
(tests/katib_standin.py) renders each trial's Job as Katib's manifest generator does, rewrites
the trial container as Katib's pod webhook does (the unquoted ``sh -c`` join) and runs it, then
reads the metrics with Katib's filter; the step takes the optimal trial's model, which is
evaluated and registered like any other."""

from __future__ import annotations

import json
import os
import re

import pytest

from pipeline.steps import step_evaluate, step_register, step_subset, step_train
from tests.k8s_standin import KubeStandIn, kubeconfig
from tests.katib_standin import KatibController
from tests.training import MICRO_OVERRIDES, preprocess_step

pytestmark = pytest.mark.integration


@pytest.mark.timeout(1800)
def test_a_katib_sweep_runs_its_trials_through_katibs_wrapping_to_a_registered_model(synth_root, tmp_path,
                                                                                      monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # TPE with median stopping: each trial also prints its PQ after every iteration (report_period 1)
    sweep = {"trials": 2, "backend": "katib", "parallel": 1, "algorithm": "tpe", "early_stopping": "medianstop",
             "report_period": 1, "space": {"iterations": [2, 3], "input.copy_paste_prob": [0.0, 0.5]}}
    train = {"config": "tiny", "iterations": 2, "overrides": MICRO_OVERRIDES, "device": "cpu", "sweep": sweep,
             "namespace": "team-a", "image": "panoptic-cuda:test"}
    run = step_subset(data_uri=synth_root, train_out=str(tmp_path / "st"), val_out=str(tmp_path / "sv"),
                      settings={"size": 6, "val_size": 3}, train=train, mlflow_uri=uri)
    preprocess_step(data_uri=synth_root, subset={"size": 6, "val_size": 3}, train_manifest=str(tmp_path / "st"),
                    val_manifest=str(tmp_path / "sv"), train_out=str(tmp_path / "pt"), val_out=str(tmp_path / "pv"),
                    settings={"shard_images": 4, "workers": 0}, run_id=run, mlflow_uri=uri)
    katib = KatibController()
    monkeypatch.setattr("components.train.launcher.POLL_S", 0.5)
    with KubeStandIn(katib) as k8s:
        monkeypatch.setenv("KUBECONFIG", kubeconfig(str(tmp_path / "kubeconfig"), k8s.url, "team-a"))
        model = step_train(train_shards=str(tmp_path / "pt"), model_out=str(tmp_path / "m"), settings=train,
                           cluster={"accelerator": "", "s3_secret": ""}, run_id=run, mlflow_uri=uri,
                           val_shards=str(tmp_path / "pv"))
        assert not k8s.refused, k8s.refused
        post, = k8s.calls("POST", "/experiments")
        assert post["path"] == "/apis/kubeflow.org/v1beta1/namespaces/team-a/experiments"

    # every trial ran through Katib's wrapping, and its metrics came out of the collector's file
    assert len(katib.trials) == 2
    for trial in katib.trials:
        assert trial["command"] == ["sh", "-c"] and len(trial["args"]) == 1 and " 1>" in trial["args"][0]
        assert trial["returncode"] == 0 and trial["completed"], trial["log"][-2000:]
        assert set(trial["metrics"]) == {"PQ", "SQ", "RQ"}
        iterations = int(re.search(r"iterations=(\d+)", trial["args"][0]).group(1))
        assert len(trial["metrics"]["PQ"]) == iterations + 1   # one per iteration, then the final model's
        record = json.load(open(tmp_path / "checkpoints" / "trials" / trial["name"] / "trial.json"))
        assert record["metrics"]["PQ"] == pytest.approx(trial["metrics"]["PQ"][-1], abs=1e-6)
    # Katib's optimal trial by the rendered strategy (latest: the final model's PQ)
    best = max(katib.trials, key=lambda t: t["metrics"]["PQ"][-1])
    trial_model = tmp_path / "checkpoints" / "trials" / best["name"] / "model.pt"
    assert open(model, "rb").read() == trial_model.read_bytes()
    lineage = json.load(open(tmp_path / "m" / "lineage.json"))
    assert float(lineage["sweep_best_PQ"]) == pytest.approx(best["metrics"]["PQ"][-1], abs=1e-6)

    # evaluated and registered as the DAG does next
    metrics = step_evaluate(model_uri=model, val_shards=str(tmp_path / "pv"), out=str(tmp_path / "evaluation"),
                            settings={"report_samples": 0, "num_workers": 0}, run_id=run, mlflow_uri=uri)
    assert metrics["PQ"] == pytest.approx(best["metrics"]["PQ"][-1], abs=1e-6)
    version, promote = step_register(model_uri=model, eval_dir=str(tmp_path / "evaluation"),
                                     settings={"name": "katib-sweep"}, run_id=run, mlflow_uri=uri)
    assert version == "1" and promote
    client = MlflowClient(uri)
    stage = client.search_runs([client.get_run(run).info.experiment_id],
                               f"tags.mlflow.parentRunId = '{run}' and tags.`panoptic.stage` = 'train'")[0]
    assert stage.data.tags["sweep.best_trial"] == best["name"] and stage.data.tags["sweep.katib_experiment"]
    assert os.path.exists(tmp_path / "evaluation" / "metrics.json")
