"""`panoptic register` and `panoptic runs compare`."""

from __future__ import annotations

import click

from components.register.core import MODEL_NAME


@click.command("register")
@click.option("--model", "model_uri", required=True, help="model.pt from `panoptic train`.")
@click.option("--eval-dir", required=True, help="Output folder of `panoptic evaluate` (with metrics.json).")
@click.option("--name", default=MODEL_NAME, show_default=True, help="Registered model name.")
@click.option("--margin", default=0.0, show_default=True, help="PQ (0-1) a new version must gain over the champion.")
@click.option("--tolerance", default=0.05, show_default=True, help="Largest per-category PQ drop allowed (0-1).")
@click.option("--run-id", default=None, help="MLflow run of the pipeline run to nest under.")
@click.option("--no-promote", is_flag=True, help="Decide the gate but do not move the champion alias.")
def register_cmd(model_uri, eval_dir, name, margin, tolerance, run_id, no_promote):
    """Register a model version in MLflow (alias `challenger`); make it `champion` if the
    promotion gate passes. Tracking URI: MLFLOW_TRACKING_URI, default sqlite:///mlflow.db."""
    from components.register.core import register

    r = register(model_uri, eval_dir, name=name, margin=margin, tolerance=tolerance, parent_run_id=run_id,
                 promote=not no_promote)
    click.echo(f"{r.name} version {r.version}: aliases {', '.join(r.aliases)}")
    click.echo(f"gate: {'PASS' if r.decision.promote else 'FAIL'}: {r.decision.reason}")


register_cmd.name = "register"


@click.command("compare")
@click.option("--experiment", default=None, help="MLflow experiment (default panoptic-fpn).")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV instead of a table.")
@click.option("--max-runs", default=50, show_default=True)
def compare(experiment, as_csv, max_runs):
    """Pipeline runs side by side: the params that differ, PQ/SQ/RQ, duration; best PQ first."""
    from components.register.compare import compare_runs

    click.echo(compare_runs(experiment, as_csv=as_csv, max_runs=max_runs))


@click.group("runs")
def runs():
    """Compare pipeline runs tracked in MLflow."""


runs.add_command(compare)
