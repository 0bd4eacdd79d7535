"""`panoptic pipeline compile | run-local | submit | schedule`."""

from __future__ import annotations

import contextlib
import json
import os
import time

import click

from components.common.cluster import ClusterSettings
from pipeline.dag import PIPELINE_NAME, STAGE_SETTINGS
from pipeline.local import LOCAL_SETTINGS, RUNNERS, TaskFailed, run_local

RUN_PARAMETERS = ("data_uri", "force", "mlflow_uri", "experiment", "run_name")


def compile_pipeline(out: str, cluster: ClusterSettings | None = None) -> str:
    from kfp import compiler

    from pipeline.dag import build_pipeline

    compiler.Compiler().compile(build_pipeline(cluster or ClusterSettings()), out)
    return out


def _cluster_options(f):
    d = ClusterSettings()
    f = click.option("--accelerator", default=d.accelerator, show_default=True, help="GPU resource; '' = CPU.")(f)
    f = click.option("--gpus", default=d.gpus, show_default=True, help="GPUs for the train and evaluate tasks.")(f)
    f = click.option("--cpu", default=d.cpu, show_default=True, help="CPU of GPU tasks and training pods.")(f)
    f = click.option("--memory", default=d.memory, show_default=True, help="Memory of GPU tasks and training pods.")(f)
    f = click.option("--node-selector", multiple=True, metavar="KEY=VALUE", help="Node labels for GPU tasks.")(f)
    f = click.option("--data-pvc", default=d.data_pvc, help="PVC mounted at /data in every task.")(f)
    f = click.option("--s3-secret", default=d.s3_secret, show_default=True, help="Secret with AWS keys.")(f)
    f = click.option("--s3-endpoint", default=d.s3_endpoint, help="AWS_ENDPOINT_URL for MinIO.")(f)
    f = click.option("--mlflow-secret", default=d.mlflow_secret, help="Secret with MLflow credentials.")(f)
    f = click.option("--shm-size", default=d.shm_size, show_default=True,
                     help="Memory-backed /dev/shm of GPU tasks and training pods (DataLoader workers).")(f)
    f = click.option("--image-pull-secret", "image_pull_secrets", multiple=True, metavar="SECRET",
                     help="Secret for pulling the images from a private registry (repeatable).")(f)
    return f


def _cluster(accelerator, gpus, cpu, memory, node_selector, data_pvc, s3_secret, s3_endpoint, mlflow_secret,
             shm_size, image_pull_secrets, service_account=None):
    for kv in node_selector:
        if "=" not in kv:
            raise click.BadParameter(f"{kv!r}: use KEY=VALUE", param_hint="--node-selector")
    return ClusterSettings(accelerator=accelerator, gpus=gpus, cpu=cpu, memory=memory, data_pvc=data_pvc,
                           s3_secret=s3_secret, s3_endpoint=s3_endpoint, mlflow_secret=mlflow_secret,
                           node_selector=dict(kv.split("=", 1) for kv in node_selector), shm_size=shm_size,
                           image_pull_secrets=tuple(image_pull_secrets),
                           **({"service_account": service_account} if service_account else {}))


