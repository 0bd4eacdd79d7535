"""`panoptic pipeline compile | run-local | submit | schedule`: the DAG, compiled, run here, or
sent to a KFP host. Every one takes the same ``--set NAME=VALUE`` items (``pipeline/stages.py``),
checked before anything starts."""

from __future__ import annotations

import os
import shlex
import sys
import time

import click

from components.common.cluster import ClusterSettings
from pipeline.dag import PIPELINE_NAME
from pipeline.kfp_client import api_errors, auth_options, experiment_id, kfp_client
from pipeline.local import LOCAL_SETTINGS, RUNNERS, TaskFailed, run_local
from pipeline.stages import STAGES, SettingError, check, parse_sets

SET_HELP = ("A setting, repeatable: STAGE.KEY=VALUE (train.iterations=300, subset.size=0.1), "
            "train.SECTION.KEY=VALUE for the training config (train.solver.base_lr=0.01), STAGE={...}, or a run "
            f"parameter (data_uri=..., force=true). Stages: {', '.join(STAGES)}.")


def compile_pipeline(out: str, cluster: ClusterSettings | None = None, defaults: dict | None = None,
                     train: dict | None = None) -> str:
    """Write the DAG as a KFP package; ``defaults``: parameter defaults baked in (from ``--set``);
    ``train``: the train settings the run trains with (else the defaults'), which decide the
    train task's GPUs (``dag.train_task_gpus``)."""
    from kfp import compiler

    from pipeline.dag import build_pipeline, train_task_gpus

    gpus = train_task_gpus(_train_settings(train if train is not None else (defaults or {}).get("train", {})))
    compiler.Compiler().compile(build_pipeline(cluster or ClusterSettings(), train_gpus=gpus), out,
                                pipeline_parameters=defaults or None)
    return out


def _train_settings(train: dict):
    from components.common.settings import parse_settings
    from components.train.settings import TrainSettings

    return parse_settings(TrainSettings, train or {}, "train settings")


