"""The compiled pipeline, and submit/schedule against a local stand-in for the KFP API."""

import pytest
import yaml
from click.testing import CliRunner

from components.common.cluster import ClusterSettings
from pipeline.cli import compile_pipeline, cron6, pipeline, pipeline_arguments
from tests.kfp_standin import KfpStandIn


def _docs(path):
    return list(yaml.safe_load_all(open(path)))


def test_compiled_yaml_has_the_dag_gpus_condition_and_cluster_settings(tmp_path):
    out = str(tmp_path / "p.yaml")
    compile_pipeline(out, ClusterSettings(gpus=2, node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                                          data_pvc="coco-data", s3_endpoint="http://minio.panoptic:9000"))
    spec, platform = _docs(out)
    top = spec["root"]["dag"]["tasks"]
    assert set(top) == {"select-subset", "decide", "condition-1"}
    # "nothing new" is a branch: preprocess .. register run only when decide says "train"
    assert "decide-Output" in top["condition-1"]["triggerPolicy"]["condition"]
    assert "'train'" in top["condition-1"]["triggerPolicy"]["condition"]
    tasks = spec["components"]["comp-condition-1"]["dag"]["tasks"]
    assert {"preprocess", "train", "evaluate", "score-champion", "register", "condition-2"} <= set(tasks)
    assert set(tasks["train"]["dependentTasks"]) == {"preprocess"}
    # the gate sees the challenger's and the champion's metrics on the same validation shards
    assert {"evaluate", "score-champion", "train"} <= set(tasks["register"]["dependentTasks"])
    val_shards = tasks["score-champion"]["inputs"]["artifacts"]["val_shards"]
    assert val_shards["taskOutputArtifact"]["producerTask"] == "preprocess"
    assert "register-Output" in tasks["condition-2"]["triggerPolicy"]["condition"]
    assert "promote-champion" in spec["components"]["comp-condition-2"]["dag"]["tasks"]
    # retries on the data steps
    assert top["select-subset"]["retryPolicy"]["maxRetryCount"] == 2
    assert tasks["preprocess"]["retryPolicy"]["maxRetryCount"] == 2
    # GPUs on train and evaluate only
    execs = spec["deploymentSpec"]["executors"]
    for name in ("exec-train", "exec-evaluate", "exec-score-champion"):
        res = execs[name]["container"]["resources"]
        assert res["accelerator"]["resourceCount"] == "2" and res["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert res["resourceMemoryLimit"] == "48Gi"  # one definition (components/common/cluster.py)
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
    # required secrets (a missing one stops the pod, named); /dev/shm on GPU tasks; the train task owns its jobs
    assert all(s["optional"] is False for e in k8s.values() for s in e.get("secretAsEnv", []))
    for name in ("exec-train", "exec-evaluate", "exec-score-champion"):
        assert k8s[name]["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "16Gi",
                                                "volumeName": "dshm"}]
    assert "emptyDirMounts" not in k8s["exec-preprocess"]
    assert {e["name"]: e["fieldPath"] for e in train["fieldPathAsEnv"]} == {
        "POD_NAME": "metadata.name", "POD_UID": "metadata.uid", "POD_NAMESPACE": "metadata.namespace"}
    assert "fieldPathAsEnv" not in k8s["exec-evaluate"]
    # one parameter per stage's settings, plus the run's own
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == {"data_uri", "subset", "preprocess", "train", "evaluate", "register", "force", "mlflow_uri",
                           "experiment", "run_name"}
    stages = ("subset", "preprocess", "train", "evaluate", "register")
    assert all(params[p]["parameterType"] == "STRUCT" for p in stages)
    # the train task gets the cluster settings its job's pods must carry
    cluster = tasks["train"]["inputs"]["parameters"]["cluster"]["runtimeValue"]["constant"]
    assert cluster["s3_endpoint"] == "http://minio.panoptic:9000" and cluster["memory"] == "48Gi"
    assert cluster["gpu_image"].endswith("/panoptic-cuda:0.1.0")
    text = open(out).read()
    assert "AKIA" not in text and "password" not in text.lower()


