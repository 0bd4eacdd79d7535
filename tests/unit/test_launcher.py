"""Multi-node training jobs: what the train step renders for a PyTorchJob and a TrainJob, and
how it creates, owns, watches and deletes them. No cluster here: the real ``kubernetes`` client
talks to a local stand-in of the Kubernetes API (tests/k8s_standin.py) whose controller follows
a script of job states, and which does to every request what a real cluster does: our Role's
RBAC, the real CRD schemas with strict field validation, the Kubeflow projects' webhook rules
(tests/kube_rules.py)."""

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
from components.train.launcher import (
    MASTER_POD,
    RUNTIME_PATCH_MANAGER,
    JobSpec,
    JobTimedOut,
    MasterLog,
    TrainingJobFailed,
    render_pytorchjob,
    render_trainjob,
    run_job,
)
from components.train.settings import TrainSettings, resolve_config
from pipeline.steps import step_train
from tests import crd_schema
from tests.k8s_standin import KubeStandIn, ScriptedController, kubeconfig
from tests.kube_rules import ApiRules, Refused, pytorchjob_admission, trainer_runtime, trainjob_admission
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


def _job(kind, name="j2", **cluster):
    from components.common.cluster import ClusterSettings

    spec = JobSpec(name=name, image="reg/panoptic-cuda:1", nodes=2, gpus_per_node=1, shards="s3://b/train",
                   output="s3://b/out", config_uri="s3://b/out/train_config.json", namespace="ns",
                   cluster=ClusterSettings(**cluster))
    return render_pytorchjob(spec) if kind == "PyTorchJob" else render_trainjob(spec)


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
        k.delete_pod("ns", "panoptic-fpn-abc-train")   # KFP deletes it (the task's own account may not)
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


@pytest.mark.parametrize("tag", sorted(crd_schema.TRAINJOB_CRDS))
def test_a_trainjob_passes_the_webhook_and_strict_schema_of_each_supported_trainer(tag, tmp_path):
    """Trainer v2.2+ validates runtimePatches[].manager as a domain-prefixed path and the patched
    jobs and containers against the runtime (kubeflow/trainer jobset plugin); the CRD of each
    supported tag knows every field we send, so strict field validation passes."""
    job = _job("TrainJob")
    assert not crd_schema.errors(job, crd_schema.schema_of(crd_schema.TRAINJOB_CRDS[tag]))
    with KubeStandIn(ScriptedController([("Complete", "")]), secrets=SECRETS, rules=ApiRules(trainer=tag)) as k:
        api, core = _apis(k, tmp_path)
        run_job(job, poll_s=0, api=api, core=core)
        post, = k.calls("POST")
        assert post["query"]["fieldValidation"] == ["Strict"]
        stored, = k.objects.values()
        assert stored["spec"]["runtimePatches"][0]["manager"] == RUNTIME_PATCH_MANAGER
        assert stored["spec"]["runtimePatches"] == job["spec"]["runtimePatches"]   # nothing pruned
        assert not k.refused


def test_an_older_trainer_is_refused_naming_the_version_needed(tmp_path):
    """Trainer v2.0/v2.1 have no runtimePatches: without strict validation the API server would
    drop it and the pods would lose their service account, security context, /dev/shm and GPU
    tolerations; with it, the create fails, and we say which Trainer is needed."""
    job = _job("TrainJob")
    old = crd_schema.schema_of(crd_schema.TRAINJOB_CRD_UNSUPPORTED["v2.1.0"])
    assert crd_schema.unknown_fields(job, old) == ["spec.runtimePatches"]
    assert "runtimePatches" not in crd_schema.prune(job, old)["spec"]   # what a non-strict create stores
    with KubeStandIn(ScriptedController([("Complete", "")]), secrets=SECRETS, rules=ApiRules(trainer="v2.1.0")) as k:
        api, core = _apis(k, tmp_path)
        with pytest.raises(TrainingJobFailed, match=r"cannot create TrainJob ns/j2: .*unknown field "
                                                     r"\"spec.runtimePatches\".*needs Kubeflow Trainer v2.2 or newer"):
            run_job(job, poll_s=0, api=api, core=core)
        assert not k.objects


