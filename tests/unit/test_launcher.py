"""Multi-node training jobs: what the train step renders for a PyTorchJob and a TrainJob, and
how it creates, owns, watches and deletes them. No cluster here: the real ``kubernetes`` client
talks to a local stand-in of the Kubernetes API (tests/k8s_standin.py) whose controller follows
a script of job states."""

import json
import os
import signal
import subprocess
import sys
import time

import kubernetes_validate
import pytest

from components.common import storage
from components.model.config import from_dict
from components.train.launcher import JobTimedOut, TrainingJobFailed, run_job
from components.train.settings import TrainSettings, resolve_config
from pipeline.steps import step_train
from tests.k8s_standin import KubeStandIn, ScriptedController, kubeconfig
from tests.training import make_shards
from tests.unit.test_infra import K8S_VERSION

SECRETS = {("team-a", "panoptic-s3"): {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"},
           ("team-a", "mlflow-auth"): {"MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "p"},
           ("ns", "panoptic-s3"): {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}}


def _apis(standin, tmp_path):
    from kubernetes import client, config

    config.load_kube_config(config_file=kubeconfig(str(tmp_path / "kubeconfig"), standin.url))
    return client.CustomObjectsApi(), client.CoreV1Api()


CLUSTER = {"s3_endpoint": "http://minio.panoptic:9000", "s3_secret": "panoptic-s3", "mlflow_secret": "mlflow-auth",
           "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, "gpu_image": "reg/panoptic-cuda:1"}


@pytest.fixture(scope="module")
def shards(synth_root, tmp_path_factory):
    return make_shards(synth_root, str(tmp_path_factory.mktemp("launch")))


def _launch(kind, shards, tmp_path, monkeypatch):
    def pods_train(job):  # the pods "train": leave the model where they would
        command = job["spec"]["trainer"]["command"] if kind == "trainjob" else \
            job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
        storage.write_bytes(storage.join(command[command.index("--output") + 1], "model.pt"), b"weights")

    done = "Succeeded" if kind == "pytorchjob" else "Complete"
    standin = KubeStandIn(ScriptedController([("Running", ""), (done, "done")], on_created=pods_train),
                          secrets=SECRETS)
    out = tmp_path / "model"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = {"config": "r50_1x", "iterations": 1000, "nodes": 2, "gpus_per_node": 8, "launcher": kind,
                "overrides": {"solver.amp": "bf16"}, "namespace": "team-a"}
    monkeypatch.setattr("components.train.launcher.POLL_S", 0.0)
    with standin:
        monkeypatch.setenv("KUBECONFIG", kubeconfig(str(tmp_path / "kubeconfig"), standin.url))
        step_train(train_shards=shards, model_out=str(out), settings=settings, cluster=CLUSTER, mlflow_uri=uri)
    job, = standin.controller.created_jobs
    return job, out, uri


def _config_read_by_pods(command: list[str]):
    return from_dict(json.loads(storage.read_text(command[command.index("--config") + 1])), "pods")


@pytest.mark.parametrize("kind", ["pytorchjob", "trainjob"])
def test_jobs_train_the_single_node_schedule_and_carry_env_secrets_and_the_mlflow_run(kind, shards, tmp_path,
                                                                                      monkeypatch):
    job, out, uri = _launch(kind, shards, tmp_path, monkeypatch)
    single = resolve_config(TrainSettings(config="r50_1x", iterations=1000, overrides={"solver.amp": "bf16"}))
    assert single.solver.max_iter == 1000 and single.solver.steps == (667, 889) and single.solver.warmup_iters == 100
    if kind == "pytorchjob":
        pods = [r["template"]["spec"] for r in job["spec"]["pytorchReplicaSpecs"].values()]
        containers = [p["containers"][0] for p in pods]
        commands = [c["command"] for c in containers]
        envs = [c["env"] for c in containers]
        resources = [c["resources"] for c in containers]
    else:
        trainer = job["spec"]["trainer"]
        commands, envs, resources = [trainer["command"]], [trainer["env"]], [trainer["resourcesPerNode"]]
        pods = [job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
                ["template"]["spec"]["template"]["spec"]]
    for command in commands:  # every pod trains the very config a single node would
        assert _config_read_by_pods(command).solver == single.solver
        assert _config_read_by_pods(command).model == single.model
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    train_run = client.search_runs([client.get_experiment_by_name("panoptic-fpn").experiment_id],
                                   filter_string="tags.`panoptic.stage` = 'train'")[0]
    for env in envs:
        values = {e["name"]: e.get("value") for e in env}
        secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in env if "valueFrom" in e}
        assert values["AWS_ENDPOINT_URL"] == values["MLFLOW_S3_ENDPOINT_URL"] == "http://minio.panoptic:9000"
        assert values["MLFLOW_TRACKING_URI"] == uri and values["MLFLOW_RUN_ID"] == train_run.info.run_id
        assert secrets == {"AWS_ACCESS_KEY_ID": "panoptic-s3", "AWS_SECRET_ACCESS_KEY": "panoptic-s3",
                           "MLFLOW_TRACKING_USERNAME": "mlflow-auth", "MLFLOW_TRACKING_PASSWORD": "mlflow-auth"}
        assert not any(e["valueFrom"]["secretKeyRef"].get("optional") for e in env if "valueFrom" in e)
    for res in resources:  # one definition of the resources: "48Gi", never "48G"
        assert res["limits"] == {"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": 8}
    for pod in pods:
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert pod["nodeSelector"] == CLUSTER["node_selector"] and pod["securityContext"]["runAsNonRoot"] is True
    assert job["metadata"]["namespace"] == "team-a"
    assert json.loads((out / "lineage.json").read_text())["config"] == "r50_1x"


def test_pytorchjob_pods_are_valid_kubernetes_pods(shards, tmp_path, monkeypatch):
    job, _, _ = _launch("pytorchjob", shards, tmp_path, monkeypatch)
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 1
    for spec in specs.values():
        assert spec["restartPolicy"] == "OnFailure" and spec["template"]["spec"]["containers"][0]["name"] == "pytorch"
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
                                      "template": spec["template"]}, K8S_VERSION, strict=True)
    assert specs["Master"]["template"]["spec"]["containers"][0]["command"][:6] == [
        "torchrun", "--nnodes=2", "--nproc_per_node=8", "--node_rank=$(RANK)", "--master_addr=$(MASTER_ADDR)",
        "--master_port=$(MASTER_PORT)"]


