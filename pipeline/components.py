"""KFP components: typed, thin wrappers over ``pipeline.steps``.

Each body imports the step inside the function (KFP ships the function's source to the
container, where our package is installed) and calls it. Artifacts are folders. A stage's
settings arrive as one ``dict`` parameter, parsed by the stage's settings dataclass.
"""


from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from pipeline.settings import CPU_IMAGE, GPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def select_subset(data_uri: str, settings: dict, train: dict, mlflow_uri: str, experiment: str, run_name: str,
                  kfp_run_id: str, kfp_run_name: str, kfp_ui: str, mlflow_run_id: str,
                  train_manifest: Output[Dataset], val_manifest: Output[Dataset],
                  mlflow_run: Output[Markdown]) -> NamedTuple("Outputs", [("run_id", str), ("train_manifest_hash", str),
                                                                       ("val_manifest_hash", str)]):
    """Stage 1: reproducible train/val subsets; opens the pipeline's MLflow run (one per KFP run:
    a retry finds it by the KFP run's id) and links it (``mlflow_run``, Markdown)."""
    from collections import namedtuple

    from components.common.manifests import load_manifest
    from pipeline.steps import step_subset

    run_id = step_subset(data_uri=data_uri, train_out=train_manifest.path, val_out=val_manifest.path,
                         settings=settings, train=train, mlflow_uri=mlflow_uri, experiment=experiment,
                         run_name=run_name, kfp_run_id=kfp_run_id, kfp_run_name=kfp_run_name, kfp_ui=kfp_ui,
                         mlflow_run_id=mlflow_run_id, link_out=mlflow_run.path)
    out = namedtuple("Outputs", ["run_id", "train_manifest_hash", "val_manifest_hash"])
    return out(run_id, load_manifest(train_manifest.path)["manifest_hash"],
               load_manifest(val_manifest.path)["manifest_hash"])


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def decide(train_manifest: Input[Dataset], train: dict, register: dict, force: bool, run_id: str,
           mlflow_uri: str) -> str:
    """"train", or "skip" when the champion was trained on the same data, config and code."""
    from pipeline.steps import step_decide

    return step_decide(train_manifest=train_manifest.path, train=train, register=register, force=force,
                       run_id=run_id, mlflow_uri=mlflow_uri)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def preprocess(data_uri: str, subset: dict, train_manifest_hash: str, val_manifest_hash: str, settings: dict,
               train_shards: Output[Dataset], val_shards: Output[Dataset]):
    """Stage 2: Parquet shards, data-quality gate, quarantine report. Its inputs are values only
    (the subsets by their hashes, no run id), so KFP's cache reuses its shards when they repeat."""
    from pipeline.steps import step_preprocess

    step_preprocess(data_uri=data_uri, subset=subset, train_manifest_hash=train_manifest_hash,
                    val_manifest_hash=val_manifest_hash, train_out=train_shards.path, val_out=val_shards.path,
                    settings=settings)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def log_shards(train_shards: Input[Dataset], val_shards: Input[Dataset], run_id: str, mlflow_uri: str):
    """The preprocess stage in MLflow: counts, the shards as datasets, index and quarantine."""
    from pipeline.steps import step_log_shards

    step_log_shards(train_shards=train_shards.path, val_shards=val_shards.path, run_id=run_id, mlflow_uri=mlflow_uri)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train(train_shards: Input[Dataset], val_shards: Input[Dataset], settings: dict, cluster: dict, register: dict,
          run_id: str, mlflow_uri: str, model: Output[Model]):
    """Stage 3: train here, or launch a PyTorchJob / TrainJob when nodes > 1; with train.sweep,
    the trials (here, or a Katib Experiment) ranked on the validation shards, the best one out.
    Launched pods get the artifacts' .uri: a .path is this pod's local copy."""
    from pipeline.steps import step_train

    step_train(train_shards=train_shards.path, model_out=model.path, settings=settings, cluster=cluster,
               register=register, run_id=run_id, mlflow_uri=mlflow_uri, val_shards=val_shards.path,
               train_shards_uri=train_shards.uri, val_shards_uri=val_shards.uri, model_uri=model.uri)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def evaluate(model: Input[Model], val_shards: Input[Dataset], settings: dict, run_id: str, mlflow_uri: str,
             evaluation: Output[Dataset], metrics: Output[Metrics], report: Output[HTML]) -> float:
    """Stage 4: predictions, PQ/SQ/RQ, report.html (also this step's HTML artifact). Returns PQ."""
    import os
    import shutil

    from components.common.metrics import METRIC_KEYS
    from pipeline.steps import step_evaluate

    m = step_evaluate(model_uri=os.path.join(model.path, "model.pt"), val_shards=val_shards.path, out=evaluation.path,
                      settings=settings, run_id=run_id, mlflow_uri=mlflow_uri)
    for k in METRIC_KEYS:
        metrics.log_metric(k, m[k])
    shutil.copyfile(os.path.join(evaluation.path, "report.html"), report.path)
    return m["PQ"]


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def score_champion(val_shards: Input[Dataset], settings: dict, register: dict, run_id: str, mlflow_uri: str,
                   champion: Output[Dataset]) -> str:
    """The champion's metrics on these validation shards (re-scored if it was measured on others)."""
    from pipeline.steps import step_score_champion

    return step_score_champion(val_shards=val_shards.path, out=champion.path, settings=settings, register=register,
                               run_id=run_id, mlflow_uri=mlflow_uri)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register(model: Input[Model], evaluation: Input[Dataset], champion: Input[Dataset], val_shards: Input[Dataset],
             settings: dict, run_id: str, mlflow_uri: str, gate_report: Output[HTML]) -> str:
    """Stage 5: MLflow pyfunc + registered version (alias challenger) + the gate's decision, and
    with a champion, ``gate_report`` (gate.html: the two side by side).

    Returns the version to promote to champion, or "" when the gate failed. (One output named
    Output: kfp.local 2.17 resolves a dsl.If condition only on such an output.)
    """
    import os

    from pipeline.steps import step_register

    version, promote = step_register(model_uri=os.path.join(model.path, "model.pt"), eval_dir=evaluation.path,
                                     champion_dir=champion.path, settings=settings, run_id=run_id,
                                     mlflow_uri=mlflow_uri, val_shards=val_shards.path, report_out=gate_report.path)
    return version if promote else ""


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def promote_champion(register: dict, version: str, run_id: str, mlflow_uri: str):
    """Move alias champion to the version (runs only when the gate passed)."""
    from pipeline.steps import step_promote

    step_promote(register=register, version=version, run_id=run_id, mlflow_uri=mlflow_uri)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def finalize(status: dsl.PipelineTaskFinalStatus, kfp_run_id: str, mlflow_uri: str, experiment: str,
             mlflow_run: Output[Markdown]) -> str:
    """The exit handler: the MLflow runs' final status, however the pipeline ended (a failed or
    killed task named on the pipeline run, its runs left RUNNING marked FAILED). Returns the
    MLflow run's id; ``mlflow_run`` links it (Markdown)."""
    from pipeline.steps import step_finalize

    return step_finalize(state=status.state, error=status.error_message or "", kfp_run_id=kfp_run_id,
                         mlflow_uri=mlflow_uri, experiment=experiment, link_out=mlflow_run.path)
