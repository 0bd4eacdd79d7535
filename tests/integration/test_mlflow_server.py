"""Registry and gate against a real MLflow server: PostgreSQL backend store, S3 artifact store
(moto's server), both on 127.0.0.1. Log, register, gate (one promoted, one rejected), load by
alias, predict."""

import io
import json
import os

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from components.evaluate.core import EvaluateSettings, evaluate
from components.train.trainer import train
from tests.servers import mlflow_server, moto_s3, postgres_database
from tests.training import make_shards, micro_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(synth_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reg")
    shards = make_shards(synth_root, str(tmp / "train"))
    val = make_shards(synth_root, str(tmp / "val"), split="val2017")
    model = train(micro_config(solver={"max_iter": 2}), shards, str(tmp / "run"), progress=False).model_uri
    evaluate(model, val, str(tmp / "eval"), EvaluateSettings(report_samples=2), progress=False)
    return model, str(tmp / "eval")


def test_register_gate_alias_and_predict_on_a_real_server(trained, synth_root, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from components.register.core import RegisterSettings, register

    model, eval_dir = trained
    with moto_s3("mlflow-artifacts"), postgres_database() as db, \
            mlflow_server(db, "s3://mlflow-artifacts/panoptic") as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        first = register(model, eval_dir, RegisterSettings(name="pfpn", margin=0.0, tolerance=0.05))
        assert first.version == "1" and first.aliases == ["challenger", "champion"] and first.decision.promote
        second = register(model, eval_dir, RegisterSettings(name="pfpn", margin=0.01, tolerance=0.05))
        assert second.version == "2" and second.aliases == ["challenger"] and not second.decision.promote
        assert "does not beat" in second.decision.reason
        client = MlflowClient(url)
        assert str(client.get_model_version_by_alias("pfpn", "champion").version) == "1"
        assert str(client.get_model_version_by_alias("pfpn", "challenger").version) == "2"
        # the artifacts are in S3 (moto), served through the tracking server
        import boto3
        keys = [o["Key"] for o in boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).list_objects_v2(
            Bucket="mlflow-artifacts")["Contents"]]
        assert any(k.endswith("model.pt") for k in keys) and any(k.endswith("gate.json") for k in keys)

        # load by alias as a pyfunc and predict one image
        import mlflow

        pyfunc = mlflow.pyfunc.load_model("models:/pfpn@champion")
        img = open(os.path.join(synth_root, "val2017", os.listdir(os.path.join(synth_root, "val2017"))[0]), "rb").read()
        out = pyfunc.predict(pd.DataFrame({"image": [img]}))
        ids = np.array(Image.open(io.BytesIO(out["panoptic_png"][0])))
        h, w = Image.open(io.BytesIO(img)).size[::-1]
        assert ids.shape == (h, w, 3)
        assert isinstance(json.loads(out["segments_info"][0]), list)
        assert pyfunc.metadata.get_input_schema().input_names() == ["image"]

        # and the CLI
        from components.predict.cli import predict_cmd

        src = os.path.join(synth_root, "val2017")
        r = CliRunner().invoke(predict_cmd, [src, "--model", "models:/pfpn@champion", "--out", str(tmp_path / "p")])
        assert r.exit_code == 0, r.output
        names = sorted(os.listdir(tmp_path / "p"))
        stem = sorted(os.listdir(src))[0].rsplit(".", 1)[0]
        assert {f"{stem}.png", f"{stem}_overlay.png", f"{stem}.json"} <= set(names)
        assert len(names) == 3 * len(os.listdir(src))


def test_submit_links_the_kfp_run_and_the_mlflow_run_both_ways(synth_root, tmp_path):
    """`submit` with a reachable MLflow server: the MLflow run is created at once (its direct
    address printed), carries the KFP run's id and address, and is the one the first task adopts,
    retried or not: one MLflow run per KFP run."""
    from mlflow.tracking import MlflowClient

    from pipeline.cli import compile_pipeline, pipeline
    from pipeline.steps import step_subset
    from tests.kfp_standin import KfpStandIn

    package = compile_pipeline(str(tmp_path / "p.yaml"))
    with postgres_database() as db, mlflow_server(db, str(tmp_path / "artifacts")) as url, KfpStandIn() as kfp:
        r = CliRunner().invoke(pipeline, ["submit", "--host", kfp.url, "--package", package, "--run-name", "nightly-7",
                                          "--experiment", "team-nightly", "--set", "data_uri=s3://coco/panoptic",
                                          "--set", f"mlflow_uri={url}"])
        assert r.exit_code == 0, r.output
        (kfp_run_id, run), = kfp.runs.items()
        params = run["runtime_config"]["parameters"]
        client = MlflowClient(url)
        mlflow_run = client.get_run(params["mlflow_run_id"])
        exp = client.get_experiment(mlflow_run.info.experiment_id)
        # the same names in both UIs; each links to the other
        assert exp.name == "team-nightly" and mlflow_run.info.run_name == "nightly-7" == run["display_name"]
        assert mlflow_run.data.tags["kfp.run_id"] == kfp_run_id
        assert mlflow_run.data.tags["kfp.run_url"] == f"{kfp.url}/#/runs/details/{kfp_run_id}"
        assert f"MLflow run: {url}/#/experiments/{exp.experiment_id}/runs/{mlflow_run.info.run_id}" in r.output
        assert mlflow_run.info.status == "RUNNING"   # until the exit handler closes it

        # the first task, as the KFP run starts it (twice: a retry) adopts that very run
        kw = dict(data_uri=synth_root, mlflow_uri=url, experiment="team-nightly", run_name="nightly-7",
                  kfp_run_id=kfp_run_id, kfp_run_name="panoptic-fpn-x7k2p", kfp_ui=kfp.url)
        for attempt in range(2):
            got = step_subset(train_out=str(tmp_path / f"t{attempt}"), val_out=str(tmp_path / f"v{attempt}"),
                              mlflow_run_id=params["mlflow_run_id"], link_out=str(tmp_path / "link.md"), **kw)
            assert got == mlflow_run.info.run_id
        # without submit's run (KFP's UI, a recurring run): created once, found again on retry
        made = step_subset(train_out=str(tmp_path / "t2"), val_out=str(tmp_path / "v2"),
                           **{**kw, "kfp_run_id": "run-scheduled-1"})
        again = step_subset(train_out=str(tmp_path / "t3"), val_out=str(tmp_path / "v3"),
                            **{**kw, "kfp_run_id": "run-scheduled-1"})
        assert made == again != mlflow_run.info.run_id
        runs = client.search_runs([exp.experiment_id], "tags.`panoptic.kind` = 'pipeline'")
        assert len(runs) == 2
        link = open(tmp_path / "link.md").read()
        assert f"({url}/#/experiments/{exp.experiment_id}/runs/{mlflow_run.info.run_id})" in link
        assert client.get_run(made).data.tags["kfp.run_name"] == "panoptic-fpn-x7k2p"
