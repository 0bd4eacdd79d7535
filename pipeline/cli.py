"""`panoptic pipeline compile | run-local | submit | schedule`."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import sys
import threading
import time

import click

from pipeline.dag import PIPELINE_NAME, ClusterSettings

LOCAL_DEFAULTS = {"config": "tiny", "iterations": 300, "subset_size": "all", "val_size": "all", "shard_images": 100}


def compile_pipeline(out: str, cluster: ClusterSettings | None = None) -> str:
    from kfp import compiler

    from pipeline.dag import build_pipeline

    compiler.Compiler().compile(build_pipeline(cluster or ClusterSettings()), out)
    return out


def _cluster_options(f):
    f = click.option("--accelerator", default="nvidia.com/gpu", show_default=True, help="GPU resource; '' = CPU.")(f)
    f = click.option("--gpus", default=1, show_default=True, help="GPUs for the train and evaluate tasks.")(f)
    f = click.option("--node-selector", multiple=True, metavar="KEY=VALUE", help="Node labels for GPU tasks.")(f)
    f = click.option("--data-pvc", default="", help="PVC mounted at /data in every task.")(f)
    f = click.option("--s3-secret", default="panoptic-s3", show_default=True, help="Secret with AWS keys.")(f)
    f = click.option("--s3-endpoint", default="", help="AWS_ENDPOINT_URL for MinIO.")(f)
    return f


def _cluster(accelerator, gpus, node_selector, data_pvc, s3_secret, s3_endpoint) -> ClusterSettings:
    return ClusterSettings(accelerator=accelerator, gpus=gpus, data_pvc=data_pvc, s3_secret=s3_secret,
                           s3_endpoint=s3_endpoint, node_selector=dict(kv.split("=", 1) for kv in node_selector))


def _arguments(params: tuple[str, ...]) -> dict:
    out = {}
    for kv in params:
        if "=" not in kv:
            raise click.BadParameter(f"{kv!r}: use NAME=VALUE")
        k, v = kv.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


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


def _client(host: str):
    import kfp

    try:
        return kfp.Client(host=host, existing_token=os.environ.get("KFP_TOKEN") or None)
    except Exception as e:  # urllib3/ApiException: say which host and what to check
        raise click.ClickException(f"cannot reach the KFP API at {host} ({type(e).__name__}); check --host "
                                   f"(the pipelines endpoint, e.g. https://HOST/pipeline) and KFP_TOKEN") from None


def _experiment_id(client, name: str) -> str:
    try:
        return client.get_experiment(experiment_name=name).experiment_id
    except Exception:
        return client.create_experiment(name=name).experiment_id


@pipeline.command("submit")
@click.option("--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline.")
@click.option("--experiment", default="panoptic-fpn", show_default=True)
@click.option("--run-name", default=None)
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="Pipeline parameter (repeatable).")
@click.option("--package", default=None, help="A compiled pipeline.yaml (default: compile now).")
@_cluster_options
def submit(host, experiment, run_name, params, package, **cluster):
    """Create a run of the pipeline on a KFP host and print its URL."""
    package = package or compile_pipeline(os.path.abspath("pipeline.yaml"), _cluster(**cluster))
    client = _client(host)
    run = client.create_run_from_pipeline_package(
        package, arguments=_arguments(params), run_name=run_name or f"{PIPELINE_NAME}-{time.strftime('%Y%m%d-%H%M%S')}",
        experiment_name=experiment)
    click.echo(f"run {run.run_id}: {host.rstrip('/')}/#/runs/details/{run.run_id}")


@pipeline.command("schedule")
@click.option("--host", required=True, help="KFP API endpoint.")
@click.option("--cron", required=True, help='Cron expression, e.g. "0 3 * * 0" (Sundays 03:00).')
@click.option("--experiment", default="panoptic-fpn", show_default=True)
@click.option("--name", default=f"{PIPELINE_NAME}-retrain", show_default=True)
@click.option("--max-concurrency", default=1, show_default=True)
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="Pipeline parameter (repeatable).")
@click.option("--package", default=None, help="A compiled pipeline.yaml (default: compile now).")
@_cluster_options
def schedule(host, cron, experiment, name, max_concurrency, params, package, **cluster):
    """Create a recurring run: scheduled retraining on fresh data."""
    cron = cron6(cron)
    package = package or compile_pipeline(os.path.abspath("pipeline.yaml"), _cluster(**cluster))
    client = _client(host)
    job = client.create_recurring_run(experiment_id=_experiment_id(client, experiment), job_name=name,
                                      cron_expression=cron6(cron), max_concurrency=max_concurrency,
                                      params=_arguments(params), pipeline_package_path=package, no_catchup=True)
    click.echo(f"recurring run {job.recurring_run_id} '{name}' on cron '{cron6(cron)}' in experiment {experiment}")


@contextlib.contextmanager
def _task_log(path: str, verbose: bool):
    """Send this process's stdout/stderr (kfp.local streams every task's full log there) to
    ``path``, echoing only the lines that say which task runs and how it ended."""
    if verbose:
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log = open(path, "ab")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    done = threading.Event()
    keep = re.compile(r"Executing task|finished with status|Pipeline .* finished|Error|Traceback")

    def echo():
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            while True:
                line = f.readline()
                if line:
                    text = re.sub(r"\x1b\[[0-9;]*m", "", line.decode(errors="replace"))
                    if keep.search(text):
                        os.write(saved[0], text.encode())
                elif done.is_set():
                    return
                else:
                    time.sleep(0.2)

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        done.set()
        t.join(timeout=5)
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        log.close()


def run_local(data: str | None = None, *, root: str = "runs/local", mlflow_uri: str | None = None,
              seed: int = 0, gate_margin: float = 0.0, gate_tolerance: float = 0.05, synth_train: int = 200,
              synth_val: int = 50, verbose: bool = False, **params) -> dict:
    """Run the whole DAG with kfp.local's SubprocessRunner on this machine. Returns a summary."""
    from kfp import local

    from components.common.tracking import DEFAULT_EXPERIMENT, PIPELINE_TAG, setup
    from pipeline.dag import build_pipeline

    if not data:
        data = "data/synth"
        if not os.path.exists(os.path.join(data, "annotations", "panoptic_val2017.json")):
            from components.synthetic.generator import SynthConfig, generate

            generate(data, SynthConfig(train=synth_train, val=synth_val, seed=0), progress=True)
    data = os.path.abspath(data) if "://" not in data else data
    mlflow_uri = mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath('mlflow.db')}"
    args = {**LOCAL_DEFAULTS, **{k: v for k, v in params.items() if v is not None}}
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=os.path.abspath(root),
               raise_on_error=True)
    t0 = time.perf_counter()
    log_path = os.path.join(os.path.abspath(root), "pipeline.log")
    with _task_log(log_path, verbose):
        build_pipeline(None)(data_uri=data, seed=seed, mlflow_uri=mlflow_uri, gate_margin=gate_margin,
                             gate_tolerance=gate_tolerance, **args)
    elapsed = time.perf_counter() - t0
    mlflow = setup(mlflow_uri, DEFAULT_EXPERIMENT)
    run = mlflow.search_runs(experiment_names=[DEFAULT_EXPERIMENT], filter_string=f"tags.`{PIPELINE_TAG}` = 'pipeline'",
                             order_by=["attributes.start_time DESC"], max_results=1, output_format="list")[0]
    reports = sorted(glob.glob(os.path.join(os.path.abspath(root), "**", "report.html"), recursive=True),
                     key=os.path.getmtime)
    return {"run_id": run.info.run_id, "metrics": run.data.metrics, "tags": run.data.tags,
            "report": reports[-1] if reports else None, "seconds": elapsed, "mlflow_uri": mlflow_uri,
            "log": None if verbose else log_path}