def package_train_gpus(package: str) -> tuple[int | None, dict]:
    """(the GPUs a compiled package's train task holds, None for a CPU task; its train default)."""
    import yaml

    try:
        with open(package) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        container = docs[0]["deploymentSpec"]["executors"]["exec-train"]["container"]
        default = docs[0]["root"]["inputDefinitions"]["parameters"]["train"].get("defaultValue") or {}
        accelerator = container.get("resources", {}).get("accelerator")
        if accelerator:
            return int(accelerator.get("resourceCount", accelerator.get("count", 0))), default
        # no accelerator: a task that trains here still has its /dev/shm
        k8s = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
        return (0 if k8s.get("exec-train", {}).get("emptyDirMounts") else None), default
    except (OSError, yaml.YAMLError, IndexError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise click.BadParameter(f"{package}: not a package `panoptic pipeline compile` wrote ({type(e).__name__}: "
                                 f"{(str(e).splitlines() or [''])[0][:100]})", param_hint="--package") from None


def check_package_gpus(package: str, arguments: dict, cluster: ClusterSettings) -> None:
    """A package compiled for another training shape reserves GPUs that nothing uses, or none for a
    task that trains: refuse it, saying how to make one that fits."""
    from pipeline.dag import train_task_gpus

    held, default = package_train_gpus(package)
    train = _train_settings(arguments["train"] if "train" in arguments else default)
    wanted = train_task_gpus(train)
    if not cluster.accelerator:
        wanted = None if wanted is None else 0
    if held != wanted:
        how = (f"launches a {train.nodes}x{train.gpus_per_node}-GPU job" if wanted is None and train.nodes > 1 else
               "launches a Katib sweep" if wanted is None else f"trains on {wanted} GPU(s) in the train task")
        raise click.UsageError(f"{package} reserves {held if held is not None else 'no'} GPU(s) for the train task, "
                               f"but this run {how}: compile it with the same train settings (panoptic pipeline "
                               f"compile --set train.nodes=... --set train.gpus_per_node=...), or leave out --package "
                               f"(submit and schedule compile with them)")


def pipeline_arguments(items, base: dict | None = None) -> dict:
    """``--set`` items -> the pipeline's arguments ({run parameter: value, stage: {settings}}),
    every stage's settings checked (``stages.check``); a problem is a click error naming it."""
    try:
        run, settings = parse_sets(items, settings=base)
        check(settings)
    except SettingError as e:
        raise click.BadParameter(str(e), param_hint="--set") from None
    return {**run, **{stage: values for stage, values in settings.items() if values}}


MLFLOW_HINT = ("--set mlflow_uri=http://mlflow.panoptic:5000 (the tracking server infra/base deploys; from a laptop: "
               "kubectl -n panoptic port-forward svc/mlflow 5000)")


def cluster_problems(arguments: dict, cluster: ClusterSettings, *, required: bool) -> list[str]:
    """What a run on a cluster cannot do without, said before anything starts: an MLflow server
    every task shares (a task's own sqlite file vanishes with its pod, and the registry and the
    champion with it) and data the task pods can read. ``required``: absent values are problems
    too (submit, schedule); compile checks only what is given."""
    problems = []
    mlflow = arguments.get("mlflow_uri", "")
    if not mlflow and required:
        problems.append(f"mlflow_uri is required on a cluster: {MLFLOW_HINT}")
    elif mlflow and not mlflow.startswith(("http://", "https://")):
        problems.append(f"mlflow_uri={mlflow}: a store of one pod's disk, which every task would have its own of and "
                        f"lose with it; give the tracking server's address: {MLFLOW_HINT}")
    data = arguments.get("data_uri", "")
    on_pvc = cluster.data_pvc and data.startswith(cluster.data_mount.rstrip("/") + "/")
    if not data and required:
        problems.append("data_uri is required: --set data_uri=s3://BUCKET/PREFIX (a COCO panoptic root: "
                        "PREFIX/annotations/panoptic_train2017.json ...; README: \"Your own COCO data\")")
    elif data and "://" not in data and not on_pvc:
        problems.append(f"data_uri={data}: a path on this machine, which no task pod has; give an s3:// URI, or a path "
                        f"under {cluster.data_mount}/ with --data-pvc CLAIM (a PVC every task mounts)")
    return problems


def _check_cluster(arguments: dict, cluster: ClusterSettings, *, required: bool = True) -> None:
    problems = cluster_problems(arguments, cluster, required=required)
    if problems:
        raise click.UsageError("\n".join(problems))
    _say_images()


def _say_images() -> None:
    """Which images the compiled tasks run, out loud when they are the defaults."""
    from pipeline.settings import CPU_IMAGE, GPU_IMAGE

    if "IMAGE_REGISTRY" not in os.environ or "IMAGE_TAG" not in os.environ:
        click.echo(f"images: {CPU_IMAGE}, {GPU_IMAGE} (defaults: set IMAGE_REGISTRY and IMAGE_TAG to the ones you "
                   f"pushed with `make images`)", err=True)


PRESETS = os.path.join(os.path.dirname(__file__), "presets")


def preset_items(preset: str | None, _seen: tuple = ()) -> list[str]:
    """A preset (pipeline/presets/NAME.yaml, or a YAML file: a mapping of stages and run
    parameters, ``_base_:`` a preset it extends) as ``--set`` items, which the command's own
    ``--set`` items follow (and so override)."""
    import json

    import yaml

    if not preset:
        return []
    if preset in _seen or len(_seen) > 8:
        raise click.BadParameter(f"{preset}: presets extend each other in a circle ({' -> '.join(_seen)})",
                                 param_hint="--preset")
    path = preset if os.path.isfile(preset) else os.path.join(PRESETS, f"{preset}.yaml")
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(PRESETS) if f.endswith(".yaml"))
        raise click.BadParameter(f"{preset!r}: no such file or preset; presets: {', '.join(known)}",
                                 param_hint="--preset")
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    if not isinstance(doc, dict):
        raise click.BadParameter(f"{path}: a preset is a mapping of stages and run parameters", param_hint="--preset")
    base = doc.pop("_base_", None)
    items = preset_items(os.path.join(os.path.dirname(path), str(base)), (*_seen, preset)) if base else []
    return items + [f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in doc.items()]


def _sets_option(f):
    f = click.option("--set", "sets", multiple=True, metavar="NAME=VALUE", help=SET_HELP)(f)
    return click.option("--preset", default=None, metavar="NAME|FILE", expose_value=True,
                        help="Run settings from pipeline/presets/NAME.yaml (notebook, cluster-2x8) or a YAML file, "
                             "before the --set items; the same preset on submit and schedule keeps them alike.")(f)


