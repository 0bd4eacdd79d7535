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
        gpus: accelerators of the train and evaluate tasks (a job's pods take ``gpus_per_node``).
        cpu / memory / shm_size: per GPU task and per training pod (Kubernetes quantities).
        node_selector: node labels for GPU tasks and pods (e.g. a GPU product).
        tolerate_gpu_taint: tolerate ``nvidia.com/gpu:NoSchedule``.
        data_pvc / data_mount: a PVC mounted in every task and pod (clusters without S3).
        s3_secret: Secret holding AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, exposed as env (optional:
            without it the pods use the node's or workload identity's credentials).
        s3_endpoint: AWS_ENDPOINT_URL (and MLflow's S3 endpoint) for MinIO; "" for AWS S3.
        mlflow_secret: Secret holding MLFLOW_TRACKING_USERNAME / _PASSWORD, if the server wants them.
        service_account: the training pods' service account.
        gpu_image: the CUDA image of the train and evaluate tasks, and of the training pods.
    """

    accelerator: str = "nvidia.com/gpu"
    gpus: int = 1
    cpu: str = "8"
    memory: str = "48Gi"
    shm_size: str = "16Gi"
    node_selector: dict = field(default_factory=dict)
    tolerate_gpu_taint: bool = True
    data_pvc: str = ""
    data_mount: str = "/data"
    s3_secret: str = "panoptic-s3"
    s3_endpoint: str = ""
    mlflow_secret: str = ""
    service_account: str = "panoptic-pipeline"
    gpu_image: str = ""

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
            env += [{"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
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

    def volumes(self) -> tuple[list[dict], list[dict]]:
        """(pod volumes, container mounts): shared memory for DataLoader workers, the data PVC."""
        vols = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": self.shm_size}}]
        mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
        if self.data_pvc:
            vols.append({"name": "data", "persistentVolumeClaim": {"claimName": self.data_pvc}})
            mounts.append({"name": "data", "mountPath": self.data_mount})
        return vols, mounts
