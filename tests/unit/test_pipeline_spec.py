"""The compiled pipeline, and submit/schedule against a local stand-in for the KFP API."""

import pytest
import yaml
from click.testing import CliRunner

from components.common.cluster import ClusterSettings
from pipeline.cli import compile_pipeline, cron6, pipeline, pipeline_arguments
from pipeline.publish import package_digest, version_name
from tests.kfp_standin import KfpStandIn

# what every submit and schedule must name (an MLflow server that refuses at once: nothing listens on port 9)
MLFLOW = "http://127.0.0.1:9"
RUN = ["--set", "data_uri=s3://coco/panoptic", "--set", f"mlflow_uri={MLFLOW}"]


def _docs(path):
    return list(yaml.safe_load_all(open(path)))


def test_compiled_yaml_has_the_dag_gpus_condition_and_cluster_settings(tmp_path):
    out = str(tmp_path / "p.yaml")
    compile_pipeline(out, ClusterSettings(node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                                          data_pvc="coco-data", s3_endpoint="http://minio.panoptic:9000"),
                     {"train": {"gpus_per_node": 2}})
    spec, platform = _docs(out)
    # an exit handler around everything: finalize runs however the pipeline ends, with its status
    assert set(spec["root"]["dag"]["tasks"]) == {"exit-handler-1", "finalize"}
    final = spec["root"]["dag"]["tasks"]["finalize"]
    assert final["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert final["inputs"]["parameters"]["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}
    assert final["inputs"]["parameters"]["kfp_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    top = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert set(top) == {"select-subset", "decide", "condition-2"}
    subset_in = top["select-subset"]["inputs"]["parameters"]
    assert subset_in["kfp_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    assert subset_in["kfp_run_name"]["runtimeValue"]["constant"] == "{{$.pipeline_job_name}}"
    # "nothing new" is a branch: preprocess .. register run only when decide says "train"
    assert "decide-Output" in top["condition-2"]["triggerPolicy"]["condition"]
    assert "'train'" in top["condition-2"]["triggerPolicy"]["condition"]
    tasks = spec["components"]["comp-condition-2"]["dag"]["tasks"]
    assert {"preprocess", "log-shards", "train", "evaluate", "score-champion", "register", "condition-3"} <= set(tasks)
    assert set(tasks["train"]["dependentTasks"]) == {"preprocess"}
    # the gate sees the challenger's and the champion's metrics on the same validation shards
    assert {"evaluate", "score-champion", "train", "log-shards"} <= set(tasks["register"]["dependentTasks"])
    val_shards = tasks["score-champion"]["inputs"]["artifacts"]["val_shards"]
    assert val_shards["taskOutputArtifact"]["producerTask"] == "preprocess"
    assert "register-Output" in tasks["condition-3"]["triggerPolicy"]["condition"]
    assert "promote-champion" in spec["components"]["comp-condition-3"]["dag"]["tasks"]
    # caching where it is sound: preprocess only, and its inputs are values (no run id, no
    # artifact of an uncached task), so its key repeats with the data and settings
    cached = {name for comp in spec["components"].values() if "dag" in comp
              for name, t in comp["dag"]["tasks"].items() if t.get("cachingOptions", {}).get("enableCache")}
    assert cached == {"preprocess"}
    pre = tasks["preprocess"]["inputs"]
    assert "artifacts" not in pre and set(pre["parameters"]) == {"data_uri", "subset", "settings",
                                                                  "train_manifest_hash", "val_manifest_hash"}
    # retries on the data steps and on train (it resumes from its checkpoints)
    assert top["select-subset"]["retryPolicy"]["maxRetryCount"] == 2
    assert tasks["preprocess"]["retryPolicy"]["maxRetryCount"] == 2
    assert tasks["train"]["retryPolicy"]["maxRetryCount"] == 2
    # GPUs on train (what it trains on here: train.gpus_per_node) and one on evaluate and score champion
    execs = spec["deploymentSpec"]["executors"]
    for name, gpus in (("exec-train", "2"), ("exec-evaluate", "1"), ("exec-score-champion", "1")):
        res = execs[name]["container"]["resources"]
        assert res["accelerator"]["resourceCount"] == gpus and res["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert res["resourceMemoryLimit"] == "48Gi"  # one definition (components/common/cluster.py)
    assert "accelerator" not in execs["exec-preprocess"]["container"].get("resources", {})
    for name in ("exec-preprocess", "exec-select-subset", "exec-register"):   # CPU tasks say what they use
        res = execs[name]["container"]["resources"]
        assert res["resourceCpuRequest"] == res["resourceCpuLimit"] == "2"
        assert res["resourceMemoryRequest"] == res["resourceMemoryLimit"] == "8Gi"
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
                           "experiment", "run_name", "kfp_ui", "mlflow_run_id"}
    stages = ("subset", "preprocess", "train", "evaluate", "register")
    assert all(params[p]["parameterType"] == "STRUCT" for p in stages)
    # as KFP's UI shows them: every parameter described, the internal ones named as such
    assert all(len(p.get("description", "")) > 20 for p in params.values()), params
    assert params["kfp_ui"]["description"].startswith("Internal") and \
        params["mlflow_run_id"]["description"].startswith("Internal")
    # the train task gets the cluster settings its job's pods must carry
    cluster = tasks["train"]["inputs"]["parameters"]["cluster"]["runtimeValue"]["constant"]
    assert cluster["s3_endpoint"] == "http://minio.panoptic:9000" and cluster["memory"] == "48Gi"
    assert cluster["gpu_image"].endswith("/panoptic-cuda:0.1.0")
    text = open(out).read()
    assert "AKIA" not in text and "password" not in text.lower()


def test_submit_and_schedule_run_a_pipeline_version_in_the_experiment(tmp_path):
    package = compile_pipeline(str(tmp_path / "p.yaml"))
    runner = CliRunner()
    with KfpStandIn() as kfp:
        r = runner.invoke(pipeline, ["submit", "--host", kfp.url, "--experiment", "nightly", "--package", package,
                                     *RUN, "--set", "train.iterations=90000",
                                     "--set", 'subset={"size": 20000}', "--set", "force=true", "--run-name", "r1",
                                     "--service-account", "panoptic-pipeline"])
        assert r.exit_code == 0, r.output
        # the package went up once, as pipeline panoptic-fpn with one version named by its digest
        (pid, p), = kfp.pipelines.items()
        (vid, v), = kfp.versions.items()
        assert p["display_name"] == "panoptic-fpn" and v["pipeline_id"] == pid
        assert v["display_name"] == version_name(package_digest(package)) and v["package"] == open(package, "rb").read()
        assert f"version {v['display_name']} (new pipeline): {kfp.url}/#/pipelines/details/{pid}/version/{vid}" \
            in r.output
        run = next(q for q in kfp.requests if q["method"] == "POST" and q["path"].endswith("/runs"))["body"]
        assert run["pipeline_version_reference"] == {"pipeline_id": pid, "pipeline_version_id": vid}
        assert "pipeline_spec" not in run   # the run references the version, it does not carry the spec
        assert run["service_account"] == "panoptic-pipeline"   # the tasks run as the bound account
        assert f"{kfp.url}/#/runs/details/run-" in r.output
        # the same run and experiment names in both UIs; the MLflow run links back to this KFP UI
        assert run["display_name"] == "r1"
        assert run["runtime_config"]["parameters"] == {"data_uri": "s3://coco/panoptic", "force": True,
                                                       "mlflow_uri": MLFLOW,
                                                       "train": {"iterations": 90000}, "subset": {"size": 20000},
                                                       "experiment": "nightly", "run_name": "r1",
                                                       "kfp_ui": kfp.url}
        exp = next(q for q in kfp.requests if q["method"] == "POST" and q["path"].endswith("/experiments"))
        assert exp["body"]["display_name"] == "nightly" and run["experiment_id"]
        assert "MLflow run: created by the first task" in r.output and "kfp.run_id" in r.output

        # a second submit of the same package: no upload, the same version
        r = runner.invoke(pipeline, ["submit", "--host", kfp.url, "--experiment", "nightly", "--package", package,
                                     *RUN])
        assert r.exit_code == 0 and "(existing version)" in r.output, r.output
        assert len(kfp.pipelines) == 1 and len(kfp.versions) == 1
        assert sum(q["path"].endswith(("/upload", "/upload_version")) for q in kfp.requests) == 2

        r = runner.invoke(pipeline, ["schedule", "--host", kfp.url, "--cron", "0 3 * * 0", "--experiment", "nightly",
                                     "--package", package, *RUN,
                                     "--service-account", "panoptic-pipeline"])
        assert r.exit_code == 0, r.output
        (rid, rec), = kfp.recurring.items()
        assert rec["service_account"] == "panoptic-pipeline"
        assert rec["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 0"
        assert rec["display_name"] == "panoptic-fpn-retrain" and str(rec["max_concurrency"]) == "1"
        assert rec["pipeline_version_reference"] == {"pipeline_id": pid, "pipeline_version_id": vid}
        assert "pipeline_spec" not in rec and rec["no_catchup"] is True
        assert rec["runtime_config"]["parameters"] == {"data_uri": "s3://coco/panoptic", "experiment": "nightly",
                                                       "mlflow_uri": MLFLOW,
                                                       "kfp_ui": kfp.url}


def test_a_second_schedule_keeps_replaces_or_lists_never_duplicates(tmp_path):
    package = compile_pipeline(str(tmp_path / "p.yaml"))
    runner = CliRunner()
    base = ["--experiment", "nightly", *RUN]
    with KfpStandIn() as kfp:
        def schedule(*extra, package=package):
            r = runner.invoke(pipeline, ["schedule", "--host", kfp.url, "--package", package, *base, *extra])
            assert r.exit_code == 0, r.output
            return r.output

        out = schedule("--cron", "0 3 * * 0")
        (first, _), = kfp.recurring.items()
        assert f"recurring run {first} 'panoptic-fpn-retrain' on cron '0 0 3 * * 0'" in out
        # the same again: left as it is (nothing created, nothing deleted)
        out = schedule("--cron", "0 3 * * 0")
        assert "left as it is" in out and list(kfp.recurring) == [first]
        assert not [q for q in kfp.requests if q["method"] == "DELETE" and "/recurringruns/" in q["path"]]
        # another cron: replaced (KFP cannot update a recurring run), said so, still one of that name
        out = schedule("--cron", "0 4 * * 1")
        (second, rec), = kfp.recurring.items()
        assert second != first and rec["trigger"]["cron_schedule"]["cron"] == "0 0 4 * * 1"
        assert f"replaced: {first} (deleted) -> {second}" in out
        # a new package (other cluster settings): a second version of the same pipeline, the
        # schedule moved to it
        other = compile_pipeline(str(tmp_path / "q.yaml"), ClusterSettings(cpu="16"))
        out = schedule("--cron", "0 4 * * 1", package=other)
        assert len(kfp.pipelines) == 1 and len(kfp.versions) == 2 and "(new version)" in out
        (third, rec), = kfp.recurring.items()
        newest = next(v for v in kfp.versions.values() if v["display_name"] == version_name(package_digest(other)))
        assert rec["pipeline_version_reference"]["pipeline_version_id"] == newest["pipeline_version_id"]
        # another name: a second recurring run beside the first
        schedule("--cron", "0 5 * * *", "--name", "panoptic-fpn-daily")
        assert sorted(r["display_name"] for r in kfp.recurring.values()) == ["panoptic-fpn-daily",
                                                                              "panoptic-fpn-retrain"]

        r = runner.invoke(pipeline, ["versions", "--host", kfp.url])
        assert r.exit_code == 0 and r.output.count("panoptic-fpn-") == 2, r.output
        assert version_name(package_digest(other)) in r.output and version_name(package_digest(package)) in r.output
        r = runner.invoke(pipeline, ["schedules", "--host", kfp.url, "--experiment", "nightly"])
        assert r.exit_code == 0, r.output
        assert "panoptic-fpn-retrain" in r.output and "cron '0 0 4 * * 1'" in r.output
        assert newest["pipeline_version_id"] in r.output and "panoptic-fpn-daily" in r.output


def test_submit_writes_nothing_into_the_users_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with KfpStandIn() as kfp:
        r = CliRunner().invoke(pipeline, ["submit", "--host", kfp.url, *RUN])
        assert r.exit_code == 0, r.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["submit"], ["schedule", "--cron", "0 3 * * 0"]])
def test_a_cluster_run_without_its_server_or_data_is_refused_before_any_network_call(command, tmp_path):
    import subprocess
    import sys
    import time

    cases = [([], "mlflow_uri is required on a cluster"), ([], "data_uri is required"),
             (["--set", "mlflow_uri=sqlite:///mlflow.db", "--set", "data_uri=s3://coco/p"],
              "mlflow_uri=sqlite:///mlflow.db: a store of one pod's disk"),
             (["--set", f"mlflow_uri={MLFLOW}", "--set", "data_uri=/home/me/coco"],
              "data_uri=/home/me/coco: a path on this machine")]
    with KfpStandIn() as kfp:
        for extra, message in cases:
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "components", "pipeline", *command, "--host", kfp.url, *extra],
                               capture_output=True, text=True, timeout=120, cwd=tmp_path)
            seconds = time.perf_counter() - t0
            assert r.returncode == 2 and message in r.stderr, r.stderr
            assert "kubectl -n panoptic port-forward svc/mlflow 5000" in r.stderr or "data_uri" in message
            assert seconds < 5, seconds   # the whole command, as a user runs it
        assert kfp.requests == []   # refused before any network call
    # a PVC every task mounts makes a path under its mount a cluster path
    with KfpStandIn() as kfp:
        r = CliRunner().invoke(pipeline, [*command, "--host", kfp.url, "--set", f"mlflow_uri={MLFLOW}", "--set",
                                          "data_uri=/data/coco", "--data-pvc", "coco"])
        assert r.exit_code == 0, r.output