def _cluster_options(f):
    d = ClusterSettings()
    f = click.option("--accelerator", default=d.accelerator, show_default=True, help="GPU resource; '' = CPU.")(f)
    f = click.option("--gpus", default=None, hidden=True, callback=_gpus_gone)(f)
    f = click.option("--cpu", default=d.cpu, show_default=True, help="CPU of GPU tasks and training pods.")(f)
    f = click.option("--memory", default=d.memory, show_default=True, help="Memory of GPU tasks and training pods.")(f)
    f = click.option("--node-selector", multiple=True, metavar="KEY=VALUE", help="Node labels for GPU tasks.")(f)
    f = click.option("--data-pvc", default=d.data_pvc, help="PVC mounted at /data in every task.")(f)
    f = click.option("--s3-secret", default=d.s3_secret, show_default=True, help="Secret with AWS keys.")(f)
    f = click.option("--s3-endpoint", default=d.s3_endpoint, help="AWS_ENDPOINT_URL for MinIO.")(f)
    f = click.option("--mlflow-secret", default=d.mlflow_secret, help="Secret with MLflow credentials.")(f)
    f = click.option("--shm-size", default=d.shm_size, show_default=True,
                     help="Memory-backed /dev/shm of GPU tasks and training pods (DataLoader workers).")(f)
    f = click.option("--task-cpu", default=d.task_cpu, show_default=True,
                     help="CPU request and limit of each CPU task (preprocess writes a shard per CPU).")(f)
    f = click.option("--task-memory", default=d.task_memory, show_default=True,
                     help="Memory request and limit of each CPU task.")(f)
    f = click.option("--image-pull-secret", "image_pull_secrets", multiple=True, metavar="SECRET",
                     help="Secret for pulling the images from a private registry (repeatable).")(f)
    return f


def _gpus_gone(ctx, param, value):
    if value is not None:
        raise click.BadParameter("GPUs follow one setting now: --set train.gpus_per_node=N (the train task, or each "
                                 "node of a job with train.nodes=N; the task that launches a job holds none); "
                                 "evaluate and score champion take 1", param_hint="--gpus")


def _cluster(accelerator, gpus, cpu, memory, node_selector, data_pvc, s3_secret, s3_endpoint, mlflow_secret,
             shm_size, image_pull_secrets, task_cpu, task_memory, service_account=None):
    for kv in node_selector:
        if "=" not in kv:
            raise click.BadParameter(f"{kv!r}: use KEY=VALUE", param_hint="--node-selector")
    return ClusterSettings(accelerator=accelerator, cpu=cpu, memory=memory, data_pvc=data_pvc,
                           s3_secret=s3_secret, s3_endpoint=s3_endpoint, mlflow_secret=mlflow_secret,
                           node_selector=dict(kv.split("=", 1) for kv in node_selector), shm_size=shm_size,
                           image_pull_secrets=tuple(image_pull_secrets), task_cpu=task_cpu, task_memory=task_memory,
                           **({"service_account": service_account} if service_account else {}))


def _service_account_option(f):
    return click.option("--service-account", default="",
                        help="Service account of the run's tasks and of the training pods they launch (e.g. "
                             "panoptic-pipeline from infra/overlays/profile; default: KFP's, the profile's "
                             "default-editor, with the training pods as panoptic-pipeline).")(f)


@click.group("pipeline")
def pipeline():
    """The Kubeflow pipeline: compile it, run it locally, submit or schedule it on a KFP host."""


@pipeline.command("compile")
@click.option("--out", default="pipeline.yaml", show_default=True)
@_sets_option
@_cluster_options
def compile_cmd(out, sets, preset, **cluster):
    """Compile the DAG (with GPU and cluster settings) to a KFP YAML package; --set items become
    the parameters' defaults."""
    defaults = pipeline_arguments(preset_items(preset) + list(sets))
    cs = _cluster(**cluster)
    _check_cluster(defaults, cs, required=False)
    compile_pipeline(out, cs, defaults)
    click.echo(f"wrote {out}")