def test_submit_and_schedule_send_the_spec_cron_and_experiment(tmp_path):
    package = compile_pipeline(str(tmp_path / "p.yaml"))
    runner = CliRunner()
    with KfpStandIn() as kfp:
        r = runner.invoke(pipeline, ["submit", "--host", kfp.url, "--experiment", "nightly", "--package", package,
                                     "--set", "data_uri=s3://coco/panoptic", "--set", "train.iterations=90000",
                                     "--set", 'subset={"size": 20000}', "--set", "force=true", "--run-name", "r1",
                                     "--service-account", "panoptic-pipeline"])
        assert r.exit_code == 0, r.output
        run = next(q for q in kfp.requests if q["method"] == "POST" and q["path"].endswith("/runs"))
        assert run["body"]["service_account"] == "panoptic-pipeline"   # the tasks run as the bound account
        assert f"{kfp.url}/#/runs/details/run-" in r.output
        assert run["body"]["display_name"] == "r1"
        sent = run["body"]["pipeline_spec"]
        assert sent["pipeline_spec"]["pipelineInfo"]["name"] == "panoptic-fpn"
        assert "exec-train" in sent["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        assert run["body"]["runtime_config"]["parameters"] == {"data_uri": "s3://coco/panoptic", "force": True,
                                                               "train": {"iterations": 90000},
                                                               "subset": {"size": 20000}}
        exp = next(q for q in kfp.requests if q["method"] == "POST" and q["path"].endswith("/experiments"))
        assert exp["body"]["display_name"] == "nightly" and run["body"]["experiment_id"]

        r = runner.invoke(pipeline, ["schedule", "--host", kfp.url, "--cron", "0 3 * * 0", "--experiment", "nightly",
                                     "--package", package, "--set", "data_uri=s3://coco/panoptic",
                                     "--service-account", "panoptic-pipeline"])
        assert r.exit_code == 0, r.output
        rec = next(q for q in kfp.requests if q["path"].endswith("/recurringruns"))["body"]
        assert rec["service_account"] == "panoptic-pipeline"
        assert rec["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 0"
        assert rec["display_name"] == "panoptic-fpn-retrain" and str(rec["max_concurrency"]) == "1"
        assert rec["pipeline_spec"]["pipeline_spec"]["root"]["dag"]["tasks"]["decide"]
        assert rec["runtime_config"]["parameters"] == {"data_uri": "s3://coco/panoptic"}


def test_cron_fields():
    assert cron6("0 3 * * 0") == "0 0 3 * * 0" and cron6("0 0 3 * * 0") == "0 0 3 * * 0"
    r = CliRunner().invoke(pipeline, ["schedule", "--host", "http://127.0.0.1:9", "--cron", "every sunday"])
    assert r.exit_code != 0 and "cron expression has 5 fields" in r.output


def test_stage_settings_as_parameters():
    assert pipeline_arguments(("train.config=r50_3x", "train.iterations=100", "train={\"nodes\": 2}",
                               "data_uri=s3://x", "train.solver.base_lr=0.01")) == {
        "train": {"config": "r50_3x", "iterations": 100, "nodes": 2, "overrides": {"solver.base_lr": 0.01}},
        "data_uri": "s3://x"}
    import click

    for items, message in ((("trian.iterations=1",), r"'trian' is not a stage \(did you mean train\?\)"),
                           (("train=5",), "train takes a mapping"),
                           (("iterations=5",), r"did you mean train.iterations\?"),
                           (("train.iteratoins=5",), r"no setting 'iteratoins' \(did you mean iterations\?\)"),
                           (("train.iterations=fifty",), "iterations must be a whole number, not 'fifty'"),
                           (("train.solver.base_rl=0.1",), r"unknown key `solver.base_rl` \(did you mean base_lr\?\)"),
                           (("train.solver.base_lr=high",), "solver.base_lr must be a number"),
                           (("register.margin=.nan",), "margin must be a finite number"),
                           (("train.iterations=10", "train.solver.max_iter=20"), "the run's length is one setting")):
        with pytest.raises(click.BadParameter, match=message):
            pipeline_arguments(items)


def test_submit_to_multi_user_kubeflow_with_namespace_and_token(tmp_path):
    package = compile_pipeline(str(tmp_path / "p.yaml"))
    token = tmp_path / "token"
    token.write_text("s3cr3t-token\n")
    runner = CliRunner()
    with KfpStandIn(token="s3cr3t-token", namespace="team-a") as kfp:
        r = runner.invoke(pipeline, ["submit", "--host", kfp.url, "--package", package, "--namespace", "team-a",
                                     "--token-file", str(token), "--set", "data_uri=s3://coco/panoptic"])
        assert r.exit_code == 0, r.output
        assert all(q["authorization"] == "Bearer s3cr3t-token" for q in kfp.requests)
        exp = next(q for q in kfp.requests if q["method"] == "POST" and q["path"].endswith("/experiments"))
        assert exp["body"]["namespace"] == "team-a"
        run = next(q for q in kfp.requests if q["method"] == "POST" and q["path"].endswith("/runs"))
        assert kfp.experiments[run["body"]["experiment_id"]]["namespace"] == "team-a"
        r = runner.invoke(pipeline, ["schedule", "--host", kfp.url, "--package", package, "--namespace", "team-a",
                                     "--cron", "0 3 * * 0", "--token-file", str(token)])
        assert r.exit_code == 0 and "namespace team-a" in r.output, r.output

        # without a token: refused, and said so with what to do
        r = runner.invoke(pipeline, ["submit", "--host", kfp.url, "--package", package, "--namespace", "team-a"],
                          env={"KFP_TOKEN": "", "KF_PIPELINES_SA_TOKEN_PATH": str(tmp_path / "none")})
        assert r.exit_code != 0 and "refused the request (401" in r.output and "--token-file" in r.output
        # without a namespace: said so
        r = runner.invoke(pipeline, ["submit", "--host", kfp.url, "--package", package, "--token-file", str(token)],
                          env={"KFP_NAMESPACE": ""})
        assert r.exit_code != 0 and "multi-user: pass --namespace" in r.output


def test_submit_with_a_session_cookie_or_the_service_account_token(tmp_path, monkeypatch):
    package = compile_pipeline(str(tmp_path / "p.yaml"))
    runner = CliRunner()
    with KfpStandIn(cookie="authservice_session=abc123", namespace="team-b") as kfp:
        r = runner.invoke(pipeline, ["submit", "--host", kfp.url, "--package", package, "--namespace", "team-b",
                                     "--cookie", "authservice_session=abc123"], env={"KFP_TOKEN": ""})
        assert r.exit_code == 0, r.output
        assert all("authservice_session=abc123" in (q["cookie"] or "") for q in kfp.requests)
    sa = tmp_path / "sa-token"
    sa.write_text("projected-sa-token")
    with KfpStandIn(token="projected-sa-token", namespace="team-c") as kfp:
        r = runner.invoke(pipeline, ["submit", "--host", kfp.url, "--package", package, "--namespace", "team-c"],
                          env={"KFP_TOKEN": "", "KF_PIPELINES_SA_TOKEN_PATH": str(sa)})
        assert r.exit_code == 0, r.output
        assert kfp.requests[-1]["authorization"] == "Bearer projected-sa-token"