def test_run_local_refuses_a_data_folder_without_the_coco_layout_before_any_task(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(pipeline, ["run-local", "--data", "/nonexistent"])
    assert r.exit_code == 2 and "/nonexistent: no such folder" in r.output, r.output
    assert "ROOT/annotations/panoptic_train2017.json" in r.output
    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    r = CliRunner().invoke(pipeline, ["run-local", "--data", str(tmp_path / "coco")])
    assert r.exit_code == 2 and "missing annotations/panoptic_train2017.json" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco"]   # no task ran: no runs/, no mlflow.db


def _gpus(package: str) -> dict:
    execs = next(yaml.safe_load_all(open(package)))["deploymentSpec"]["executors"]
    return {name[len("exec-"):]: int(e["container"].get("resources", {}).get("accelerator", {}).get("resourceCount", 0))
            for name, e in execs.items()}


def test_gpus_are_reserved_once_for_what_trains(tmp_path):
    """One setting decides what trains (train.nodes x train.gpus_per_node): the train task holds
    those GPUs when it trains, none when it launches a job or a Katib sweep (the job's pods hold
    them); evaluate and score champion hold one each; nothing else holds any."""
    from components.common.cluster import ClusterSettings as CS
    from components.train.launcher import JobSpec, render_pytorchjob, render_trainjob

    runner = CliRunner()
    cases = {"defaults": ([], 1), "one node, 8 GPUs (torchrun here)": (["--set", "train.gpus_per_node=8"], 8),
             "README: 2 nodes x 8": (["--set", "train.nodes=2", "--set", "train.gpus_per_node=8"], 0),
             "a Katib sweep": (["--set", 'train.sweep={"trials": 2, "backend": "katib", "space": {"iterations": '
                                         '[2, 3]}}'], 0)}
    for what, (sets, train_gpus) in cases.items():
        out = str(tmp_path / "p.yaml")
        r = runner.invoke(pipeline, ["compile", "--out", out, *sets])
        assert r.exit_code == 0, r.output
        gpus = _gpus(out)
        assert gpus.pop("train") == train_gpus, what
        assert gpus.pop("evaluate") == gpus.pop("score-champion") == 1, what
        assert not any(gpus.values()), (what, gpus)
    # the job launched for the README's 2 x 8 holds exactly 16
    for render in (render_pytorchjob, render_trainjob):
        job = render(JobSpec(name="j", image="i", nodes=2, gpus_per_node=8, shards="s3://b/s", output="s3://b/o",
                             config_uri="s3://b/c.json", cluster=CS()))
        if job["kind"] == "PyTorchJob":
            held = sum(r["replicas"] * r["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
                       for r in job["spec"]["pytorchReplicaSpecs"].values())
        else:
            held = job["spec"]["trainer"]["numNodes"] * job["spec"]["trainer"]["resourcesPerNode"]["limits"][
                "nvidia.com/gpu"]
        assert held == 16, job["kind"]
    r = runner.invoke(pipeline, ["compile", "--out", str(tmp_path / "x.yaml"), "--gpus", "8"])
    assert r.exit_code == 2 and "train.gpus_per_node" in r.output


def test_a_package_compiled_for_another_training_shape_is_refused(tmp_path):
    package = compile_pipeline(str(tmp_path / "p.yaml"), defaults={"train": {"nodes": 2, "gpus_per_node": 8}})
    with KfpStandIn() as kfp:
        r = CliRunner().invoke(pipeline, ["submit", "--host", kfp.url, "--package", package, *RUN,
                                          "--set", "train.iterations=100"])   # a new train mapping: one node
        assert r.exit_code == 2 and "reserves no GPU(s) for the train task, but this run trains on 1" in r.output
        assert kfp.requests == []
        r = CliRunner().invoke(pipeline, ["submit", "--host", kfp.url, "--package", package, *RUN])   # its default
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(pipeline, ["submit", "--host", kfp.url, *RUN, "--set", "train.nodes=2", "--set",
                                          "train.gpus_per_node=8"])   # compiled for the run
        assert r.exit_code == 0, r.output
    spec = next(yaml.safe_load_all(list(kfp.versions.values())[-1]["package"]))   # the newest version
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-train"]["container"].get("resources", {})


def test_submit_and_schedule_from_one_preset_train_alike(tmp_path):
    """A preset (pipeline/presets/) read by submit and schedule: the scheduled retraining draws the
    sample and follows the recipe of the run that made the champion; --set experiment names the
    KFP experiment and the MLflow one alike."""
    with KfpStandIn() as kfp:
        for command in (["submit"], ["schedule", "--cron", "0 3 * * 0"]):
            r = CliRunner().invoke(pipeline, [*command, "--host", kfp.url, "--preset", "cluster-2x8", *RUN,
                                              "--set", "experiment=team-x"])
            assert r.exit_code == 0, r.output
        run, = kfp.runs.values()
        rec, = kfp.recurring.values()
        a, b = run["runtime_config"]["parameters"], rec["runtime_config"]["parameters"]
        assert a["subset"] == b["subset"] == {"size": 20000, "strategy": "balanced", "min_per_category": 50,
                                              "seed": 0}
        assert a["train"] == b["train"] == {"config": "r50_1x", "init": "coco", "nodes": 2, "gpus_per_node": 8}
        assert a["experiment"] == b["experiment"] == "team-x"
        assert {e["display_name"] for e in kfp.experiments.values()} == {"team-x"}
        version, = kfp.versions.values()   # both compiled for the 2 x 8 job: one version, no GPU on train
        spec = next(yaml.safe_load_all(version["package"]))
        assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-train"]["container"].get("resources", {})


def test_a_preset_in_a_circle_or_a_package_that_is_none_is_refused_in_one_line(tmp_path):
    (tmp_path / "loop.yaml").write_text("_base_: loop.yaml\ntrain: {iterations: 3}\n")
    r = CliRunner().invoke(pipeline, ["compile", "--out", str(tmp_path / "p.yaml"), "--preset",
                                      str(tmp_path / "loop.yaml")])
    assert r.exit_code == 2 and "presets extend each other in a circle" in r.output, r.output
    (tmp_path / "bad.yaml").write_text("garbage: [\n")
    r = CliRunner().invoke(pipeline, ["submit", "--host", "http://127.0.0.1:9", "--package", str(tmp_path / "bad.yaml"),
                                      *RUN])
    assert r.exit_code == 2 and "not a package `panoptic pipeline compile` wrote (ParserError" in r.output, r.output


def test_cron_fields():
    assert cron6("0 3 * * 0") == "0 0 3 * * 0" and cron6("0 0 3 * * 0") == "0 0 3 * * 0"
    r = CliRunner().invoke(pipeline, ["schedule", "--host", "http://127.0.0.1:9", "--cron", "every sunday", *RUN])
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
                                     "--token-file", str(token), *RUN])
        assert r.exit_code == 0, r.output
        assert all(q["authorization"] == "Bearer s3cr3t-token" for q in kfp.requests)
        exp = next(q for q in kfp.requests if q["method"] == "POST" and q["path"].endswith("/experiments"))
        assert exp["body"]["namespace"] == "team-a"
        run = next(q for q in kfp.requests if q["method"] == "POST" and q["path"].endswith("/runs"))
        assert kfp.experiments[run["body"]["experiment_id"]]["namespace"] == "team-a"
        r = runner.invoke(pipeline, ["schedule", "--host", kfp.url, "--package", package, "--namespace", "team-a",
                                     "--cron", "0 3 * * 0", "--token-file", str(token), *RUN])
        assert r.exit_code == 0 and "namespace team-a" in r.output, r.output

        # without a token: refused, and said so with what to do
        r = runner.invoke(pipeline, ["submit", "--host", kfp.url, "--package", package, "--namespace", "team-a",
                                     *RUN], env={"KFP_TOKEN": "", "KF_PIPELINES_SA_TOKEN_PATH": str(tmp_path / "none")})
        assert r.exit_code != 0 and "refused the request (401" in r.output and "--token-file" in r.output
        # without a namespace: said so
        r = runner.invoke(pipeline, ["submit", "--host", kfp.url, "--package", package, "--token-file", str(token),
                                     *RUN], env={"KFP_NAMESPACE": ""})
        assert r.exit_code != 0 and "multi-user: pass --namespace" in r.output


