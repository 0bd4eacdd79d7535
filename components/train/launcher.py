"""Multi-node training on Kubernetes: render a PyTorchJob (Training Operator v1) or a TrainJob
(Kubeflow Trainer v2, torch runtime), create it, wait for it.

Every pod runs our CUDA image with ``torchrun``, so the trainer is the same code as on one
node, and it trains the *resolved* config the pipeline step wrote next to its output (so the
schedule scaling, overrides and initial weights are those of a single-node run). The pods get
the cluster settings' environment, secrets, resources, tolerations and node selector
(``components/common/cluster.py``), and ``MLFLOW_RUN_ID``: rank 0 logs into the pipeline's
train run.

PyTorchJob: the operator injects ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK`` (the pod's index)
and ``WORLD_SIZE``; Kubernetes expands ``$(VAR)`` in the command from them:

    torchrun --nnodes=N --nproc_per_node=G --node_rank=$(RANK) \\
             --master_addr=$(MASTER_ADDR) --master_port=$(MASTER_PORT) -m components.train ...

TrainJob: the torch runtime sets torchrun's own ``PET_NNODES``, ``PET_NPROC_PER_NODE``,
``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and ``PET_MASTER_PORT``, so the command is plain
``torchrun -m components.train ...``. The tests run the PyTorchJob's command with those
variables set by hand, as two local "nodes".
"""

from __future__ import annotations

import logging
import re
import shlex
import time
from dataclasses import dataclass, field

from components.common.cluster import ClusterSettings

log = logging.getLogger(__name__)

PYTORCHJOB = ("kubeflow.org", "v1", "pytorchjobs")
TRAINJOB = ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
KATIB_EXPERIMENT = ("kubeflow.org", "v1beta1", "experiments")
RESOURCES = {"PyTorchJob": PYTORCHJOB, "TrainJob": TRAINJOB, "Experiment": KATIB_EXPERIMENT}


@dataclass
class JobSpec:
    """One multi-node training job.

    Args:
        name: the job's name (unique in its namespace).
        image: the training image.
        nodes / gpus_per_node: pods, and processes (GPUs) per pod.
        shards / output: the train stage's input shards and output folder (local or s3://).
        config_uri: the resolved training config (JSON) every pod trains.
        env: extra literal environment (MLflow tracking URI and run id).
        cluster: where the pods land and what they carry.
        namespace: the job's namespace (None: the one this process runs in).
        runtime: the TrainJob's ClusterTrainingRuntime.
    """

    name: str
    image: str
    nodes: int
    gpus_per_node: int
    shards: str
    output: str
    config_uri: str
    env: dict = field(default_factory=dict)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    namespace: str | None = None
    runtime: str = "torch-distributed"

    def train_args(self) -> list[str]:
        return ["-m", "components.train", "--shards", self.shards, "--output", self.output,
                "--config", self.config_uri, "--quiet"]


def job_name(prefix: str = "panoptic-train") -> str:
    return f"{prefix}-{int(time.time())}"


def torchrun_command(spec: JobSpec) -> list[str]:
    """The PyTorchJob replica's command; ``$(RANK)``, ``$(MASTER_ADDR)``, ``$(MASTER_PORT)``
    are expanded by Kubernetes from the operator's variables."""
    return ["torchrun", f"--nnodes={spec.nodes}", f"--nproc_per_node={max(spec.gpus_per_node, 1)}",
            "--node_rank=$(RANK)", "--master_addr=$(MASTER_ADDR)", "--master_port=$(MASTER_PORT)"] + spec.train_args()


def _metadata(spec: JobSpec) -> dict:
    meta = {"name": spec.name, "labels": {"app.kubernetes.io/part-of": "panoptic-pipeline"}}
    if spec.namespace:
        meta["namespace"] = spec.namespace
    return meta


def render_pytorchjob(spec: JobSpec) -> dict:
    """One Master and nodes-1 Workers, OnFailure restarts (the trainer resumes from its latest
    checkpoint), GPUs, shared memory for DataLoader workers, non-root."""
    if spec.nodes < 2:
        raise ValueError("a PyTorchJob is for nodes >= 2; one node trains in the pipeline step")
    c = spec.cluster
    volumes, mounts = c.volumes()

    def replica(count: int) -> dict:
        pod = {
            "serviceAccountName": c.service_account,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
            "containers": [{"name": "pytorch", "image": spec.image, "command": torchrun_command(spec),
                            "env": c.pod_env(spec.env), "resources": c.pod_resources(spec.gpus_per_node),
                            "volumeMounts": mounts}],
            "volumes": volumes,
            "tolerations": c.tolerations(),
        }
        if c.node_selector:
            pod["nodeSelector"] = dict(c.node_selector)
        return {"replicas": count, "restartPolicy": "OnFailure", "template": {"spec": pod}}

    return {"apiVersion": f"{PYTORCHJOB[0]}/{PYTORCHJOB[1]}", "kind": "PyTorchJob", "metadata": _metadata(spec),
            "spec": {"runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 3},
                     "pytorchReplicaSpecs": {"Master": replica(1), "Worker": replica(spec.nodes - 1)}}}


