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