def cron6(expr: str) -> str:
    """KFP's cron has a seconds field: a 5-field expression gets '0' prepended."""
    fields = expr.split()
    if len(fields) == 5:
        return "0 " + expr
    if len(fields) == 6:
        return expr
    raise click.BadParameter(f"{expr!r}: a cron expression has 5 fields (m h dom mon dow) or 6 (with seconds)")


def _package(package: str | None, cluster: ClusterSettings, arguments: dict) -> str:
    """The package to send: the one given (checked against the run's train settings), or the DAG
    compiled now for them into a temporary file (the user's folder is left alone)."""
    if package:
        check_package_gpus(package, arguments, cluster)
        return package
    import tempfile

    return compile_pipeline(os.path.join(tempfile.mkdtemp(prefix="panoptic-pipeline-"), "pipeline.yaml"), cluster,
                            train=arguments.get("train", {}))


def _publish(client, host: str, package: str, namespace: str):
    """The pipeline version holding this package (uploaded once, found by its digest after)."""
    from components.common.hashing import code_version
    from pipeline.publish import ensure_version

    version = ensure_version(client, package, namespace=namespace or None,
                             description=f"Panoptic FPN pipeline, code {code_version()}")
    click.echo(f"pipeline {PIPELINE_NAME}, version {version.name} ({version.how}): "
               f"{host.rstrip('/')}/#/pipelines/details/{version.pipeline_id}/version/{version.version_id}")
    return version


@pipeline.command("submit")
@click.option("--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline.")
@click.option("--experiment", default="panoptic-fpn", show_default=True)
@click.option("--run-name", default=None)
@_sets_option
@click.option("--package", default=None, help="A compiled pipeline.yaml (default: compile now).")
@auth_options
@_service_account_option
@_cluster_options
def submit(host, experiment, run_name, sets, preset, package, namespace, token_file, cookie, service_account,
           **cluster):
    """Run the pipeline on a KFP host: its version (uploaded once per package digest) in the
    experiment, the same run and experiment names in KFP and MLflow; prints both runs' addresses
    (MLflow's when its server answers from here: the run is then created now, and linked)."""
    arguments = pipeline_arguments(preset_items(preset) + list(sets))
    cs = _cluster(**cluster, service_account=service_account)
    _check_cluster(arguments, cs)   # before any network call
    package = _package(package, cs, arguments)
    client = kfp_client(host, namespace, token_file, cookie)
    name = run_name or f"{PIPELINE_NAME}-{time.strftime('%Y%m%d-%H%M%S')}"
    experiment = arguments.setdefault("experiment", experiment)   # --set experiment= names both
    arguments.setdefault("run_name", name)
    with api_errors(host):
        version = _publish(client, host, package, namespace)
        mlflow_run = _mlflow_run_now(arguments)
        run = client.run_pipeline(experiment_id(client, experiment, namespace), name,
                                  params=_with_ui(arguments, host, mlflow_run),
                                  pipeline_id=version.pipeline_id, version_id=version.version_id,
                                  service_account=service_account or None)
    click.echo(f"run {run.run_id}: {host.rstrip('/')}/#/runs/details/{run.run_id}")
    if mlflow_run is None:
        uri = arguments.get("mlflow_uri") or "the tasks' MLFLOW_TRACKING_URI"
        click.echo(f"MLflow run: created by the first task in {uri} (not reachable from here); its address is the "
                   f"select-subset task's `mlflow_run` artifact, and its tag kfp.run_id = {run.run_id}")
        return
    from components.common.tracking import run_address, runs_address
    from pipeline.steps import kfp_tags

    mlflow_run_id, experiment_id_ = mlflow_run
    try:
        from mlflow.tracking import MlflowClient

        mlflow = MlflowClient(arguments["mlflow_uri"])
        for k, v in kfp_tags(run.run_id, "", _kfp_ui(arguments, host)).items():
            mlflow.set_tag(mlflow_run_id, k, v)
    except Exception as e:   # the first task tags it too
        click.echo(f"(could not tag the MLflow run with the KFP run now: {type(e).__name__}; its first task will)")
    click.echo(f"MLflow run: {run_address(mlflow_run_id, experiment_id_, arguments['mlflow_uri'])}")
    click.echo(f"runs table: {runs_address(experiment_id_, arguments['mlflow_uri'])}")


