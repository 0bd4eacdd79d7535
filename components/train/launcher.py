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

Versions (what the tests check against each project's CRDs and webhook rules, docs/design.md):
PyTorchJob on Training Operator v1.9; TrainJob on Kubeflow Trainer v2.2 and v2.3 (``runtimePatches``,
which v2.0/v2.1 lack: there the API server refuses the field under strict validation, and we say
which version is needed); Katib Experiment on Katib v0.19. Every create asks for strict field
validation, so a field a cluster's CRD does not know is an error, never silently dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import signal
import threading
import time
from dataclasses import dataclass, field

from components.common.cluster import ClusterSettings

log = logging.getLogger(__name__)

PYTORCHJOB = ("kubeflow.org", "v1", "pytorchjobs")
TRAINJOB = ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
KATIB_EXPERIMENT = ("kubeflow.org", "v1beta1", "experiments")
RESOURCES = {"PyTorchJob": PYTORCHJOB, "TrainJob": TRAINJOB, "Experiment": KATIB_EXPERIMENT}
# Trainer v2.2+ admits a runtime patch only from a manager named by a domain-prefixed path
# (kubeflow/trainer pkg/runtime/framework/plugins/jobset/jobset.go, IsDomainPrefixedPath)
RUNTIME_PATCH_MANAGER = "panoptic-pipeline.io/train-step"
TRAINER_VERSIONS = "Kubeflow Trainer v2.2 or newer (tested: v2.2.1, v2.3.0)"
KATIB_NAMESPACE_LABEL = "katib.kubeflow.org/metrics-collector-injection=enabled"


@dataclass
class JobSpec:
    """One multi-node training job.

    Args:
        name: the job's name (unique in its namespace).
        image: the training image.
        nodes / gpus_per_node: pods, and processes (GPUs) per pod.
        shards / output: the train stage's input shards and output folder (local or s3://).
        val_shards: the validation shards evaluation during training scores ("": none).
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
    val_shards: str = ""

    def train_args(self) -> list[str]:
        return ["-m", "components.train", "--shards", self.shards, "--output", self.output,
                *(["--val-shards", self.val_shards] if self.val_shards else []),
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
    container = {"name": "pytorch", "image": spec.image, "command": torchrun_command(spec),
                 "env": c.pod_env(spec.env), "resources": c.pod_resources(spec.gpus_per_node)}

    def replica(count: int) -> dict:
        return {"replicas": count, "restartPolicy": "OnFailure", "template": {"spec": c.pod_spec([container])}}

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
    pod = c.pod_spec([{"name": "node"}])
    return {
        "apiVersion": f"{TRAINJOB[0]}/{TRAINJOB[1]}", "kind": "TrainJob", "metadata": _metadata(spec),
        "spec": {
            "runtimeRef": {"name": spec.runtime, "apiGroup": TRAINJOB[0], "kind": "ClusterTrainingRuntime"},
            "trainer": {"image": spec.image, "command": ["torchrun"] + spec.train_args(), "env": c.pod_env(spec.env),
                        "numNodes": spec.nodes, "numProcPerNode": max(spec.gpus_per_node, 1),
                        "resourcesPerNode": c.pod_resources(spec.gpus_per_node)},
            "runtimePatches": [{"manager": RUNTIME_PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {
                "replicatedJobs": [{"name": "node", "template": {"spec": {"template": {"spec": pod}}}}]}}}}],
        },
    }


def expand_command(command: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' ``$(VAR)`` expansion of a container command (for running it outside a cluster)."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), part) for part in command]


class TrainingJobFailed(RuntimeError):
    pass


class JobTimedOut(TrainingJobFailed):
    pass


class Terminated(Exception):
    """The step got SIGTERM (its KFP run was terminated, or its pod evicted)."""


# the pod whose log is the job's (rank 0), by the labels its controller gives it
MASTER_POD = {"PyTorchJob": ("training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master",
                             "pytorch"),
              "TrainJob": ("jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name=node,"
                           "jobset.sigs.k8s.io/job-index=0,batch.kubernetes.io/job-completion-index=0", "node")}
JOB_LABEL = {"PyTorchJob": "training.kubeflow.org/job-name", "TrainJob": "jobset.sigs.k8s.io/jobset-name",
             "Experiment": "katib.kubeflow.org/experiment"}


def _succeeded(kind: str, conditions: dict) -> bool:
    return ("Complete" if kind == "TrainJob" else "Succeeded") in conditions   # PyTorchJob, Katib Experiment


def owner_reference(namespace: str) -> dict | None:
    """The task's pod as the owner of what the step creates, so Kubernetes deletes the job with
    the pod (name and uid from the downward API: ``POD_NAME``, ``POD_UID``, ``POD_NAMESPACE``,
    which the compiled pipeline gives the train task). None outside a pod, or when the job goes
    to another namespace (an owner must live in the same one)."""
    name, uid = os.environ.get("POD_NAME"), os.environ.get("POD_UID")
    if not (name and uid):
        return None
    if os.environ.get("POD_NAMESPACE", namespace) != namespace:
        log.warning("the job goes to namespace %s, the task's pod lives in %s: it cannot own the job, which is "
                    "deleted only when the step ends or gets SIGTERM", namespace, os.environ["POD_NAMESPACE"])
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}


def check_secrets(job: dict, namespace: str, core) -> None:
    """Every Secret key the job's pods need exists: else fail now, naming the Secret and the key,
    not minutes later as a pod that cannot start (or an S3 credentials error)."""
    from kubernetes.client.exceptions import ApiException

    needed: dict[str, set[str]] = {}
    for ref in _secret_refs(job):
        if not ref.get("optional"):
            needed.setdefault(ref["name"], set()).add(ref["key"])
    for name, keys in sorted(needed.items()):
        try:
            secret = core.read_namespaced_secret(name, namespace)
        except ApiException as e:
            if e.status == 404:
                raise TrainingJobFailed(f"Secret {namespace}/{name} does not exist; the training pods need its keys "
                                        f"{', '.join(sorted(keys))} (see infra/base/secrets.template.yaml)") from None
            log.warning("cannot check Secret %s/%s (%s %s); the pods will say if it is missing", namespace, name,
                        e.status, e.reason)
            continue
        missing = sorted(keys - set((secret.data or {}).keys()) - set((secret.string_data or {}).keys()))
        if missing:
            raise TrainingJobFailed(f"Secret {namespace}/{name} has no key {', '.join(missing)}; the training pods "
                                    f"need it (see infra/base/secrets.template.yaml)")


def _secret_refs(node):
    if isinstance(node, dict):
        if "secretKeyRef" in node:
            yield node["secretKeyRef"]
        for v in node.values():
            yield from _secret_refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _secret_refs(v)


def _kubernetes():
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))   # read now, not at import
    return client.CustomObjectsApi(), client.CoreV1Api()


POLL_S = 30.0   # between two reads of the job's status


def run_job(job: dict, timeout_s: float = 7 * 24 * 3600, poll_s: float | None = None, api=None, core=None) -> dict:
    """Create a rendered PyTorchJob, TrainJob or Katib Experiment and wait until it succeeds.

    The job is owned by the task's pod (``owner_reference``), its Secrets are checked first, and
    the master pod's log is followed into this log. It is deleted when this step gets SIGTERM
    or the wait times out (then ``Terminated`` / ``TrainingJobFailed``); a job that failed is
    kept for ``kubectl logs`` (its owner takes it along). Raises ``TrainingJobFailed`` naming
    the job, its namespace and the controller's message. ``api`` / ``core``: the
    CustomObjectsApi and CoreV1Api (default: from the pod's service account or kubeconfig)."""
    if api is None:
        api, core = _kubernetes()
    kind = job["kind"]
    group, version, plural = RESOURCES[kind]
    namespace = job["metadata"].get("namespace") or current_namespace()
    name = job["metadata"]["name"]
    owner = owner_reference(namespace)
    if owner:
        job["metadata"]["ownerReferences"] = [owner]
    if core is not None:
        check_secrets(job, namespace, core)
    create(api, job, namespace)
    log.info("created %s %s/%s%s; command: %s", kind, namespace, name,
             f" (owned by pod {owner['name']})" if owner else "", shlex.join(_command(job)))
    follower = MasterLog(core, namespace, kind, name) if core is not None and kind in MASTER_POD else None
    try:
        with _sigterm_raises():
            if follower:
                follower.start()
            return _wait(api, kind, (group, version, namespace, plural, name), timeout_s,
                         POLL_S if poll_s is None else poll_s)
    except JobTimedOut:
        _delete(api, kind, group, version, namespace, plural, name, "its wait timed out")
        raise
    except TrainingJobFailed:
        raise
    except BaseException as e:
        _delete(api, kind, group, version, namespace, plural, name,
                "the step got SIGTERM" if isinstance(e, Terminated) else f"the step stopped ({type(e).__name__})")
        raise
    finally:
        if follower:
            follower.stop()


def create(api, job: dict, namespace: str) -> None:
    """Create the job with strict field validation; a refusal becomes one line that says what to do."""
    from kubernetes.client.exceptions import ApiException

    kind = job["kind"]
    group, version, plural = RESOURCES[kind]
    name = job["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(group, version, namespace, plural, job, field_validation="Strict")
    except ApiException as e:
        raise TrainingJobFailed(_refusal(kind, namespace, name, e.status, _api_message(e))) from None


def _api_message(e) -> str:
    try:
        return json.loads(e.body).get("message", "") or str(e.reason)
    except (TypeError, ValueError, AttributeError):
        return str(e.body or e.reason)[:500]


def _refusal(kind: str, namespace: str, name: str, status: int, message: str) -> str:
    where = f"cannot create {kind} {namespace}/{name}: {message}"
    if status == 404:
        needed = {"PyTorchJob": "the Training Operator v1.9", "TrainJob": TRAINER_VERSIONS}.get(kind, "Katib v0.19")
        return f"{where} (this cluster has no {kind} API: install {needed}, or pick another train.launcher)"
    if kind == "TrainJob" and "unknown field" in message and "runtimePatches" in message:
        return (f"{where}: this cluster's TrainJob API is older than the pipeline needs; it needs "
                f"{TRAINER_VERSIONS} (spec.runtimePatches carries the pods' service account, security context, "
                f"/dev/shm and GPU tolerations), or use train.launcher=pytorchjob")
    if kind == "Experiment" and "metrics-collector-injection" in message:
        return (f"{where}: label the namespace for Katib's metrics collector: kubectl label namespace {namespace} "
                f"{KATIB_NAMESPACE_LABEL}")
    if status == 403:
        return (f"{where}: the task's service account may not create {kind}s there; apply the Role in "
                f"infra/identity (kubectl apply -k infra/overlays/profile) and run with --service-account "
                f"panoptic-pipeline")
    return where


def _command(job: dict) -> list[str]:
    return {"PyTorchJob": lambda: job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
            ["command"], "TrainJob": lambda: job["spec"]["trainer"]["command"],
            "Experiment": lambda: job["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]
            ["containers"][0]["command"]}[job["kind"]]()


def _wait(api, kind: str, where: tuple, timeout_s: float, poll_s: float) -> dict:
    group, version, namespace, plural, name = where
    deadline = time.time() + timeout_s
    while True:
        status = api.get_namespaced_custom_object(group, version, namespace, plural, name).get("status", {})
        conditions = {c["type"]: c for c in status.get("conditions", []) if c.get("status") == "True"}
        if _succeeded(kind, conditions):
            return status
        if "Failed" in conditions:
            message = conditions["Failed"].get("message", "")
            raise TrainingJobFailed(f"{kind} {namespace}/{name} failed: {message}"
                                    f" (see `kubectl -n {namespace} logs -l {JOB_LABEL[kind]}={name}`)")
        if time.time() >= deadline:
            raise JobTimedOut(f"{kind} {namespace}/{name} did not finish within {timeout_s:.0f}s; deleted it")
        time.sleep(poll_s)


def _delete(api, kind, group, version, namespace, plural, name, why: str) -> None:
    try:
        api.delete_namespaced_custom_object(group, version, namespace, plural, name,
                                            body={"propagationPolicy": "Background"})
        log.warning("deleted %s %s/%s: %s", kind, namespace, name, why)
    except Exception as e:   # say it, and let the first error be the one raised
        log.error("could not delete %s %s/%s (%s): delete it by hand (kubectl -n %s delete %s %s)", kind, namespace,
                  name, e, namespace, plural, name)


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises ``Terminated`` while the step waits (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class MasterLog:
    """Follows the job's master pod's log into this step's log (``[<pod>] line``), again after a
    restart, until stopped."""

    def __init__(self, core, namespace: str, kind: str, name: str, poll_s: float = 5.0):
        selector, self.container = MASTER_POD[kind]
        self.core, self.namespace, self.selector, self.poll_s = core, namespace, selector.format(name=name), poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._followed: set[tuple[str, int]] = set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.poll_s + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._follow_new()
            except Exception as e:   # the API may blink; the job's own status decides the step
                log.debug("master log: %s", e)
            self._stop.wait(self.poll_s)

    def _follow_new(self) -> None:
        for pod in self.core.list_namespaced_pod(self.namespace, label_selector=self.selector).items:
            statuses = pod.status.container_statuses or []
            restarts = max((c.restart_count or 0 for c in statuses), default=0)
            key = (pod.metadata.uid, restarts)
            if pod.status.phase not in ("Running", "Succeeded", "Failed") or key in self._followed:
                continue
            self._followed.add(key)
            stream = self.core.read_namespaced_pod_log(pod.metadata.name, self.namespace, container=self.container,
                                                       follow=True, _preload_content=False)
            pending = b""
            for chunk in stream.stream(4096):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    log.info("[%s] %s", pod.metadata.name, line.decode(errors="replace").rstrip())
                if self._stop.is_set():
                    break
            if pending.strip():
                log.info("[%s] %s", pod.metadata.name, pending.decode(errors="replace").rstrip())
            stream.release_conn()


def current_namespace() -> str:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip()
    except OSError:
        return "default"