@pipeline.command("run-local")
@click.option("--data", default=None, help="COCO panoptic root (default: a synthetic set in data/synth).")
@click.option("--config", default=None, help=f"Model config (default {LOCAL_DEFAULTS['config']}).")
@click.option("--iterations", type=int, default=None, help=f"Training iterations (default {LOCAL_DEFAULTS['iterations']}).")
@click.option("--subset-size", default=None, help="Train subset: count, fraction or 'all'.")
@click.option("--val-size", default=None, help="Val subset: count, fraction or 'all'.")
@click.option("--seed", default=0, show_default=True)
@click.option("--gate-margin", default=0.0, show_default=True)
@click.option("--gate-tolerance", default=0.05, show_default=True)
@click.option("--root", default="runs/local", show_default=True, help="kfp.local pipeline root (artifacts).")
@click.option("--verbose", is_flag=True, help="Show every task's full log (else it goes to ROOT/pipeline.log).")
def run_local_cmd(data, config, iterations, subset_size, val_size, seed, gate_margin, gate_tolerance, root, verbose):
    """Run the same DAG on this machine (kfp.local, CPU, MLflow sqlite by default)."""
    s = run_local(data, root=root, seed=seed, gate_margin=gate_margin, gate_tolerance=gate_tolerance, config=config,
                  iterations=iterations, subset_size=subset_size, val_size=val_size, verbose=verbose)
    m, t = s["metrics"], s["tags"]
    click.echo("")
    click.echo(f"pipeline run finished in {s['seconds'] / 60:.1f} min (MLflow run {s['run_id']}, {s['mlflow_uri']})")
    click.echo(f"{'':8s}{'PQ':>8s}{'SQ':>8s}{'RQ':>8s}")
    for name, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        click.echo(f"{name:8s}" + "".join(f"{100 * m.get(k + suffix, float('nan')):8.2f}" for k in ("PQ", "SQ", "RQ")))
    click.echo(f"model: {t.get('model.name')} version {t.get('model.version')}, aliases: {t.get('model.aliases')} "
               f"(gate {'passed' if t.get('gate.promote') == 'True' else 'failed: the champion stays'})")
    click.echo(f"report: {s['report']}")
    if s["log"]:
        click.echo(f"full log: {s['log']}")
    click.echo("compare runs: .venv/bin/panoptic runs compare")
