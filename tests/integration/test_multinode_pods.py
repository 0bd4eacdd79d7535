"""The cluster path, run as Kubernetes runs it (no cluster here; tests/k8s_standin.py).

The train task runs as on KFP: its artifacts live in S3 (moto on 127.0.0.1) under a pipeline
root, and the task sees them as KFP's launcher hands them over (``.uri`` = ``s3://...``, ``.path``
= the launcher's local copy, ``/s3/...``, here under a folder of the test). The step creates a
2-node PyTorchJob or TrainJob through the real ``kubernetes`` client; the stand-in's operator
runs each replica as a container of our CUDA image with the operator's environment, the
manifest's volumes, /dev/shm, user and limits, and the Secret's S3 keys. The pods read the
shards from S3 through the URIs the step gave them, train with DDP (gloo, CPU) and write the
model back; the step picks it up; evaluate and register then make it a registered champion,
as the DAG does. Also: a job pod's path can never be a task pod's local copy (the launcher's
mapping for s3, minio and gs)."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest
from kfp import dsl

from components.common import storage
from pipeline import components as c
from pipeline.steps import step_evaluate, step_register, step_subset
from tests.k8s_standin import DockerOperator, KubeStandIn, kubeconfig
from tests.servers import mlflow_server, moto_s3, postgres_database
from tests.training import MICRO_OVERRIDES, make_shards

pytestmark = pytest.mark.integration

NS = "team-a"
TASK_POD = "panoptic-fpn-x7k2-system-container-impl-train"


def launched(cls, uri: str, mount: str):
    """An artifact as KFP's launcher gives it to a task: ``.uri`` the store's, ``.path`` KFP's own
    mapping of it (``s3://b/k`` -> ``/s3/b/k``), under ``mount`` instead of ``/``."""
    class Launched(cls):
        def _get_path(self):
            return mount + super()._get_path()
    return Launched(uri=uri, name=uri.rsplit("/", 1)[-1])


def copy_tree(src: str, dst: str) -> None:
    """What the launcher does with a folder artifact: download (or upload) every file."""
    sfs, spath = storage.resolve(src)
    dfs, dpath = storage.resolve(dst)
    if isinstance(dfs, pafs.LocalFileSystem):
        os.makedirs(dpath, exist_ok=True)
    pafs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs)


@pytest.fixture(scope="module")
def cluster(images, synth_root, tmp_path_factory):
    """S3 (moto), an MLflow server on PostgreSQL with S3 artifacts, the preprocess task's shards
    uploaded under a KFP pipeline root, and the subset step's pipeline run."""
    tmp = tmp_path_factory.mktemp("cluster")
    with moto_s3("panoptic") as endpoint, postgres_database() as db, \
            mlflow_server(db, "s3://panoptic/mlflow") as mlflow_uri:
        root = "s3://panoptic/pipeline-root/panoptic-fpn/run-1"
        local_train = make_shards(synth_root, str(tmp / "train"))
        local_val = make_shards(synth_root, str(tmp / "val"), split="val2017")
        copy_tree(local_train, f"{root}/preprocess/train_shards")
        copy_tree(local_val, f"{root}/preprocess/val_shards")
        run_id = step_subset(data_uri=synth_root, train_out=str(tmp / "m_train"), val_out=str(tmp / "m_val"),
                             settings={"size": 8, "val_size": 4}, train={"config": "tiny"}, mlflow_uri=mlflow_uri)
        yield {"endpoint": endpoint, "mlflow": mlflow_uri, "root": root, "run_id": run_id, "images": images}