def test_two_submits_and_a_schedule_into_one_profile_reuse_one_pipeline(tmp_path):
    """A multi-user API server lists pipelines by namespace and refuses a duplicate (namespace,
    name) with 409 (tests/kfp_standin.py, copied from kubeflow/pipelines 2.17.0): the second
    submit must find the pipeline in the profile, not upload it again."""
    package = compile_pipeline(str(tmp_path / "p.yaml"))
    token = tmp_path / "token"
    token.write_text("t")
    runner = CliRunner()
    with KfpStandIn(token="t", namespace="team-a") as kfp:
        for args in (["submit"], ["submit", "--run-name", "again"], ["schedule", "--cron", "0 3 * * 0"]):
            r = runner.invoke(pipeline, [*args, "--host", kfp.url, "--package", package, "--namespace", "team-a",
                                         "--token-file", str(token), *RUN])
            assert r.exit_code == 0, r.output
        assert not kfp.conflicts
        pipeline_, = kfp.pipelines.values()
        assert pipeline_["namespace"] == "team-a"
        assert len({v["pipeline_version_id"] for v in kfp.versions.values()}) == 1
        lists = [q for q in kfp.requests if q["method"] == "GET" and q["path"].endswith("/pipelines")]
        assert lists and all(q["query"]["namespace"] == ["team-a"] for q in lists)
        r = runner.invoke(pipeline, ["versions", "--host", kfp.url, "--namespace", "team-a", "--token-file",
                                     str(token)])
        assert r.exit_code == 0 and "panoptic-fpn-" in r.output, r.output


def test_submit_with_a_session_cookie_or_the_service_account_token(tmp_path, monkeypatch):
    package = compile_pipeline(str(tmp_path / "p.yaml"))
    runner = CliRunner()
    with KfpStandIn(cookie="authservice_session=abc123", namespace="team-b") as kfp:
        r = runner.invoke(pipeline, ["submit", "--host", kfp.url, "--package", package, "--namespace", "team-b",
                                     "--cookie", "authservice_session=abc123", *RUN], env={"KFP_TOKEN": ""})
        assert r.exit_code == 0, r.output
        assert all("authservice_session=abc123" in (q["cookie"] or "") for q in kfp.requests)
    sa = tmp_path / "sa-token"
    sa.write_text("projected-sa-token")
    with KfpStandIn(token="projected-sa-token", namespace="team-c") as kfp:
        r = runner.invoke(pipeline, ["submit", "--host", kfp.url, "--package", package, "--namespace", "team-c",
                                     *RUN], env={"KFP_TOKEN": "", "KF_PIPELINES_SA_TOKEN_PATH": str(sa)})
        assert r.exit_code == 0, r.output
        assert kfp.requests[-1]["authorization"] == "Bearer projected-sa-token"