def _service_account_option(f):
    return click.option("--service-account", default="",
                        help="Service account of the run's tasks and of the training pods they launch (e.g. "
                             "panoptic-pipeline from infra/overlays/profile; default: KFP's, the profile's "
                             "default-editor, with the training pods as panoptic-pipeline).")(f)


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def pipeline_arguments(params: tuple[str, ...]) -> dict:
    """``NAME=VALUE`` items -> the pipeline's arguments. ``train.iterations=1000`` sets one key of
    a stage's settings (``train={"iterations": 1000}``); a whole stage takes JSON
    (``train={"config": "r50_3x"}``). Values are JSON when they parse as such, else strings."""
    out: dict = {}
    for kv in params:
        if "=" not in kv:
            raise click.BadParameter(f"{kv!r}: use NAME=VALUE or STAGE.KEY=VALUE")
        key, value = kv.split("=", 1)
        stage, _, sub = key.partition(".")
        if sub:
            if stage not in STAGE_SETTINGS:
                raise click.BadParameter(f"{kv!r}: {stage!r} is not a stage; stages: {', '.join(STAGE_SETTINGS)}")
            out.setdefault(stage, {})[sub] = _value(value)
        else:
            if key not in STAGE_SETTINGS and key not in RUN_PARAMETERS:
                hint = next((f"; did you mean {s}.{key}?" for s in ("train", "subset", "preprocess", "register")
                             if key in _stage_keys(s)), "")
                raise click.BadParameter(f"no pipeline parameter {key!r}; parameters: "
                                         f"{', '.join(RUN_PARAMETERS + STAGE_SETTINGS)}{hint}")
            value = _value(value)
            if key in STAGE_SETTINGS and not isinstance(value, dict):
                raise click.BadParameter(f"{kv!r}: {key} takes a JSON mapping, or use {key}.KEY=VALUE")
            out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) and key in STAGE_SETTINGS else value
    return out


def _stage_keys(stage: str) -> set[str]:
    """The settings one stage takes (its settings dataclass's fields)."""
    import dataclasses

    from components.evaluate.core import EvaluateSettings
    from components.preprocess.core import PreprocessSettings
    from components.register.core import RegisterSettings
    from components.select_subset.core import SubsetSettings
    from components.train.settings import TrainSettings

    cls = {"subset": SubsetSettings, "preprocess": PreprocessSettings, "train": TrainSettings,
           "evaluate": EvaluateSettings, "register": RegisterSettings}[stage]
    return {f.name for f in dataclasses.fields(cls)}


@click.group("pipeline")
def pipeline():
    """The Kubeflow pipeline: compile it, run it locally, submit or schedule it on a KFP host."""


@pipeline.command("compile")
@click.option("--out", default="pipeline.yaml", show_default=True)
@_cluster_options
def compile_cmd(out, **cluster):
    """Compile the DAG (with GPU and cluster settings) to a KFP YAML package."""
    compile_pipeline(out, _cluster(**cluster))
    click.echo(f"wrote {out}")


def cron6(expr: str) -> str:
    """KFP's cron has a seconds field: a 5-field expression gets '0' prepended."""
    fields = expr.split()
    if len(fields) == 5:
        return "0 " + expr
    if len(fields) == 6:
        return expr
    raise click.BadParameter(f"{expr!r}: a cron expression has 5 fields (m h dom mon dow) or 6 (with seconds)")


def _auth_options(f):
    f = click.option("--namespace", default=lambda: os.environ.get("KFP_NAMESPACE", ""),
                     help="Kubeflow profile namespace (multi-user Kubeflow); env KFP_NAMESPACE.")(f)
    f = click.option("--token-file", default=None, type=click.Path(dir_okay=False),
                     help="File holding a bearer token (else KFP_TOKEN, else the in-cluster service-account token "
                          "at KF_PIPELINES_SA_TOKEN_PATH).")(f)
    f = click.option("--cookie", default=lambda: os.environ.get("KFP_COOKIE", ""),
                     help='Session cookie of the Kubeflow login (Dex/oauth2-proxy), "authservice_session=..."; '
                          "env KFP_COOKIE.")(f)
    return f


def _token(token_file: str | None) -> tuple[str | None, bool]:
    """(bearer token, whether it is the in-cluster service-account token)."""
    from kfp.client import KF_PIPELINES_SA_TOKEN_ENV, KF_PIPELINES_SA_TOKEN_PATH

    if token_file:
        with open(token_file) as f:
            return f.read().strip(), False
    if os.environ.get("KFP_TOKEN"):
        return os.environ["KFP_TOKEN"], False
    sa = os.environ.get(KF_PIPELINES_SA_TOKEN_ENV) or KF_PIPELINES_SA_TOKEN_PATH
    if os.path.exists(sa):
        with open(sa) as f:
            return f.read().strip(), True
    return None, False