@pytest.mark.timeout(2400)
@pytest.mark.parametrize("kind", ["pytorchjob", "trainjob"])
def test_a_two_node_job_runs_as_kubernetes_runs_it_and_its_model_is_registered(kind, cluster, tmp_path, monkeypatch):
    import logging

    import docker

    root, mount = cluster["root"], str(tmp_path / "launcher")
    train_shards = launched(dsl.Dataset, f"{root}/preprocess/train_shards", mount)
    val_shards = launched(dsl.Dataset, f"{root}/preprocess/val_shards", mount)
    model = launched(dsl.Model, f"{root}/train-{kind}/model", mount)
    assert train_shards.path == mount + "/s3/panoptic/pipeline-root/panoptic-fpn/run-1/preprocess/train_shards"
    copy_tree(train_shards.uri, train_shards.path)   # the launcher's download of the task's inputs
    copy_tree(val_shards.uri, val_shards.path)

    secrets = {(NS, "panoptic-s3"): {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}}
    operator = DockerOperator(docker.from_env(), secrets=secrets)
    settings = {"config": "tiny", "iterations": 4, "overrides": MICRO_OVERRIDES, "nodes": 2, "gpus_per_node": 1,
                "launcher": kind, "namespace": NS}
    job_cluster = {"accelerator": "", "cpu": "1", "memory": "3Gi", "shm_size": "256Mi", "s3_endpoint":
                   cluster["endpoint"], "s3_secret": "panoptic-s3", "gpu_image": cluster["images"]["cuda"]}
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("components.train.launcher").addHandler(handler)
    with KubeStandIn(operator, secrets=secrets, pods={(NS, TASK_POD): {}}) as k8s:
        monkeypatch.setenv("KUBECONFIG", kubeconfig(str(tmp_path / "kubeconfig"), k8s.url, NS))
        for name, value in (("POD_NAME", TASK_POD), ("POD_UID", k8s.pod_uid(NS, TASK_POD)), ("POD_NAMESPACE", NS)):
            monkeypatch.setenv(name, value)   # the downward API of the compiled train task
        monkeypatch.setattr("components.train.launcher.POLL_S", 1.0)
        c.train.python_func(train_shards=train_shards, val_shards=val_shards, settings=settings, cluster=job_cluster,
                            register={}, run_id=cluster["run_id"], mlflow_uri=cluster["mlflow"], model=model)
        job = k8s.objects and next(iter(k8s.objects.values()))
        started = list(operator.started)
    logging.getLogger("components.train.launcher").removeHandler(handler)
    log = "\n".join(lines)

    # what Kubernetes was asked for, and what the pods were started with
    assert job["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod", "name": TASK_POD,
                                                  "uid": k8s.pod_uid(NS, TASK_POD)}]
    assert len(started) == 2
    for pod in started:
        text = " ".join(pod["command"])
        assert "/s3/" not in text and mount not in text
        assert pod["command"][pod["command"].index("--shards") + 1] == train_shards.uri
        output = pod["command"][pod["command"].index("--output") + 1]
        assert output == f"{root}/train-{kind}/checkpoints"   # beside the Model artifact, in the store
        assert pod["user"] == "1000" and pod["shm_size"] == 256 * 2**20
        assert pod["nano_cpus"] == 10**9 and pod["mem_limit"] == 3 * 2**30
        assert pod["env"]["AWS_ENDPOINT_URL"] == cluster["endpoint"] and pod["env"]["AWS_ACCESS_KEY_ID"] == "testing"
        assert pod["env"]["MLFLOW_TRACKING_URI"] == cluster["mlflow"]
    if kind == "pytorchjob":
        assert [p["env"]["RANK"] for p in started] == ["0", "1"] and started[0]["env"]["WORLD_SIZE"] == "2"
        assert "--node_rank=1" in started[1]["command"] and "--master_addr=127.0.0.1" in started[1]["command"]
    else:
        assert [p["env"]["PET_NODE_RANK"] for p in started] == ["0", "1"]
        assert started[0]["env"]["PET_NNODES"] == "2" and started[0]["command"][:3] == ["torchrun", "-m",
                                                                                        "components.train"]
    # the master pod's log reached the task's log
    master = started[0]["pod"]
    assert f"[{master}]" in log and "iter" in log.split(f"[{master}]", 1)[1], log[-3000:]

    # the step picked the model up into its (local) Model artifact; the launcher uploads it
    assert sorted(os.listdir(model.path)) == ["lineage.json", "model.pt", "train_config.json"]
    copy_tree(model.path, model.uri)
    assert storage.exists(f"{root}/train-{kind}/checkpoints/model.pt")

    # evaluate and register, as the DAG does next
    metrics = step_evaluate(model_uri=os.path.join(model.path, "model.pt"), val_shards=val_shards.path,
                            out=str(tmp_path / "evaluation"), settings={"report_samples": 1, "batch_size": 2,
                                                                        "num_workers": 0},
                            run_id=cluster["run_id"], mlflow_uri=cluster["mlflow"])
    assert 0.0 <= metrics["PQ"] <= 1.0
    version, promote = step_register(model_uri=os.path.join(model.path, "model.pt"),
                                     eval_dir=str(tmp_path / "evaluation"), settings={"name": f"multinode-{kind}"},
                                     run_id=cluster["run_id"], mlflow_uri=cluster["mlflow"])
    assert version == "1" and promote
    from mlflow.tracking import MlflowClient

    registered = MlflowClient(cluster["mlflow"]).get_model_version(f"multinode-{kind}", "1")
    assert registered.tags["data_fingerprint"]
    train_runs = MlflowClient(cluster["mlflow"]).search_runs(
        [MlflowClient(cluster["mlflow"]).get_run(cluster["run_id"]).info.experiment_id],
        filter_string="tags.`panoptic.stage` = 'train'")
    assert any("train/loss_sem_seg" in r.data.metrics for r in train_runs)   # rank 0 logged into the step's run


def test_job_pods_never_get_a_task_pods_local_path(tmp_path):
    """KFP's SDK maps s3://, minio:// and gs:// URIs to /s3/, /minio/, /gcs/ paths of the task pod;
    the pods we launch get the store's URI (minio through its S3 API), and gs:// is refused."""
    from components.common.cluster import uri_for_pods

    for uri, local, pods in (("s3://b/k/shards", "/s3/b/k/shards", "s3://b/k/shards"),
                             ("minio://mlpipeline/v2/x", "/minio/mlpipeline/v2/x", "s3://mlpipeline/v2/x")):
        artifact = dsl.Dataset(uri=uri)
        assert artifact.path == local                      # what the launcher hands the task
        assert uri_for_pods(artifact.uri) == pods
        with pytest.raises(ValueError, match="local copy"):
            uri_for_pods(artifact.path)
    assert dsl.Dataset(uri="gs://b/k").path == "/gcs/b/k"
    with pytest.raises(ValueError, match="through S3"):
        uri_for_pods("gs://b/k")
    with pytest.raises(ValueError, match="local copy"):
        uri_for_pods("/gcs/b/k")
    assert uri_for_pods(str(tmp_path)) == str(tmp_path)    # kfp.local: the path is the store
