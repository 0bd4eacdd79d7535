"""`panoptic register` and `panoptic runs compare` (the `runs` group: pipeline/runs.py)."""

from __future__ import annotations

import click

from components.register.core import RegisterSettings

DEFAULTS = RegisterSettings()


@click.command("register")
@click.option("--model", "model_uri", required=True, help="model.pt from `panoptic train`.")
@click.option("--eval-dir", required=True, help="Output folder of `panoptic evaluate` (with metrics.json).")
@click.option("--champion-eval-dir", default=None,
              help="`panoptic evaluate` output of the champion on the same validation shards (needed when the "
                   "champion was measured on other data).")
@click.option("--name", default=DEFAULTS.name, show_default=True, help="Registered model name.")
@click.option("--margin", default=DEFAULTS.margin, show_default=True,
              help="PQ (0-1) a new version must gain over the champion.")
@click.option("--tolerance", default=DEFAULTS.tolerance, show_default=True,
              help="Largest per-category PQ drop allowed (0-1).")
@click.option("--run-id", default=None, help="MLflow run of the pipeline run to nest under.")
@click.option("--no-promote", is_flag=True, help="Decide the gate but do not move the champion alias.")
def register_cmd(model_uri, eval_dir, champion_eval_dir, name, margin, tolerance, run_id, no_promote):
    """Register a model version in MLflow (alias `challenger`); make it `champion` if the
    promotion gate passes. Tracking URI: MLFLOW_TRACKING_URI, default sqlite:///mlflow.db."""
    from components.common import storage
    from components.common.tracking import RegistryError
    from components.register.core import IncomparableMetrics, InvalidMetrics, register

    champion = None
    if champion_eval_dir:
        champion = storage.read_json(storage.join(champion_eval_dir, "metrics.json"), "champion's evaluation")
        if isinstance(champion, dict):
            champion["source"] = "re-scored"
    try:
        cfg = RegisterSettings(name, margin, tolerance, not no_promote)
        r = register(model_uri, eval_dir, cfg, champion_eval=champion, parent_run_id=run_id)
    except (RegistryError, IncomparableMetrics, InvalidMetrics, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e))
    except Exception as e:   # the tracking server failed: say which, and that nothing moved
        from components.common.errors import one_line

        if one_line(e) is None:
            raise
        raise click.ClickException(f"{one_line(e)}; nothing was registered or promoted") from None
    click.echo(f"{r.name} version {r.version}: aliases {', '.join(r.aliases)}")
    click.echo(f"gate: {r.outcome}")


register_cmd.name = "register"


@click.command("compare")
@click.option("--experiment", default=None, help="MLflow experiment (default panoptic-fpn).")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV instead of a table.")
@click.option("--max-runs", default=50, show_default=True)
@click.option("--wide", is_flag=True, help="Every column: training data, the params that differ, durations.")
@click.option("--chart", default=None, metavar="FILE.png",
              help="Also draw PQ/SQ/RQ over time: champions, rejected challengers, sweep trials, runs with nothing "
                   "new.")
def compare(experiment, as_csv, max_runs, wide, chart):
    """Pipeline runs side by side, best PQ first: PQ/SQ/RQ, the decision, the gate and its reason,
    the version and its aliases (fits the terminal; --wide for the params that differ)."""
    from components.register.compare import compare_runs, history_chart

    click.echo(compare_runs(experiment, as_csv=as_csv, max_runs=max_runs, wide=wide))
    if chart:
        click.echo(f"chart: {history_chart(chart, experiment, max_runs=max_runs)}")
