"""`panoptic runs`: pipeline runs and registered versions side by side. ``compare`` is the
register stage's table; ``diff`` puts two stages together (it may evaluate both versions again
before the register stage's report compares them), so it lives here, where stages meet."""

from __future__ import annotations

import os
import tempfile

import click

from components.common import storage
from components.common.tracking import tracking_uri
from components.register import gate_report as gr
from components.register.cli import DEFAULTS, compare
from components.register.core import registered_evaluation


def diff_versions(name: str, a: str, b: str, *, shards: str | None = None, out: str | None = None,
                  rescore: bool = False, uri: str | None = None) -> dict:
    """``gate.html`` for any two registered versions (``a`` the reference): from the evaluations
    they were registered with when those scored the same samples (and ``shards`` holds them),
    else both evaluated afresh on ``shards``. Returns what the report shows, with ``uri``."""
    from mlflow.tracking import MlflowClient

    from components.evaluate.core import EvaluateSettings, evaluate

    client = MlflowClient(tracking_uri(uri))
    versions = []
    for v in (a, b):
        try:
            mv = client.get_model_version(name, v) if v.isdigit() else client.get_model_version_by_alias(name, v)
        except Exception as e:
            raise FileNotFoundError(f"{name} version {v!r} not found in the registry at {tracking_uri(uri)} "
                                    f"({type(e).__name__}); `panoptic runs compare` lists the versions") from None
        versions.append(mv)
    with tempfile.TemporaryDirectory() as tmp:
        logged = [registered_evaluation(client, name, mv, os.path.join(tmp, f"v{mv.version}"), f"v{mv.version}",
                                        tracking_uri(uri)) for mv in versions]
        same = (None not in logged and logged[0].metrics.get("val_samples_digest")
                == logged[1].metrics.get("val_samples_digest"))
        if not shards:   # those the evaluations were made on
            shards = next((ev.metrics.get("shards") for ev in reversed(logged) if ev is not None), None)
        if not shards:
            raise FileNotFoundError(f"no validation shards to compare {name} v{a} and v{b} on: pass --shards VAL")
        if same and not rescore and storage.exists(storage.join(shards, "index.json")):
            sides, how = logged, "their registered evaluations"
        else:
            sides, how = [], f"both re-scored on {shards}"
            for mv in versions:
                folder = os.path.join(tmp, f"rescored-v{mv.version}")
                evaluate(f"models:/{name}/{mv.version}", shards, folder, EvaluateSettings(report_samples=0),
                         progress=False)
                sides.append(gr.Evaluation.read(folder, f"v{mv.version}"))
        out = out or f"gate-v{versions[0].version}-v{versions[1].version}.html"
        built = gr.build(sides[0], sides[1], shards, out, verdict=f"{name} v{versions[1].version} against "
                         f"v{versions[0].version} ({how})", facts={"registered model": name})
    return {**built, "a": str(versions[0].version), "b": str(versions[1].version), "how": how,
            "images_scored": sides[1].metrics.get("images")}


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
    """Two registered versions side by side, as the gate's gate.html: PQ/SQ/RQ with deltas,
    per-category PQ change and the validation images where they disagree most (VERSION_A is
    the reference, e.g. the champion; a version is a number or an alias)."""
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