def test_trainjob_follows_the_trainer_v1alpha1_api(shards, tmp_path, monkeypatch):
    """Field names and types of trainer.kubeflow.org/v1alpha1 TrainJob (Kubeflow Trainer v2): the
    torch runtime by reference, the trainer section, the node job's pod patched for what the
    trainer section does not carry."""
    job, _, _ = _launch("trainjob", shards, tmp_path, monkeypatch)
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    spec = job["spec"]
    assert set(spec) == {"runtimeRef", "trainer", "runtimePatches"}
    assert spec["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                  "kind": "ClusterTrainingRuntime"}
    trainer = spec["trainer"]
    assert set(trainer) == {"image", "command", "env", "numNodes", "numProcPerNode", "resourcesPerNode"}
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 8 and trainer["image"] == "reg/panoptic-cuda:1"
    assert trainer["command"][:3] == ["torchrun", "-m", "components.train"]  # torchrun reads the runtime's PET_*
    patch, = spec["runtimePatches"]
    pod = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["name"] == "node" and patch["manager"]
    pod = pod["template"]["spec"]["template"]["spec"]
    assert set(pod) <= {"serviceAccountName", "volumes", "initContainers", "containers", "imagePullSecrets",
                        "securityContext", "nodeSelector", "affinity", "tolerations", "schedulingGates"}
    assert pod["containers"] == [{"name": "node", "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}]
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
                                  "template": {"spec": {**pod, "containers": [{**pod["containers"][0], "name": "node",
                                                                              "image": "x"}]}}},
                                 K8S_VERSION, strict=True)


def _job(kind, name="j2"):
    return {"kind": kind, "metadata": {"name": name, "namespace": "ns"},
            "spec": {"trainer": {"command": ["torchrun"], "env": [
                {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "panoptic-s3",
                                                                             "key": "AWS_ACCESS_KEY_ID"}}}]}}
            if kind == "TrainJob" else
            {"pytorchReplicaSpecs": {"Master": {"template": {"spec": {"containers": [{"command": ["torchrun"]}]}}}}}}


@pytest.mark.parametrize("kind,done", [("PyTorchJob", "Succeeded"), ("TrainJob", "Complete")])
def test_launcher_waits_and_fails_clearly(kind, done, tmp_path):
    with KubeStandIn(ScriptedController([("Created", ""), ("Running", ""), (done, "done")]), secrets=SECRETS) as k:
        api, core = _apis(k, tmp_path)
        run_job(_job(kind), poll_s=0, api=api, core=core)
        post, = k.calls("POST")
        assert post["path"] == ("/apis/kubeflow.org/v1/namespaces/ns/pytorchjobs" if kind == "PyTorchJob" else
                                "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ns/trainjobs")
        assert not k.calls("DELETE")   # a finished job stays until its owner goes
    with KubeStandIn(ScriptedController([("Running", ""), ("Failed", "Worker 0 exited with code 1")]),
                     secrets=SECRETS) as k:
        api, core = _apis(k, tmp_path)
        with pytest.raises(TrainingJobFailed,
                           match=rf"{kind} ns/j2 failed: Worker 0 exited with code 1 .*kubectl -n ns logs"):
            run_job(_job(kind), poll_s=0, api=api, core=core)
        assert not k.calls("DELETE")   # kept for kubectl logs


