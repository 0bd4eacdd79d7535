"""`panoptic register`, `panoptic runs compare` and `panoptic runs diff`."""

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
    click.echo(f"gate: {'PASS' if r.decision.promote else 'FAIL'}: {r.decision.reason}")


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


@click.command("diff")
@click.argument("version_a")
@click.argument("version_b")
@click.option("--name", default=DEFAULTS.name, show_default=True, help="Registered model name.")
@click.option("--shards", default=None,
              help="Validation shards to compare on (default: those the versions were evaluated on). Both versions "
                   "are re-scored here when their evaluations were on different samples.")
@click.option("--out", default=None, metavar="FILE.html", help="Where to write the report [gate-vA-vB.html].")
@click.option("--rescore", is_flag=True, help="Evaluate both versions on --shards even when their evaluations match.")
def diff(version_a, version_b, name, shards, out, rescore):
    """VERSION_A (the reference, e.g. the champion) against VERSION_B: the PQ/SQ/RQ table with
    deltas, per-category PQ changes, and the validation images where the two disagree most, as a
    self-contained HTML page (the gate's gate.html, for any two registered versions). A version
    is a number or an alias (champion, challenger)."""
    from components.register.core import diff_versions

    try:
        r = diff_versions(name, version_a, version_b, shards=shards, out=out, rescore=rescore)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    s = r["summary"]
    click.echo(f"{'':8s}{'v' + r['a']:>10s}{'v' + r['b']:>10s}{'change':>10s}")
    for label, k in (("PQ", "PQ"), ("SQ", "SQ"), ("RQ", "RQ")):
        click.echo(f"{label:8s}{100 * s[k][0]:10.2f}{100 * s[k][1]:10.2f}{100 * (s[k][1] - s[k][0]):+10.2f}")
    cats = r["categories"]
    if cats:
        best, worst = cats[0], cats[-1]
        click.echo(f"categories: {sum(c['delta'] > 0 for c in cats)} better, {sum(c['delta'] < 0 for c in cats)} "
                   f"worse of {len(cats)}; most gained {best['name']} ({100 * best['delta']:+.2f}), most lost "
                   f"{worst['name']} ({100 * worst['delta']:+.2f})")
    click.echo(f"compared on {r['images_scored']} validation images ({r['how']}); report: {r['uri']}")


@click.group("runs")
def runs():
    """Compare pipeline runs and registered versions tracked in MLflow."""


runs.add_command(compare)
runs.add_command(diff)
