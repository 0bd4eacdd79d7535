"""Multi-node training jobs: what the train step renders for a PyTorchJob and a TrainJob, and
how it waits. No cluster here: the Kubernetes API is a scripted stand-in (FakeCustomObjects)."""

import json

import kubernetes_validate
import pytest

from components.common import storage
from components.model.config import from_dict
from components.train import launcher
from components.train.launcher import TrainingJobFailed, run_job
from components.train.settings import TrainSettings, resolve_config
from pipeline.steps import step_train
from tests.training import make_shards
from tests.unit.test_infra import K8S_VERSION


class FakeCustomObjects:
    """The two CustomObjectsApi calls the launcher makes, answering from a script of states."""

    def __init__(self, states):
        self.created, self.states = [], list(states)

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.created.append((group, version, namespace, plural, body))

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        state, message = self.states.pop(0)
        return {"status": {"conditions": [{"type": state, "status": "True", "message": message}]}}


CLUSTER = {"s3_endpoint": "http://minio.panoptic:9000", "s3_secret": "panoptic-s3", "mlflow_secret": "mlflow-auth",
           "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, "gpu_image": "reg/panoptic-cuda:1"}


@pytest.fixture(scope="module")
def shards(synth_root, tmp_path_factory):
    return make_shards(synth_root, str(tmp_path_factory.mktemp("launch")))


def _launch(kind, shards, tmp_path, monkeypatch):
    api = FakeCustomObjects([("Running", ""), ("Succeeded" if kind == "pytorchjob" else "Complete", "done")])
    out = tmp_path / "model"

    def fake_run_job(job, **kw):  # the pods "train": leave the model where they would
        storage.write_bytes(storage.join(str(out), "model.pt"), b"weights")
        return run_job(job, poll_s=0, api=api)

    monkeypatch.setattr(launcher, "run_job", fake_run_job)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = {"config": "r50_1x", "iterations": 1000, "nodes": 2, "gpus_per_node": 8, "launcher": kind,
                "overrides": ["solver.amp=bf16"], "namespace": "team-a"}
    step_train(train_shards=shards, model_out=str(out), settings=settings, cluster=CLUSTER, mlflow_uri=uri)
    (group, version, namespace, plural, job), = api.created
    return job, out, uri


def _config_read_by_pods(command: list[str]):
    return from_dict(json.loads(storage.read_text(command[command.index("--config") + 1])), "pods")


@pytest.mark.parametrize("kind", ["pytorchjob", "trainjob"])
def test_jobs_train_the_single_node_schedule_and_carry_env_secrets_and_the_mlflow_run(kind, shards, tmp_path,
                                                                                      monkeypatch):
    job, out, uri = _launch(kind, shards, tmp_path, monkeypatch)
    single = resolve_config(TrainSettings(config="r50_1x", iterations=1000, overrides=("solver.amp=bf16",)))
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


@pytest.mark.parametrize("kind,done", [("PyTorchJob", "Succeeded"), ("TrainJob", "Complete")])
def test_launcher_waits_and_fails_clearly(kind, done):
    job = {"kind": kind, "metadata": {"name": "j2", "namespace": "ns"},
           "spec": {"trainer": {"command": ["torchrun"]}} if kind == "TrainJob" else
           {"pytorchReplicaSpecs": {"Master": {"template": {"spec": {"containers": [{"command": ["torchrun"]}]}}}}}}
    ok = FakeCustomObjects([("Created", ""), ("Running", ""), (done, "done")])
    run_job(job, poll_s=0, api=ok)
    assert ok.created[0][:4] == (("kubeflow.org", "v1", "ns", "pytorchjobs") if kind == "PyTorchJob" else
                                 ("trainer.kubeflow.org", "v1alpha1", "ns", "trainjobs"))
    bad = FakeCustomObjects([("Running", ""), ("Failed", "Worker 0 exited with code 1")])
    with pytest.raises(TrainingJobFailed,
                       match=rf"{kind} ns/j2 failed: Worker 0 exited with code 1 .*kubectl -n ns logs"):
        run_job(job, poll_s=0, api=bad)