def render_trainjob(spec: JobSpec) -> dict:
    """A TrainJob on the torch runtime (``trainer.kubeflow.org/v1alpha1``). The trainer section
    holds image, command, env, nodes, processes and resources per node; what the trainer API
    does not carry (service account, security context, tolerations, node selector, volumes)
    goes into a runtime patch of the runtime's ``node`` job and container."""
    if spec.nodes < 2:
        raise ValueError("a TrainJob is for nodes >= 2; one node trains in the pipeline step")
    c = spec.cluster
    volumes, mounts = c.volumes()
    pod = {"serviceAccountName": c.service_account, "volumes": volumes, "tolerations": c.tolerations(),
           "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
           "containers": [{"name": "node", "volumeMounts": mounts}]}
    if c.node_selector:
        pod["nodeSelector"] = dict(c.node_selector)
    return {
        "apiVersion": f"{TRAINJOB[0]}/{TRAINJOB[1]}", "kind": "TrainJob", "metadata": _metadata(spec),
        "spec": {
            "runtimeRef": {"name": spec.runtime, "apiGroup": TRAINJOB[0], "kind": "ClusterTrainingRuntime"},
            "trainer": {"image": spec.image, "command": ["torchrun"] + spec.train_args(), "env": c.pod_env(spec.env),
                        "numNodes": spec.nodes, "numProcPerNode": max(spec.gpus_per_node, 1),
                        "resourcesPerNode": c.pod_resources(spec.gpus_per_node)},
            "runtimePatches": [{"manager": "panoptic-pipeline", "trainingRuntimeSpec": {"template": {"spec": {
                "replicatedJobs": [{"name": "node", "template": {"spec": {"template": {"spec": pod}}}}]}}}}],
        },
    }


def expand_command(command: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' ``$(VAR)`` expansion of a container command (for running it outside a cluster)."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), part) for part in command]


class TrainingJobFailed(RuntimeError):
    pass


def _succeeded(kind: str, conditions: dict) -> bool:
    return ("Complete" if kind == "TrainJob" else "Succeeded") in conditions   # PyTorchJob, Katib Experiment


def run_job(job: dict, timeout_s: float = 7 * 24 * 3600, poll_s: float = 30.0, api=None) -> dict:
    """Create a rendered PyTorchJob, TrainJob or Katib Experiment and wait until it succeeds; raise
    ``TrainingJobFailed`` naming the job, its namespace and the controller's message when it
    fails or times out."""
    if api is None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api = client.CustomObjectsApi()
    group, version, plural = RESOURCES[job["kind"]]
    namespace = job["metadata"].get("namespace") or current_namespace()
    name = job["metadata"]["name"]
    api.create_namespaced_custom_object(group, version, namespace, plural, job)
    command = {"PyTorchJob": lambda: job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
               ["command"], "TrainJob": lambda: job["spec"]["trainer"]["command"],
               "Experiment": lambda: job["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["containers"]
               [0]["command"]}[job["kind"]]()
    log.info("created %s %s/%s; command: %s", job["kind"], namespace, name, shlex.join(command))
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = api.get_namespaced_custom_object(group, version, namespace, plural, name).get("status", {})
        conditions = {c["type"]: c for c in status.get("conditions", []) if c.get("status") == "True"}
        if _succeeded(job["kind"], conditions):
            return status
        if "Failed" in conditions:
            label = {"PyTorchJob": "training.kubeflow.org/job-name", "TrainJob": "jobset.sigs.k8s.io/jobset-name",
                     "Experiment": "katib.kubeflow.org/experiment"}[job["kind"]]
            message = conditions["Failed"].get("message", "")
            raise TrainingJobFailed(f"{job['kind']} {namespace}/{name} failed: {message}"
                                    f" (see `kubectl -n {namespace} logs -l {label}={name}`)")
        time.sleep(poll_s)
    raise TrainingJobFailed(f"{job['kind']} {namespace}/{name} did not finish within {timeout_s:.0f}s")


def current_namespace() -> str:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip()
    except OSError:
        return "default"
