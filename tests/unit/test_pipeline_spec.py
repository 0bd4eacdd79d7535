"""The compiled pipeline, and submit/schedule against a local stand-in for the KFP API."""

import yaml
from click.testing import CliRunner

from pipeline.cli import compile_pipeline, cron6, pipeline
from pipeline.dag import ClusterSettings
from tests.kfp_standin import KfpStandIn


def _docs(path):
    return list(yaml.safe_load_all(open(path)))


def test_compiled_yaml_has_the_dag_gpus_condition_and_cluster_settings(tmp_path):
    out = str(tmp_path / "p.yaml")
    compile_pipeline(out, ClusterSettings(gpus=2, node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                                          data_pvc="coco-data", s3_endpoint="http://minio.panoptic:9000"))
    spec, platform = _docs(out)
    tasks = spec["root"]["dag"]["tasks"]
    assert {"select-subset", "preprocess", "train", "evaluate", "register", "condition-1"} <= set(tasks)
    assert set(tasks["train"]["dependentTasks"]) == {"preprocess", "select-subset"}
    assert set(tasks["register"]["dependentTasks"]) == {"evaluate", "select-subset", "train"}
    # the gate: promotion runs only when register says so
    assert "register-Output" in tasks["condition-1"]["triggerPolicy"]["condition"]
    inner = spec["components"]["comp-condition-1"]["dag"]["tasks"]
    assert "promote-champion" in inner
    # retries on the data steps
    assert tasks["select-subset"]["retryPolicy"]["maxRetryCount"] == 2
    assert tasks["preprocess"]["retryPolicy"]["maxRetryCount"] == 2
    # GPUs on train and evaluate only
    execs = spec["deploymentSpec"]["executors"]
    for name in ("exec-train", "exec-evaluate"):
        acc = execs[name]["container"]["resources"]["accelerator"]
        assert acc["resourceCount"] == "2" and acc["resourceType"] == "nvidia.com/gpu"
    assert "accelerator" not in execs["exec-preprocess"]["container"].get("resources", {})
    # images from the one setting
    assert execs["exec-train"]["container"]["image"].endswith("/panoptic-cuda:0.1.0")
    assert execs["exec-preprocess"]["container"]["image"].endswith("/panoptic-cpu:0.1.0")
    # kfp-kubernetes: secrets as env, node selector, toleration, PVC
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    train = k8s["exec-train"]
    assert train["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert train["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {e["envVar"] for e in train["secretAsEnv"][0]["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert train["pvcMount"][0]["mountPath"] == "/data"
    assert "nodeSelector" not in k8s["exec-preprocess"]
    # pipeline parameters users set
    params = spec["root"]["inputDefinitions"]["parameters"]
    for p in ("data_uri", "subset_size", "strategy", "seed", "config", "iterations", "mlflow_uri", "gate_margin",
              "gate_tolerance", "nodes", "gpus_per_node"):
        assert p in params
    text = open(out).read()
    assert "AKIA" not in text and "password" not in text.lower()


def test_submit_and_schedule_send_the_spec_cron_and_experiment(tmp_path):
    package = compile_pipeline(str(tmp_path / "p.yaml"))
    runner = CliRunner()
    with KfpStandIn() as kfp:
        r = runner.invoke(pipeline, ["submit", "--host", kfp.url, "--experiment", "nightly", "--package", package,
                                     "--param", "data_uri=s3://coco/panoptic", "--param", "iterations=90000",
                                     "--run-name", "r1"])
        assert r.exit_code == 0, r.output
        run = next(q for q in kfp.requests if q["method"] == "POST" and q["path"].endswith("/runs"))
        assert f"{kfp.url}/#/runs/details/run-" in r.output
        assert run["body"]["display_name"] == "r1"
        sent = run["body"]["pipeline_spec"]
        assert sent["pipeline_spec"]["pipelineInfo"]["name"] == "panoptic-fpn"
        assert "exec-train" in sent["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        assert run["body"]["runtime_config"]["parameters"] == {"data_uri": "s3://coco/panoptic", "iterations": 90000}
        exp = next(q for q in kfp.requests if q["method"] == "POST" and q["path"].endswith("/experiments"))
        assert exp["body"]["display_name"] == "nightly" and run["body"]["experiment_id"]

        r = runner.invoke(pipeline, ["schedule", "--host", kfp.url, "--cron", "0 3 * * 0", "--experiment", "nightly",
                                     "--package", package, "--param", "data_uri=s3://coco/panoptic"])
        assert r.exit_code == 0, r.output
        rec = next(q for q in kfp.requests if q["path"].endswith("/recurringruns"))["body"]
        assert rec["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 0"
        assert rec["display_name"] == "panoptic-fpn-retrain" and str(rec["max_concurrency"]) == "1"
        assert rec["pipeline_spec"]["pipeline_spec"]["root"]["dag"]["tasks"]["train"]
        assert rec["runtime_config"]["parameters"] == {"data_uri": "s3://coco/panoptic"}


def test_cron_fields():
    assert cron6("0 3 * * 0") == "0 0 3 * * 0" and cron6("0 0 3 * * 0") == "0 0 3 * * 0"
    r = CliRunner().invoke(pipeline, ["schedule", "--host", "http://127.0.0.1:9", "--cron", "every sunday"])
    assert r.exit_code != 0 and "cron expression has 5 fields" in r.output
