"""Multi-node training on the Kubeflow Training Operator: render a PyTorchJob, run it, wait.

Each replica runs our CUDA image with ``torchrun``, so the trainer is the same code as on one
node. The operator injects ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK`` (the pod's index) and
``WORLD_SIZE`` into every pod; Kubernetes expands ``$(VAR)`` in the command from them:

    torchrun --nnodes=N --nproc_per_node=G --node_rank=$(RANK) \
             --master_addr=$(MASTER_ADDR) --master_port=$(MASTER_PORT) -m components.train ...

The tests run exactly this command with those variables set by hand, as two local "nodes".
"""

from __future__ import annotations

import re
import shlex
import time
from dataclasses import dataclass, field

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"


@dataclass
class PyTorchJobSpec:
    image: str
    nodes: int
    gpus_per_node: int
    shards: str
    output: str
    config: str = "r50_1x"
    overrides: str = ""            # "key=value;key=value"
    iterations: int = 0
    mlflow_uri: str = ""
    name: str = ""
    namespace: str | None = None
    service_account: str = "panoptic-pipeline"
    s3_secret: str = "panoptic-s3"
    env: dict = field(default_factory=dict)
    cpu: str = "8"
    memory: str = "48Gi"
    shm_size: str = "16Gi"

    def job_name(self) -> str:
        return self.name or f"panoptic-train-{int(time.time())}"


def train_command(spec: PyTorchJobSpec) -> list[str]:
    """The replica's command; ``$(RANK)``, ``$(MASTER_ADDR)``, ``$(MASTER_PORT)`` are expanded by Kubernetes."""
    cmd = ["torchrun", f"--nnodes={spec.nodes}", f"--nproc_per_node={max(spec.gpus_per_node, 1)}",
           "--node_rank=$(RANK)", "--master_addr=$(MASTER_ADDR)", "--master_port=$(MASTER_PORT)",
           "-m", "components.train", "--shards", spec.shards, "--output", spec.output, "--config", spec.config,
           "--quiet"]
    for o in [o for o in spec.overrides.split(";") if o.strip()]:
        cmd += ["--set", o.strip()]
    if spec.iterations:
        cmd += ["--set", f"solver.max_iter={spec.iterations}"]
    return cmd


def render_pytorchjob(spec: PyTorchJobSpec) -> dict:
    """The PyTorchJob manifest: one Master and nodes-1 Workers, OnFailure restarts (the trainer
    resumes from its latest checkpoint), GPUs, shared memory for DataLoader workers, non-root."""
    if spec.nodes < 2:
        raise ValueError("a PyTorchJob is for nodes >= 2; train in the pipeline step for one node")
    env = [{"name": "MLFLOW_TRACKING_URI", "value": spec.mlflow_uri}] if spec.mlflow_uri else []
    env += [{"name": k, "value": str(v)} for k, v in spec.env.items()]
    env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": spec.s3_secret, "key": key, "optional": True}}}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    resources = {"limits": {"cpu": spec.cpu, "memory": spec.memory}, "requests": {"cpu": spec.cpu, "memory": spec.memory}}
    if spec.gpus_per_node:
        resources["limits"]["nvidia.com/gpu"] = spec.gpus_per_node
        resources["requests"]["nvidia.com/gpu"] = spec.gpus_per_node

    def replica(count: int) -> dict:
        return {
            "replicas": count,
            "restartPolicy": "OnFailure",
            "template": {"spec": {
                "serviceAccountName": spec.service_account,
                "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
                "containers": [{"name": "pytorch", "image": spec.image, "command": train_command(spec), "env": env,
                                "resources": resources,
                                "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}],
                "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}],
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            }},
        }

    meta = {"name": spec.job_name(), "labels": {"app.kubernetes.io/part-of": "panoptic-pipeline"}}
    if spec.namespace:
        meta["namespace"] = spec.namespace
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "PyTorchJob", "metadata": meta,
            "spec": {"runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 3},
                     "pytorchReplicaSpecs": {"Master": replica(1), "Worker": replica(spec.nodes - 1)}}}


def expand_command(command: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' ``$(VAR)`` expansion of a container command (for running it outside a cluster)."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), part) for part in command]


class TrainingJobFailed(RuntimeError):
    pass


def run_pytorchjob(spec: PyTorchJobSpec, timeout_s: float = 7 * 24 * 3600, poll_s: float = 30.0, api=None) -> dict:
    """Create the PyTorchJob and wait until it succeeds; raise ``TrainingJobFailed`` naming the
    job, its namespace and the operator's message when it fails or times out."""
    if api is None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api = client.CustomObjectsApi()
    namespace = spec.namespace or _current_namespace()
    job = render_pytorchjob(spec)
    name = job["metadata"]["name"]
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
    print(f"created PyTorchJob {namespace}/{name}: {spec.nodes} nodes x {spec.gpus_per_node} GPUs; "
          f"command: {shlex.join(train_command(spec))}", flush=True)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status", {})
        conditions = {c["type"]: c for c in status.get("conditions", []) if c.get("status") == "True"}
        if "Succeeded" in conditions:
            return status
        if "Failed" in conditions:
            raise TrainingJobFailed(f"PyTorchJob {namespace}/{name} failed: {conditions['Failed'].get('message', '')}"
                                    f" (see `kubectl -n {namespace} logs -l training.kubeflow.org/job-name={name}`)")
        time.sleep(poll_s)
    raise TrainingJobFailed(f"PyTorchJob {namespace}/{name} did not finish within {timeout_s:.0f}s")


def _current_namespace() -> str:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip()
    except OSError:
        return "default"
