"""The Kubeflow pipeline: subset -> preprocess -> train -> evaluate -> register [-> promote]."""


from dataclasses import dataclass, field

from kfp import dsl

from pipeline import components as c
from pipeline.settings import GPU_IMAGE

PIPELINE_NAME = "panoptic-fpn"


@dataclass
class ClusterSettings:
    """How the tasks land on a Kubernetes cluster (applied with kfp-kubernetes at compile time).

    Args:
        accelerator: accelerator type for train/evaluate (``nvidia.com/gpu``); "" for CPU only.
        gpus: accelerator limit of the train and evaluate tasks.
        node_selector: label -> value for the GPU tasks (e.g. a GPU product label).
        tolerate_gpu_taint: tolerate ``nvidia.com/gpu:NoSchedule``.
        data_pvc: a PVC mounted at ``data_mount`` in every task (clusters without S3).
        s3_secret: Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, exposed as env.
        s3_endpoint: AWS_ENDPOINT_URL for every task (MinIO); "" for AWS S3.
        mlflow_secret: Secret with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, if any.
    """

    accelerator: str = "nvidia.com/gpu"
    gpus: int = 1
    node_selector: dict = field(default_factory=dict)
    tolerate_gpu_taint: bool = True
    data_pvc: str = ""
    data_mount: str = "/data"
    s3_secret: str = "panoptic-s3"
    s3_endpoint: str = ""
    mlflow_secret: str = ""


def _apply(task, cluster, gpu: bool = False):
    if cluster is None:
        return task
    from kfp import kubernetes

    if cluster.s3_secret:
        kubernetes.use_secret_as_env(task, secret_name=cluster.s3_secret, secret_key_to_env={
            "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"})
    if cluster.mlflow_secret:
        kubernetes.use_secret_as_env(task, secret_name=cluster.mlflow_secret, secret_key_to_env={
            "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"})
    if cluster.s3_endpoint:
        task.set_env_variable("AWS_ENDPOINT_URL", cluster.s3_endpoint)
        task.set_env_variable("MLFLOW_S3_ENDPOINT_URL", cluster.s3_endpoint)
    if cluster.data_pvc:
        kubernetes.mount_pvc(task, pvc_name=cluster.data_pvc, mount_path=cluster.data_mount)
    if gpu and cluster.accelerator:
        task.set_accelerator_type(cluster.accelerator).set_accelerator_limit(cluster.gpus)
        task.set_cpu_limit("8").set_memory_limit("48G")
        for key, value in cluster.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        if cluster.tolerate_gpu_taint:
            kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    return task


def build_pipeline(cluster=None):
    """The pipeline function; ``cluster`` None for kfp.local (no Kubernetes settings)."""

    @dsl.pipeline(name=PIPELINE_NAME, description="Panoptic FPN: subset, preprocess, train, evaluate, register")
    def panoptic_fpn(data_uri: str, subset_size: str = "all", val_size: str = "all", strategy: str = "random",
                     seed: int = 0, config: str = "r50_1x", iterations: int = 0, overrides: str = "",
                     mlflow_uri: str = "", experiment: str = "panoptic-fpn", model_name: str = "panoptic-fpn",
                     gate_margin: float = 0.0, gate_tolerance: float = 0.05, shard_images: int = 500,
                     max_bad_fraction: float = 0.01, nodes: int = 1, gpus_per_node: int = 1,
                     checkpoint_uri: str = "", train_image: str = GPU_IMAGE):
        subset = _apply(c.select_subset(data_uri=data_uri, size=subset_size, val_size=val_size, strategy=strategy,
                                        seed=seed, mlflow_uri=mlflow_uri, experiment=experiment), cluster)
        subset.set_caching_options(False)  # it opens the MLflow run of this pipeline run
        subset.set_retry(num_retries=2)
        run_id = subset.outputs["Output"]
        pre = _apply(c.preprocess(train_manifest=subset.outputs["train_manifest"],
                                  val_manifest=subset.outputs["val_manifest"], shard_images=shard_images,
                                  max_bad_fraction=max_bad_fraction, run_id=run_id, mlflow_uri=mlflow_uri), cluster)
        pre.set_retry(num_retries=2)
        trained = _apply(c.train(train_shards=pre.outputs["train_shards"], config=config, iterations=iterations,
                                 overrides=overrides, run_id=run_id, mlflow_uri=mlflow_uri,
                                 checkpoint_uri=checkpoint_uri, nodes=nodes, gpus_per_node=gpus_per_node,
                                 image=train_image), cluster, gpu=True)
        trained.set_caching_options(False)
        evaluated = _apply(c.evaluate(model=trained.outputs["model"], val_shards=pre.outputs["val_shards"],
                                      run_id=run_id, mlflow_uri=mlflow_uri), cluster, gpu=True)
        evaluated.set_caching_options(False)
        reg = _apply(c.register(model=trained.outputs["model"], evaluation=evaluated.outputs["evaluation"],
                                model_name=model_name, margin=gate_margin, tolerance=gate_tolerance, run_id=run_id,
                                mlflow_uri=mlflow_uri), cluster)
        reg.set_caching_options(False)
        with dsl.If(reg.output != "", name="gate-passed"):
            prom = _apply(c.promote_champion(model_name=model_name, version=reg.output, run_id=run_id,
                                             mlflow_uri=mlflow_uri), cluster)
            prom.set_caching_options(False)

    return panoptic_fpn