def test_the_trainer_webhook_rules_refuse_what_trainer_refuses():
    runtime = {"torch-distributed": trainer_runtime("v2.3.0")}
    trainjob_admission(_job("TrainJob"), runtime)
    for change, message in (
            (lambda j: j["spec"]["runtimePatches"][0].update(manager="panoptic-pipeline"),
             r'"panoptic-pipeline": must be a domain-prefixed path \(such as "acme.io/foo"\)'),
            (lambda j: _patched_job(j).update(name="worker"), "replicated job that doesn't exist"),
            (lambda j: _patched_pod(j)["containers"][0].update(env=[{"name": "A", "value": "1"}]),
             "must not have envs for the"),
            (lambda j: _patched_pod(j)["containers"].append({"name": "sidecar"}), "container that doesn't exist"),
            (lambda j: j["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "3"}), "reserved envs"),
            (lambda j: j["spec"]["runtimeRef"].update(name="torch-elsewhere"), "unsupported runtime")):
        job = _job("TrainJob")
        change(job)
        with pytest.raises(Refused, match=message):
            trainjob_admission(job, runtime)


def _patched_job(job):
    return job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]


def _patched_pod(job):
    return _patched_job(job)["template"]["spec"]["template"]["spec"]


def test_a_pytorchjob_passes_the_training_operators_webhook_and_strict_schema(tmp_path):
    job = _job("PyTorchJob")
    assert not crd_schema.errors(job, crd_schema.schema_of(crd_schema.PYTORCHJOB_CRD))
    pytorchjob_admission(job)
    bad = _job("PyTorchJob", name="2-nodes")
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "main"
    with pytest.raises(Refused) as e:
        pytorchjob_admission(bad)
    assert all(m in e.value.message for m in ("DNS-1035", "Master].replicas: Forbidden: must be 1",
                                               "container with name pytorch"))
    typo = _job("PyTorchJob")
    typo["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["gpus"] = 1
    assert crd_schema.unknown_fields(typo, crd_schema.schema_of(crd_schema.PYTORCHJOB_CRD)) == [
        "spec.pytorchReplicaSpecs.Master.template.spec.containers[0].gpus"]
    with KubeStandIn(ScriptedController([("Succeeded", "")]), secrets=SECRETS) as k:
        api, core = _apis(k, tmp_path)
        with pytest.raises(TrainingJobFailed, match=r'strict decoding error: unknown field "spec.pytorchReplicaSpecs'):
            run_job(typo, poll_s=0, api=api, core=core)


def test_the_master_log_follows_node_zero_only(tmp_path):
    """Every TrainJob node pod is in job 0 of the replicated job "node"; the completion index tells
    them apart (node 0 is rank 0)."""
    labels = {"jobset.sigs.k8s.io/jobset-name": "j2", "jobset.sigs.k8s.io/replicatedjob-name": "node",
              "jobset.sigs.k8s.io/job-index": "0"}
    pods = {("ns", f"j2-node-0-{i}"): {**labels, "batch.kubernetes.io/job-completion-index": str(i)} for i in (0, 1)}
    with KubeStandIn(secrets=SECRETS, pods=pods) as k:
        _, core = _apis(k, tmp_path)
        selector = MasterLog(core, "ns", "TrainJob", "j2").selector
        found = core.list_namespaced_pod("ns", label_selector=selector).items
        assert [p.metadata.name for p in found] == ["j2-node-0-0"] and MASTER_POD["TrainJob"][1] == "node"


# What a KFP task pod asks of the Kubernetes API, besides what our train step does, read from
# kubeflow/pipelines 2.17.0 (the launcher and driver) and Argo's executor (workflowtaskresults,
# as KFP's pipeline-runner Role grants them).
TASK_POD_CALLS = [
    ("launcher: kfp-launcher ConfigMap (backend/src/v2/config/env.go)",
     lambda core, api: core.read_namespaced_config_map("kfp-launcher", "ns")),
    ("launcher: the object store's Secret (backend/src/v2/objectstore/object_store.go)",
     lambda core, api: core.read_namespaced_secret("mlpipeline-minio-artifact", "ns")),
    ("launcher/driver: its own pod (backend/src/v2/component/launcher_v2.go)",
     lambda core, api: core.read_namespaced_pod("run-1-train", "ns")),
    ("Argo executor: create the task result",
     lambda core, api: api.create_namespaced_custom_object("argoproj.io", "v1alpha1", "ns", "workflowtaskresults",
                                                           {"apiVersion": "argoproj.io/v1alpha1",
                                                            "kind": "WorkflowTaskResult",
                                                            "metadata": {"name": "run-1-123"}})),
    ("Argo executor: patch the task result",
     lambda core, api: api.patch_namespaced_custom_object("argoproj.io", "v1alpha1", "ns", "workflowtaskresults",
                                                          "run-1-123", {"outputs": {"parameters": []}})),
]
# infra/identity/rbac.yaml's Role before it was derived from KFP's pipeline-runner
OLD_ROLE = [{"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs", "experiments"],
             "verbs": ["create", "get", "list", "watch", "delete"]},
            {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"],
             "verbs": ["create", "get", "list", "watch", "delete"]},
            {"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["panoptic-s3", "panoptic-mlflow"],
             "verbs": ["get"]}]


def test_every_call_a_task_pod_makes_is_allowed_by_our_role(tmp_path):
    secrets = {**SECRETS, ("ns", "mlpipeline-minio-artifact"): {"accesskey": "a", "secretkey": "s"}}
    with KubeStandIn(secrets=secrets, pods={("ns", "run-1-train"): {}},
                     configmaps={("ns", "kfp-launcher"): {"defaultPipelineRoot": "minio://mlpipeline/v2"}}) as k:
        api, core = _apis(k, tmp_path)
        for what, call in TASK_POD_CALLS:
            call(core, api)
        assert not k.refused, k.refused
    from kubernetes.client.exceptions import ApiException

    with KubeStandIn(secrets=secrets, pods={("ns", "run-1-train"): {}}, role=OLD_ROLE) as k:   # the Role before
        api, core = _apis(k, tmp_path)
        refused = []
        for what, call in TASK_POD_CALLS:
            try:
                call(core, api)
            except ApiException as e:
                assert e.status == 403
                refused.append(what)
        assert len(refused) == 4, refused
        assert any('workflowtaskresults.argoproj.io is forbidden: User "system:serviceaccount:ns:panoptic-pipeline" '
                   'cannot create resource "workflowtaskresults" in API group "argoproj.io"' in r["message"]
                   for r in k.refused)


def test_a_katib_sweep_in_an_unlabelled_namespace_is_refused_with_the_label_to_set(tmp_path):
    from components.train.settings import SweepSettings, TrainSettings
    from components.train.sweep import render_katib_experiment

    sweep = SweepSettings(trials=2, space={"iterations": [2, 3]}, backend="katib")
    exp = render_katib_experiment("panoptic-sweep-1", sweep, TrainSettings(config="tiny"), image="x",
                                  train_shards="s3://b/t", val_shards="s3://b/v", output="s3://b/o", namespace="plain")
    with KubeStandIn(ScriptedController([("Succeeded", "")]), rules=ApiRules(namespaces={"plain": {}})) as k:
        api, _ = _apis(k, tmp_path)
        with pytest.raises(TrainingJobFailed, match="kubectl label namespace plain katib.kubeflow.org/metrics-"
                                                    "collector-injection=enabled"):
            run_job(exp, poll_s=0, api=api)
