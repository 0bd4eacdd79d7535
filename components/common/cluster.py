"""Where work lands on a Kubernetes cluster: one definition for the pipeline's tasks and the
training job's pods (PyTorchJob, TrainJob), so the two cannot drift apart.

The pipeline applies these settings to its tasks at compile time (kfp-kubernetes) and hands
them, as JSON, to the train step, which renders the same environment, secrets, resources,
tolerations and node selector into the job's pods.
"""

from __future__ import annotations

from dataclasses import dataclass, field

S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@dataclass
class ClusterSettings:
    """Args:
        accelerator: accelerator resource of the GPU tasks and pods (``nvidia.com/gpu``); "" for CPU.
            How many: one setting, ``train.gpus_per_node`` (the train task when it trains, each
            pod of a job when one does; the task that launches a job holds none), and one each
            for evaluate and score champion.
        cpu / memory / shm_size: per GPU task and per training pod (Kubernetes quantities).
        task_cpu / task_memory: request and limit of each CPU task (subset, decide, preprocess,
            register ...; preprocess writes a shard per CPU of its limit), and of the train task
            while it only waits for a job it launched.
        node_selector: node labels for GPU tasks and pods (e.g. a GPU product).
        tolerate_gpu_taint: tolerate ``nvidia.com/gpu:NoSchedule``.
        data_pvc / data_mount: a PVC mounted in every task and pod (clusters without S3).
        s3_secret: Secret holding AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, exposed as env; required
            when named (a missing Secret or key stops the pod naming both). "": no Secret, the pods
            use the node's or the workload identity's credentials (IRSA).
        s3_endpoint: AWS_ENDPOINT_URL (and MLflow's S3 endpoint) for MinIO; "" for AWS S3. KFP's own
            MinIO (``minio://`` artifacts) is one: the training pods read those artifacts through it.
        mlflow_secret: Secret holding MLFLOW_TRACKING_USERNAME / _PASSWORD, if the server wants them.
        service_account: the training pods' service account (the tasks' own is the run's:
            ``panoptic pipeline submit --service-account``).
        image_pull_secrets: Secrets for pulling our images from a private registry (tasks and pods).
        gpu_image: the CUDA image of the train and evaluate tasks, and of the training pods.
    """

    accelerator: str = "nvidia.com/gpu"
    cpu: str = "8"
    memory: str = "48Gi"
    shm_size: str = "16Gi"
    task_cpu: str = "2"
    task_memory: str = "8Gi"
    node_selector: dict = field(default_factory=dict)
    tolerate_gpu_taint: bool = True
    data_pvc: str = ""
    data_mount: str = "/data"
    s3_secret: str = "panoptic-s3"
    s3_endpoint: str = ""
    mlflow_secret: str = ""
    service_account: str = "panoptic-pipeline"
    image_pull_secrets: tuple = ()
    gpu_image: str = ""

    def __post_init__(self):
        names = self.image_pull_secrets
        self.image_pull_secrets = tuple(n for n in names.split(",") if n) if isinstance(names, str) else tuple(names)

    def plain_env(self) -> dict[str, str]:
        """Environment variables with literal values."""
        if not self.s3_endpoint:
            return {}
        return {"AWS_ENDPOINT_URL": self.s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint}

    def secret_env(self) -> dict[str, dict[str, str]]:
        """Secret name -> {secret key: environment variable}."""
        out = {}
        if self.s3_secret:
            out[self.s3_secret] = {k: k for k in S3_KEYS}
        if self.mlflow_secret:
            out[self.mlflow_secret] = {k: k for k in MLFLOW_KEYS}
        return out

    def pod_env(self, extra: dict[str, str] | None = None) -> list[dict]:
        """The container ``env`` of a pod: literal values, then each secret key."""
        env = [{"name": k, "value": str(v)} for k, v in {**self.plain_env(), **(extra or {})}.items()]
        for secret, keys in self.secret_env().items():
            env += [{"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
                    for key, var in keys.items()]
        return env

    def pod_resources(self, gpus: int) -> dict:
        res = {"cpu": self.cpu, "memory": self.memory}
        if gpus and self.accelerator:
            res[self.accelerator] = gpus
        return {"limits": dict(res), "requests": dict(res)}

    def tolerations(self) -> list[dict]:
        return ([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
                if self.tolerate_gpu_taint and self.accelerator else [])

    def pod_spec(self, containers: list[dict], **extra) -> dict:
        """A training pod's spec around ``containers`` (each given the shared volume mounts): service
        account, non-root security context, volumes, tolerations, node selector, pull secrets."""
        volumes, mounts = self.volumes()
        spec = {"serviceAccountName": self.service_account,
                "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
                "containers": [{**c, "volumeMounts": mounts} for c in containers], "volumes": volumes,
                "tolerations": self.tolerations(), **extra}
        if self.node_selector:
            spec["nodeSelector"] = dict(self.node_selector)
        if self.image_pull_secrets:
            spec["imagePullSecrets"] = [{"name": n} for n in self.image_pull_secrets]
        return spec

    def volumes(self) -> tuple[list[dict], list[dict]]:
        """(pod volumes, container mounts): shared memory for DataLoader workers, the data PVC."""
        vols = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": self.shm_size}}]
        mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
        if self.data_pvc:
            vols.append({"name": "data", "persistentVolumeClaim": {"claimName": self.data_pvc}})
            mounts.append({"name": "data", "mountPath": self.data_mount})
        return vols, mounts


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The CPUs this process may use: the fewest of the cgroup's CPU quota (a pod's CPU limit,
    cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``, rounded up), the
    affinity mask and the machine's count. ``os.cpu_count()`` alone is the node's: 64 writers in
    a pod limited to 8 CPUs thrash."""
    import math
    import os

    counts = [len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)]
    for quota_file, period_file in ((os.path.join(cgroup_root, "cpu.max"), None),
                                    (os.path.join(cgroup_root, "cpu", "cpu.cfs_quota_us"),
                                     os.path.join(cgroup_root, "cpu", "cpu.cfs_period_us"))):
        try:
            with open(quota_file) as f:
                fields = f.read().split()
            if period_file:
                with open(period_file) as f:
                    fields = fields[:1] + f.read().split()[:1]
            quota, period = fields[0], fields[1] if len(fields) > 1 else "100000"
            if quota not in ("max", "-1") and float(period) > 0 and float(quota) > 0:
                counts.append(math.ceil(float(quota) / float(period)))
                break
        except (OSError, ValueError, IndexError):
            continue
    return max(1, min(counts))


# KFP's artifact stores, as the SDK maps them to a task pod's local copy (``/s3/b/k`` ...)
KFP_LOCAL_PREFIXES = {"s3://": "/s3/", "minio://": "/minio/", "gs://": "/gcs/"}


def uri_for_pods(uri: str) -> str:
    """An artifact's URI (KFP's ``.uri``, never its ``.path``) as a pod we launch reads it.

    A task's ``Input[...].path`` is that task pod's local copy (KFP maps ``s3://b/k`` to
    ``/s3/b/k``, ``minio://`` to ``/minio/``, ``gs://`` to ``/gcs/``): no other pod has it. The
    store's URI is what a PyTorchJob, TrainJob or Katib trial can open: ``s3://`` as it is,
    KFP's MinIO (``minio://``) through its S3 API (``s3://``; ``s3_endpoint`` names it), a local
    path (kfp.local, or a PVC every pod mounts) as it is. A task-local copy is refused, and so is
    ``gs://`` (our storage layer speaks S3: use an s3:// or minio:// pipeline root)."""
    uri = str(uri)
    for prefix in KFP_LOCAL_PREFIXES.values():
        if uri.startswith(prefix):
            raise ValueError(f"{uri}: a task pod's local copy of an artifact, which the training pods cannot see; "
                             f"pass the artifact's .uri")
    if uri.startswith("minio://"):
        return "s3://" + uri[len("minio://"):]
    if uri.startswith("s3://") or "://" not in uri:
        return uri
    raise ValueError(f"{uri}: the training pods read artifacts through S3 (s3://, or KFP's MinIO as minio://); "
                     f"run the pipeline with an s3:// or minio:// pipeline root")
