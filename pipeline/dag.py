"""The Kubeflow pipeline:

    subset -> decide --(new data, config or code; or force)--> preprocess -> train -> evaluate --+
                                                                  \\-> score champion ----+-> register
                                                                                             [-> promote]

An exit handler (``finalize``) runs however the pipeline ends: it gives the MLflow runs their
final status, naming a failed or killed task. Only ``preprocess`` is cached: its inputs are
values (the data's address, settings, the subsets' hashes), so the same data reuses its shards.

``decide`` ends a scheduled run early ("nothing new") when the champion was trained on the same
data, config and code. ``score champion`` puts the champion's metrics on the current
validation shards beside the challenger's (re-scoring it when it was measured on others), so
the gate compares the two on the same data.

Each stage takes its settings as one mapping parameter, named as in ``pipeline/stages.py``'s
table (``subset``, ``preprocess``, ``train``, ``evaluate``, ``register``) and parsed by that
stage's settings dataclass: a knob lives where its dataclass defines it and where the stage
uses it.
"""

from kfp import dsl

from components.common.cluster import ClusterSettings
from components.common.settings import settings_dict
from pipeline import components as c
from pipeline.settings import GPU_IMAGE

PIPELINE_NAME = "panoptic-fpn"


def train_task_gpus(train) -> int | None:
    """The GPUs the train task holds (``train``: its ``TrainSettings``): what it trains on here
    (``gpus_per_node``, torchrun over them when more than one), or None when it launches a job
    (a PyTorchJob/TrainJob of ``nodes`` x ``gpus_per_node``, or a Katib sweep whose trials hold
    them): then it is a CPU task that waits, and reserves nothing the job needs."""
    if train.nodes > 1 or (train.sweep and train.sweep_settings().backend == "katib"):
        return None
    return train.gpus_per_node


def _apply(task, cluster: ClusterSettings | None, gpus: int | None = None, launches: bool = False):
    """The cluster settings on a task (kfp-kubernetes); the train step renders the same ones
    into its job's pods. ``gpus``: a task that loads data onto a device (train, evaluate): a
    memory-backed /dev/shm (DataLoader workers, torchrun x GPUs) and, with ``gpus`` > 0, that
    many accelerators, CPU and memory limits, node selector and tolerations; None: a CPU task.
    ``launches``: the task creates jobs, which it owns: its pod's name, uid and namespace from
    the downward API."""
    if cluster is None:
        return task
    from kfp import kubernetes

    for secret, keys in cluster.secret_env().items():   # required: a missing one stops the pod, named
        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=keys, optional=False)
    for key, value in cluster.plain_env().items():
        task.set_env_variable(key, value)
    if cluster.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(cluster.image_pull_secrets))
    if cluster.data_pvc:
        kubernetes.mount_pvc(task, pvc_name=cluster.data_pvc, mount_path=cluster.data_mount)
    if launches:
        for env, path in (("POD_NAME", "metadata.name"), ("POD_UID", "metadata.uid"),
                          ("POD_NAMESPACE", "metadata.namespace")):
            kubernetes.use_field_path_as_env(task, env_name=env, field_path=path)
    if gpus is not None:
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=cluster.shm_size)
    if not (gpus and cluster.accelerator):   # a CPU task: what it may use, said (a flag sets it)
        task.set_cpu_request(cluster.task_cpu).set_cpu_limit(cluster.task_cpu)
        task.set_memory_request(cluster.task_memory).set_memory_limit(cluster.task_memory)
    if gpus and cluster.accelerator:
        task.set_accelerator_type(cluster.accelerator).set_accelerator_limit(gpus)
        task.set_cpu_limit(cluster.cpu).set_memory_limit(cluster.memory)
        for key, value in cluster.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for t in cluster.tolerations():
            kubernetes.add_toleration(task, key=t["key"], operator=t["operator"], effect=t["effect"])
    return task