def test_the_job_is_owned_by_the_task_pod_and_goes_with_it(tmp_path, monkeypatch):
    """The downward API's POD_NAME / POD_UID make the task's pod the job's owner; deleting that pod
    (a terminated KFP run) deletes the job, as Kubernetes' garbage collector does."""
    with KubeStandIn(ScriptedController([("Succeeded", "")]), secrets=SECRETS,
                     pods={("ns", "panoptic-fpn-abc-train"): {}}) as k:
        api, core = _apis(k, tmp_path)
        monkeypatch.setenv("POD_NAME", "panoptic-fpn-abc-train")
        monkeypatch.setenv("POD_UID", k.pod_uid("ns", "panoptic-fpn-abc-train"))
        monkeypatch.setenv("POD_NAMESPACE", "ns")
        run_job(_job("PyTorchJob"), poll_s=0, api=api, core=core)
        owner, = k.calls("POST")[0]["body"]["metadata"]["ownerReferences"]
        assert owner == {"apiVersion": "v1", "kind": "Pod", "name": "panoptic-fpn-abc-train",
                         "uid": k.pod_uid("ns", "panoptic-fpn-abc-train")}
        core.delete_namespaced_pod("panoptic-fpn-abc-train", "ns")
        assert [j["metadata"]["name"] for j in k.deleted] == ["j2"]
        # a job in another namespace cannot be owned by the pod: no reference, a warning
        monkeypatch.setenv("POD_NAMESPACE", "elsewhere")
        run_job(_job("PyTorchJob", "j3"), poll_s=0, api=api, core=core)
        assert "ownerReferences" not in k.calls("POST")[-1]["body"]["metadata"]


def test_a_missing_secret_or_key_fails_before_anything_is_created(tmp_path):
    with KubeStandIn(ScriptedController([("Succeeded", "")]), secrets={}) as k:
        api, core = _apis(k, tmp_path)
        with pytest.raises(TrainingJobFailed, match=r"Secret ns/panoptic-s3 does not exist.*AWS_ACCESS_KEY_ID"):
            run_job(_job("TrainJob"), poll_s=0, api=api, core=core)
        assert not k.calls("POST")
    with KubeStandIn(ScriptedController([("Succeeded", "")]), secrets={("ns", "panoptic-s3"): {"OTHER": "x"}}) as k:
        api, core = _apis(k, tmp_path)
        with pytest.raises(TrainingJobFailed, match=r"Secret ns/panoptic-s3 has no key AWS_ACCESS_KEY_ID"):
            run_job(_job("TrainJob"), poll_s=0, api=api, core=core)
        assert not k.calls("POST")


def test_a_wait_that_times_out_deletes_the_job(tmp_path):
    with KubeStandIn(ScriptedController([("Running", "")]), secrets=SECRETS) as k:
        api, core = _apis(k, tmp_path)
        with pytest.raises(JobTimedOut, match="did not finish within"):
            run_job(_job("PyTorchJob"), timeout_s=0.2, poll_s=0.05, api=api, core=core)
        delete, = k.calls("DELETE")
        assert delete["path"] == "/apis/kubeflow.org/v1/namespaces/ns/pytorchjobs/j2"
        assert delete["body"]["propagationPolicy"] == "Background"


def test_sigterm_to_the_step_deletes_the_job(tmp_path):
    """A terminated KFP run sends the task SIGTERM: the step deletes the job it created (and
    fails), so no pods train on for a run that is gone."""
    with KubeStandIn(ScriptedController([("Running", "")]), secrets=SECRETS) as k:
        env = {**os.environ, "KUBECONFIG": kubeconfig(str(tmp_path / "kubeconfig"), k.url)}
        code = ("import json, sys; from components.common.logs import setup_logging; setup_logging(); "
                "from components.train.launcher import run_job; "
                "run_job(json.loads(sys.argv[1]), poll_s=0.1)")
        proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(_job("PyTorchJob"))], env=env,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while not k.calls("POST") and time.time() < deadline:
            time.sleep(0.1)
        assert k.calls("POST"), "the job was never created"
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0
        assert [d["path"] for d in k.calls("DELETE")] == ["/apis/kubeflow.org/v1/namespaces/ns/pytorchjobs/j2"]
        assert "deleted PyTorchJob ns/j2: the step got SIGTERM" in err