def _mlflow_run_now(arguments: dict):
    """(run id, experiment id) of the MLflow pipeline run created now, when the run's MLflow
    server answers from here; None when it does not (an in-cluster address): the first task
    creates it then."""
    uri = arguments.get("mlflow_uri", "")
    if not uri.startswith(("http://", "https://")) or arguments.get("mlflow_run_id"):
        return None
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
    except requests.RequestException:
        return None
    from mlflow.tracking import MlflowClient

    from components.common.tracking import start_pipeline_run

    run_id = start_pipeline_run(uri, arguments.get("experiment"), arguments.get("run_name"))
    return run_id, MlflowClient(uri).get_run(run_id).info.experiment_id


def _kfp_ui(arguments: dict, host: str) -> str:
    return arguments.get("kfp_ui") or host.rstrip("/")


def _with_ui(arguments: dict, host: str, mlflow_run=None) -> dict:
    """The run's arguments with the KFP UI's address (the MLflow run links back to the KFP run)
    and the MLflow run created for it, if any."""
    extra = {"mlflow_run_id": mlflow_run[0]} if mlflow_run else {}
    return {"kfp_ui": _kfp_ui(arguments, host), **arguments, **extra}


@pipeline.command("schedule")
@click.option("--host", required=True, help="KFP API endpoint.")
@click.option("--cron", required=True, help='Cron expression, e.g. "0 3 * * 0" (Sundays 03:00).')
@click.option("--experiment", default="panoptic-fpn", show_default=True)
@click.option("--name", default=f"{PIPELINE_NAME}-retrain", show_default=True)
@click.option("--max-concurrency", default=1, show_default=True)
@_sets_option
@click.option("--package", default=None, help="A compiled pipeline.yaml (default: compile now).")
@auth_options
@_service_account_option
@_cluster_options
def schedule(host, cron, experiment, name, max_concurrency, sets, preset, package, namespace, token_file, cookie,
             service_account, **cluster):
    """Scheduled retraining: a recurring run of the pipeline's version. A recurring run of the same
    name is replaced (KFP cannot update one), or left as it is when nothing changed. A run whose
    data, config and code equal the champion's ends early with "nothing new" (--set force=true
    retrains anyway)."""
    from pipeline.publish import schedule as schedule_version

    cron = cron6(cron)
    arguments = pipeline_arguments(preset_items(preset) + list(sets))
    cs = _cluster(**cluster, service_account=service_account)
    _check_cluster(arguments, cs)   # before any network call
    package = _package(package, cs, arguments)
    experiment = arguments.setdefault("experiment", experiment)   # the same experiment name in KFP and MLflow
    client = kfp_client(host, namespace, token_file, cookie)
    with api_errors(host):
        version = _publish(client, host, package, namespace)
        job, what, old = schedule_version(client, experiment_id=experiment_id(client, experiment, namespace), name=name,
                                          version=version, cron=cron, params=_with_ui(arguments, host),
                                          max_concurrency=max_concurrency, namespace=namespace or None,
                                          service_account=service_account or None)
    where = f" in experiment {experiment}" + (f" (namespace {namespace})" if namespace else "")
    if what == "unchanged":
        click.echo(f"recurring run {job.recurring_run_id} '{name}' already runs version {version.name} on cron "
                   f"'{cron}'{where}: left as it is")
    elif what == "replaced":
        click.echo(f"recurring run '{name}' replaced: {old.recurring_run_id} (deleted) -> {job.recurring_run_id}, "
                   f"version {version.name}, cron '{cron}'{where}")
    else:
        click.echo(f"recurring run {job.recurring_run_id} '{name}' on cron '{cron}', version {version.name}{where}")


@pipeline.command("versions")
@click.option("--host", required=True, help="KFP API endpoint.")
@auth_options
def versions_cmd(host, namespace, token_file, cookie):
    """The pipeline's versions on a KFP host, newest first (name = the package's digest)."""
    from pipeline.publish import list_all, pipeline_id_in

    client = kfp_client(host, namespace, token_file, cookie)
    with api_errors(host):
        pid = pipeline_id_in(client, PIPELINE_NAME, namespace or None)
        if pid is None:
            where = f" in namespace {namespace}" if namespace else ""
            raise click.ClickException(f"no pipeline {PIPELINE_NAME} on {host}{where} yet: `panoptic pipeline submit` "
                                       f"uploads it")
        found = list_all(client.list_pipeline_versions, "pipeline_versions", pipeline_id=pid)
    for v in sorted(found, key=lambda v: str(v.created_at), reverse=True):
        click.echo(f"{v.display_name}  {v.pipeline_version_id}  {v.created_at}  {v.description or ''}".rstrip())