def build_pipeline(cluster: ClusterSettings | None = None, train_gpus: int | None = 1):
    """The pipeline function; ``cluster`` None for kfp.local (no Kubernetes settings).
    ``train_gpus``: the train task's (``train_task_gpus``); evaluate and score champion hold one."""
    job_cluster = settings_dict(cluster or ClusterSettings())
    job_cluster["gpu_image"] = job_cluster["gpu_image"] or GPU_IMAGE

    def _stages(data_uri, subset, preprocess, train, evaluate, register, force, mlflow_uri, experiment, run_name,
                kfp_ui, mlflow_run_id):
        chosen = _apply(c.select_subset(data_uri=data_uri, settings=subset, train=train, mlflow_uri=mlflow_uri,
                                        experiment=experiment, run_name=run_name,
                                        kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                                        kfp_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, kfp_ui=kfp_ui,
                                        mlflow_run_id=mlflow_run_id), cluster)
        chosen.set_caching_options(False)  # it opens (or, retried, finds) the MLflow run of this KFP run
        chosen.set_retry(num_retries=2)
        run_id = chosen.outputs["run_id"]
        decision = _apply(c.decide(train_manifest=chosen.outputs["train_manifest"], train=train, register=register,
                                   force=force, run_id=run_id, mlflow_uri=mlflow_uri), cluster)
        decision.set_caching_options(False)
        with dsl.If(decision.output == "train", name="something-new"):
            # values in, no run id: KFP's cache reuses the shards of the same data and settings
            pre = _apply(c.preprocess(data_uri=data_uri, subset=subset,
                                      train_manifest_hash=chosen.outputs["train_manifest_hash"],
                                      val_manifest_hash=chosen.outputs["val_manifest_hash"], settings=preprocess),
                         cluster)
            pre.set_caching_options(True)
            pre.set_retry(num_retries=2)
            logged = _apply(c.log_shards(train_shards=pre.outputs["train_shards"], val_shards=pre.outputs["val_shards"],
                                         run_id=run_id, mlflow_uri=mlflow_uri), cluster)
            logged.set_caching_options(False)
            trained = _apply(c.train(train_shards=pre.outputs["train_shards"], val_shards=pre.outputs["val_shards"],
                                     settings=train, cluster=job_cluster,
                                     register=register, run_id=run_id, mlflow_uri=mlflow_uri), cluster,
                             gpus=train_gpus, launches=True)
            trained.set_caching_options(False)
            trained.set_retry(num_retries=2)   # resumes from its checkpoints (an evicted node costs minutes)
            evaluated = _apply(c.evaluate(model=trained.outputs["model"], val_shards=pre.outputs["val_shards"],
                                          settings=evaluate, run_id=run_id, mlflow_uri=mlflow_uri), cluster, gpus=1)
            evaluated.set_caching_options(False)
            champion = _apply(c.score_champion(val_shards=pre.outputs["val_shards"], settings=evaluate,
                                               register=register, run_id=run_id, mlflow_uri=mlflow_uri),
                              cluster, gpus=1)
            champion.set_caching_options(False)
            reg = _apply(c.register(model=trained.outputs["model"], evaluation=evaluated.outputs["evaluation"],
                                    champion=champion.outputs["champion"], val_shards=pre.outputs["val_shards"],
                                    settings=register, run_id=run_id, mlflow_uri=mlflow_uri), cluster)
            reg.set_caching_options(False)
            reg.after(logged)
            with dsl.If(reg.outputs["Output"] != "", name="gate-passed"):
                prom = _apply(c.promote_champion(register=register, version=reg.outputs["Output"], run_id=run_id,
                                                 mlflow_uri=mlflow_uri), cluster)
                prom.set_caching_options(False)

    @dsl.pipeline(name=PIPELINE_NAME, description="Panoptic FPN: subset, preprocess, train, evaluate, register")
    def panoptic_fpn(data_uri: str, subset: dict = {}, preprocess: dict = {}, train: dict = {}, evaluate: dict = {},
                     register: dict = {}, force: bool = False, mlflow_uri: str = "",
                     experiment: str = "panoptic-fpn", run_name: str = "", kfp_ui: str = "",
                     mlflow_run_id: str = "") -> str:
        """Train and ship a Panoptic FPN model (``panoptic pipeline --help``; README).

        Args:
            data_uri: The COCO panoptic root the subset is drawn from (s3://BUCKET/PREFIX holding
                train2017/, val2017/ and annotations/panoptic_{train2017,val2017}.json and folders).
            subset: Subset settings, e.g. {"size": 20000, "strategy": "balanced"} (SubsetSettings).
            preprocess: Shard settings, e.g. {"shard_images": 500} (PreprocessSettings).
            train: Train settings, e.g. {"config": "r50_1x", "init": "coco", "nodes": 2,
                "gpus_per_node": 8} (TrainSettings; the compiled GPUs follow the default).
            evaluate: Evaluation settings, e.g. {"batch_size": 2} (EvaluateSettings).
            register: Registry and gate settings, e.g. {"name": "panoptic-fpn", "margin": 0.0}.
            force: Retrain even when data, config and code are the champion's.
            mlflow_uri: The MLflow tracking server every task logs to (http://mlflow.panoptic:5000);
                required on a cluster.
            experiment: The MLflow (and KFP) experiment.
            run_name: The MLflow run's name (default: panoptic-fpn <config> <date>).
            kfp_ui: Internal, set by submit: the KFP UI address the MLflow run links back to.
            mlflow_run_id: Internal, set by submit: the MLflow run it created for this KFP run.
        """
        final = _apply(c.finalize(kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, mlflow_uri=mlflow_uri,
                                  experiment=experiment), cluster)
        final.set_caching_options(False)
        with dsl.ExitHandler(final, name="mlflow-runs-closed"):
            _stages(data_uri, subset, preprocess, train, evaluate, register, force, mlflow_uri, experiment, run_name,
                    kfp_ui, mlflow_run_id)
        return final.outputs["Output"]

    return panoptic_fpn