def _preflight(host: str, namespace: str, token: str | None, cookie: str) -> None:
    """One request to the API's health endpoint with our credentials, so that a refusal or a
    multi-user deployment without --namespace is said at once (KFP's client retries for 25 s)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(host.rstrip("/") + "/apis/v2beta1/healthz")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if cookie:
        req.add_header("Cookie", cookie)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            health = json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raise click.ClickException(_api_error(host, e, e.read()[:300].decode(errors="replace"))) from None
    except (OSError, ValueError) as e:
        raise click.ClickException(_api_error(host, e)) from None
    if health.get("multi_user") and not namespace:
        raise click.ClickException(f"the KFP API at {host} is multi-user: pass --namespace (your Kubeflow profile's "
                                   f"namespace) or set KFP_NAMESPACE")


def _client(host: str, namespace: str = "", token_file: str | None = None, cookie: str = ""):
    """A KFP client, authenticated the ways KFP's own client supports: a bearer token (from
    ``--token-file`` or ``KFP_TOKEN``), the in-cluster service-account token
    (``KF_PIPELINES_SA_TOKEN_PATH``, KFP's ServiceAccountTokenVolumeCredentials) or a session
    cookie; in ``namespace`` on a multi-user Kubeflow."""
    import kfp
    from kfp.client import ServiceAccountTokenVolumeCredentials

    token, service_account = _token(token_file)
    _preflight(host, namespace, token, cookie)
    kwargs: dict = {"host": host}
    if namespace:
        kwargs["namespace"] = namespace
    if service_account:
        kwargs["credentials"] = ServiceAccountTokenVolumeCredentials()  # re-read on refresh: tokens rotate
    elif token:
        kwargs["existing_token"] = token
    if cookie:
        kwargs["cookies"] = cookie
    try:
        return kfp.Client(**kwargs)
    except Exception as e:  # urllib3/ApiException: say which host and what to check
        raise click.ClickException(_api_error(host, e)) from None


def _api_error(host: str, e: Exception, body: str | None = None) -> str:
    status = getattr(e, "status", None) or getattr(e, "code", None)
    body = body if body is not None else str(getattr(e, "body", "") or "")[:300]
    if status in (401, 403):
        return (f"the KFP API at {host} refused the request ({status} {getattr(e, 'reason', '')}: {body}); "
                f"authenticate with --token-file, KFP_TOKEN, the in-cluster service-account token "
                f"(KF_PIPELINES_SA_TOKEN_PATH) or --cookie, and check --namespace")
    if status == 400 and "namespace" in body.lower():
        return f"the KFP API at {host} wants a namespace ({body}): pass --namespace (your Kubeflow profile)"
    if status:
        return f"the KFP API at {host} answered {status} {getattr(e, 'reason', '')}: {body}"
    return (f"cannot reach the KFP API at {host} ({type(e).__name__}: {str(e)[:200]}); check --host (the pipelines "
            f"endpoint, e.g. https://HOST/pipeline)")


@contextlib.contextmanager
def _api(host: str):
    try:
        yield
    except click.ClickException:
        raise
    except Exception as e:
        raise click.ClickException(_api_error(host, e)) from None


def _experiment_id(client, name: str, namespace: str = "") -> str:
    return client.create_experiment(name=name, namespace=namespace or None).experiment_id  # gets it when it exists


@pipeline.command("submit")
@click.option("--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline.")
@click.option("--experiment", default="panoptic-fpn", show_default=True)
@click.option("--run-name", default=None)
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="Pipeline parameter: data_uri=..., force=true, or a stage setting: train.iterations=1000 "
                   "(stages: subset, preprocess, train, evaluate, register). Repeatable.")
@click.option("--package", default=None, help="A compiled pipeline.yaml (default: compile now).")
@_auth_options
@_service_account_option
@_cluster_options
def submit(host, experiment, run_name, params, package, namespace, token_file, cookie, service_account, **cluster):
    """Create a run of the pipeline on a KFP host and print its URL."""
    arguments = pipeline_arguments(params)
    package = package or compile_pipeline(os.path.abspath("pipeline.yaml"), _cluster(**cluster,
                                                                                     service_account=service_account))
    client = _client(host, namespace, token_file, cookie)
    with _api(host):
        run = client.create_run_from_pipeline_package(
            package, arguments=arguments, run_name=run_name or f"{PIPELINE_NAME}-{time.strftime('%Y%m%d-%H%M%S')}",
            experiment_id=_experiment_id(client, experiment, namespace), namespace=namespace or None,
            service_account=service_account or None)
    click.echo(f"run {run.run_id}: {host.rstrip('/')}/#/runs/details/{run.run_id}")


@pipeline.command("schedule")
@click.option("--host", required=True, help="KFP API endpoint.")
@click.option("--cron", required=True, help='Cron expression, e.g. "0 3 * * 0" (Sundays 03:00).')
@click.option("--experiment", default="panoptic-fpn", show_default=True)
@click.option("--name", default=f"{PIPELINE_NAME}-retrain", show_default=True)
@click.option("--max-concurrency", default=1, show_default=True)
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="Pipeline parameter or stage setting, as for submit. Repeatable.")
@click.option("--package", default=None, help="A compiled pipeline.yaml (default: compile now).")
@_auth_options
@_service_account_option
@_cluster_options
def schedule(host, cron, experiment, name, max_concurrency, params, package, namespace, token_file, cookie,
             service_account, **cluster):
    """Create a recurring run: scheduled retraining. A run whose data, config and code equal the
    champion's ends early with "nothing new" (pass --param force=true to retrain anyway)."""
    cron = cron6(cron)
    arguments = pipeline_arguments(params)
    package = package or compile_pipeline(os.path.abspath("pipeline.yaml"), _cluster(**cluster,
                                                                                     service_account=service_account))
    client = _client(host, namespace, token_file, cookie)
    with _api(host):
        job = client.create_recurring_run(experiment_id=_experiment_id(client, experiment, namespace), job_name=name,
                                          cron_expression=cron, max_concurrency=max_concurrency, params=arguments,
                                          pipeline_package_path=package, no_catchup=True,
                                          service_account=service_account or None)
    click.echo(f"recurring run {job.recurring_run_id} '{name}' on cron '{cron}' in experiment {experiment}"
               + (f" (namespace {namespace})" if namespace else ""))


def _stage_overrides(items: tuple[str, ...]) -> dict:
    out: dict = {}
    for kv in items:
        key, sep, value = kv.partition("=")
        stage, _, sub = key.partition(".")
        if not sep or not sub:
            raise click.BadParameter(f"{kv!r}: use STAGE.KEY=VALUE, e.g. train.iterations=50")
        out.setdefault(stage, {})[sub] = _value(value)
    return out


@pipeline.command("run-local")
@click.option("--data", default=None, help="COCO panoptic root (default: a synthetic set in data/synth).")
@click.option("--config", default=None, help=f"Model config (default {LOCAL_SETTINGS['train']['config']}).")
@click.option("--iterations", type=int, default=None,
              help=f"Training iterations (default {LOCAL_SETTINGS['train']['iterations']}).")
@click.option("--init", default=None, help="Initial weights: config, scratch, imagenet, champion or a URI.")
@click.option("--subset-size", default=None, help="Train subset: count, fraction or 'all'.")
@click.option("--val-size", default=None, help="Val subset: count, fraction or 'all'.")
@click.option("--seed", type=int, default=None, help="Train subset seed (the val subset keeps its own).")
@click.option("--gate-margin", type=float, default=None, help="PQ a new version must gain over the champion.")
@click.option("--gate-tolerance", type=float, default=None, help="Largest per-category PQ drop allowed.")
@click.option("--set", "sets", multiple=True, metavar="STAGE.KEY=VALUE", help="Any stage setting (repeatable).")
@click.option("--sweep", "sweep_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A hyper-parameter search (YAML: trials, space, algorithm ...; see pipeline/sweeps/tiny.yaml).")
@click.option("--force", is_flag=True, help="Retrain even when the data, config and code are the champion's.")
@click.option("--runner", type=click.Choice(RUNNERS), default="subprocess", show_default=True,
              help="subprocess: every task in this venv; docker: every task in our images (make images), as on "
                   "a cluster, with the MLflow store in ROOT unless MLFLOW_TRACKING_URI says otherwise.")
@click.option("--root", default=None, help="kfp.local pipeline root (artifacts) [default: runs/local, runs/docker].")
@click.option("--verbose", is_flag=True, help="Show every task's full log (else it goes to ROOT/pipeline.log).")
def run_local_cmd(data, config, iterations, init, subset_size, val_size, seed, gate_margin, gate_tolerance, sets,
                  sweep_file, force, runner, root, verbose):
    """Run the same DAG on this machine (kfp.local, CPU, MLflow sqlite by default)."""
    over = _stage_overrides(sets)
    if sweep_file:
        import yaml

        from components.common.settings import parse_settings
        from components.train.sweep import SweepSettings

        with open(sweep_file) as f:
            doc = yaml.safe_load(f) or {}
        try:
            parse_settings(SweepSettings, doc, sweep_file)
        except (TypeError, ValueError) as e:
            raise click.BadParameter(str(e), param_hint="--sweep")
        over.setdefault("train", {})["sweep"] = doc
    for stage, key, value in (("train", "config", config), ("train", "iterations", iterations), ("train", "init", init),
                              ("subset", "size", subset_size), ("subset", "val_size", val_size),
                              ("subset", "seed", seed), ("register", "margin", gate_margin),
                              ("register", "tolerance", gate_tolerance)):
        if value is not None:
            over.setdefault(stage, {})[key] = value
    try:
        s = run_local(data, runner=runner, root=root or f"runs/{'docker' if runner == 'docker' else 'local'}",
                      force=force, settings=over, verbose=verbose)
    except TaskFailed as e:
        raise click.ClickException(str(e)) from None
    m, t = s["metrics"], s["tags"]
    click.echo("")
    click.echo(f"pipeline run finished in {s['seconds'] / 60:.1f} min (MLflow run {s['run_id']}, {s['mlflow_uri']})")
    if s["skipped"]:
        click.echo(t.get("decision.reason", "nothing new"))
        click.echo("retrain anyway: add --force")
        return
    click.echo(f"{'':8s}{'PQ':>8s}{'SQ':>8s}{'RQ':>8s}")
    for name, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        click.echo(f"{name:8s}" + "".join(f"{100 * m.get(k + suffix, float('nan')):8.2f}" for k in ("PQ", "SQ", "RQ")))
    click.echo(f"model: {t.get('model.name')} version {t.get('model.version')}, aliases: {t.get('model.aliases')} "
               f"(gate {'passed' if t.get('gate.promote') == 'True' else 'failed: the champion stays'})")
    if t.get("gate.reason"):
        click.echo(f"gate: {t['gate.reason']}")
    click.echo(f"report: {s['report']}")
    if s["log"]:
        click.echo(f"full log: {s['log']}")
    default_store = s["mlflow_uri"] == f"sqlite:///{os.path.abspath('mlflow.db')}"
    env = "" if default_store else f"MLFLOW_TRACKING_URI={s['mlflow_uri']} "
    click.echo(f"compare runs: {env}.venv/bin/panoptic runs compare")