@pipeline.command("schedules")
@click.option("--host", required=True, help="KFP API endpoint.")
@click.option("--experiment", default="panoptic-fpn", show_default=True)
@auth_options
def schedules_cmd(host, experiment, namespace, token_file, cookie):
    """The recurring runs in the experiment: name, id, cron, the pipeline version they run."""
    from pipeline.publish import list_all

    client = kfp_client(host, namespace, token_file, cookie)
    with api_errors(host):
        runs = list_all(client.list_recurring_runs, "recurring_runs", experiment_id=experiment_id(client, experiment,
                                                                                             namespace),
                    namespace=namespace or None)
    if not runs:
        click.echo(f"no recurring runs in experiment {experiment}")
    for r in runs:
        cron = r.trigger.cron_schedule.cron if r.trigger and r.trigger.cron_schedule else "-"
        ref = r.pipeline_version_reference
        click.echo(f"{r.display_name}  {r.recurring_run_id}  cron '{cron}'  version "
                   f"{ref.pipeline_version_id if ref else '-'}  {r.status or ''}".rstrip())


# run-local's shorthands: each is the --set item it stands for
SHORTHANDS = {"config": "train.config", "iterations": "train.iterations", "init": "train.init",
              "subset_size": "subset.size", "val_size": "subset.val_size", "seed": "subset.seed",
              "gate_margin": "register.margin", "gate_tolerance": "register.tolerance"}


@pipeline.command("run-local")
@click.option("--data", default=None, help="COCO panoptic root (default: a synthetic set in data/synth).")
@click.option("--config", default=None, help=f"Model config (= --set train.config=..., default "
                                             f"{LOCAL_SETTINGS['train']['config']}).")
@click.option("--iterations", type=int, default=None,
              help=f"Training iterations (= --set train.iterations=..., default "
                   f"{LOCAL_SETTINGS['train']['iterations']}).")
@click.option("--init", default=None, help="Initial weights: config, scratch, imagenet, coco, champion or a URI.")
@click.option("--subset-size", default=None, help="Train subset: count, fraction or 'all'.")
@click.option("--val-size", default=None, help="Val subset: count, fraction or 'all'.")
@click.option("--seed", type=int, default=None, help="Train subset seed (the val subset keeps its own).")
@click.option("--gate-margin", type=float, default=None, help="PQ a new version must gain over the champion.")
@click.option("--gate-tolerance", type=float, default=None, help="Largest per-category PQ drop allowed.")
@_sets_option
@click.option("--sweep", "sweep_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A hyper-parameter search (YAML: trials, space, algorithm ...; see pipeline/sweeps/tiny.yaml).")
@click.option("--force", is_flag=True, help="Retrain even when the data, config and code are the champion's.")
@click.option("--runner", type=click.Choice(RUNNERS), default="subprocess", show_default=True,
              help="subprocess: every task in this venv; docker: every task in our images (make images), as on "
                   "a cluster, with the MLflow store in ROOT unless MLFLOW_TRACKING_URI says otherwise.")
@click.option("--root", default=None, help="kfp.local pipeline root (artifacts) [default: runs/local, runs/docker].")
@click.option("--verbose", is_flag=True, help="Show every task's full log (else it goes to ROOT/pipeline.log).")
def run_local_cmd(data, sets, preset, sweep_file, force, runner, root, verbose, **shorthands):
    """Run the same DAG on this machine (kfp.local, CPU, MLflow sqlite by default)."""
    items = preset_items(preset) + [f"{SHORTHANDS[k]}={v}" for k, v in shorthands.items() if v is not None] + \
        list(sets)
    if sweep_file:
        import yaml

        with open(sweep_file) as f:
            items.append(f"train.sweep={yaml.safe_dump(yaml.safe_load(f) or {}, default_flow_style=True).strip()}")
    arguments = pipeline_arguments(items, base=LOCAL_SETTINGS)   # checked now: before any task starts
    run = {k: arguments.pop(k) for k in list(arguments) if k not in STAGES}
    _check_local_data(run.get("data_uri", data), arguments.get("subset", {}))
    root = root or f"runs/{'docker' if runner == 'docker' else 'local'}"
    if not verbose:
        click.echo(f"the tasks' full log: {os.path.join(root, 'pipeline.log')} (here: which task runs, training "
                   f"progress, errors)")
    try:
        s = run_local(run.pop("data_uri", data), runner=runner, root=root, force=force or bool(run.pop("force", False)),
                      settings=arguments, verbose=verbose, mlflow_uri=run.pop("mlflow_uri", None),
                      run_name=run.pop("run_name", ""), experiment=run.pop("experiment", ""))
    except TaskFailed as e:
        raise click.ClickException(str(e)) from None
    m, t = s["metrics"], s["tags"]
    click.echo("")
    click.echo(f"pipeline run finished in {s['seconds'] / 60:.1f} min (MLflow run {s['run_id']}, {s['mlflow_uri']})")
    click.echo(f"MLflow run: {s['url']}" + _serve_hint(s["mlflow_uri"]))
    click.echo(f"runs table (PQ, SQ, RQ, the gate's decision): {s['runs_url']}")
    if s["skipped"]:
        click.echo(t.get("decision.reason", "nothing new"))
        click.echo(f"retrain anyway: {_again('--force')}")
        return
    click.echo(f"{'':8s}{'PQ':>8s}{'SQ':>8s}{'RQ':>8s}")
    for name, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        click.echo(f"{name:8s}" + "".join(f"{100 * m.get(k + suffix, float('nan')):8.2f}" for k in ("PQ", "SQ", "RQ")))
    click.echo(f"model: {t.get('model.name')} version {t.get('model.version')}, aliases: {t.get('model.aliases')} "
               f"(gate {'passed' if t.get('gate.promote') == 'True' else 'failed: the champion stays'})")
    if t.get("gate.reason"):
        click.echo(f"gate: {t['gate.reason']}")
    click.echo(f"report: {s['report']}")
    if s.get("gate_report"):
        click.echo(f"champion vs challenger (gate.html): {s['gate_report']}")
    if s["log"]:
        click.echo(f"full log: {s['log']}")
    default_store = s["mlflow_uri"] == f"sqlite:///{os.path.abspath('mlflow.db')}"
    env = "" if default_store else f"MLFLOW_TRACKING_URI={s['mlflow_uri']} "
    click.echo(f"compare runs: {env}{shlex.quote(_program())} runs compare")


def _check_local_data(data: str | None, subset: dict) -> None:
    """A local --data folder has the COCO panoptic layout, before any task starts (the remote
    store is read by the first task, which names what is missing)."""
    from components.common.coco_panoptic import LAYOUT, layout_problems

    if not data or "://" in data:
        return
    splits = (subset.get("train_split", "train2017"), subset.get("val_split", "val2017"))
    missing = layout_problems(data, splits)
    if missing:
        layout = "; ".join(LAYOUT.format(split=s) for s in splits)
        what = ("no such folder" if not os.path.isdir(data) else
                f"not a COCO panoptic folder: missing {', '.join(missing)}")
        raise click.BadParameter(f"{data}: {what}. Expected {layout} "
                                 f"(README: \"Your own COCO data\"; `panoptic data synth --out DIR` makes one)",
                                 param_hint="--data")


def _serve_hint(uri: str) -> str:
    """How to serve a local store's UI at the printed address (a server serves itself)."""
    if uri.startswith(("http://", "https://")):
        return ""
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    return f"  (serve it: {shlex.quote(mlflow if os.path.exists(mlflow) else 'mlflow')} ui --backend-store-uri {uri})"


def _program() -> str:
    """How this process's ``panoptic`` was invoked (a path typed as printed works from here)."""
    prog = sys.argv[0]
    return prog if os.path.sep in prog else "panoptic"


def _again(*extra: str) -> str:
    """This very command line with ``extra`` added: a hint that works when typed as printed."""
    return shlex.join([_program(), *sys.argv[1:], *extra])
