"""`panoptic pq` (and `panoptic evaluate`)."""

from __future__ import annotations

import json
import time

import click

from components.common import storage
from components.evaluate.pq import PredictionError, format_table, pq_compute


@click.command("pq")
@click.option("--gt-json", required=True, help="Ground-truth panoptic JSON (local or s3://).")
@click.option("--gt-dir", default=None, help="Ground-truth PNG folder (default: the JSON path without .json).")
@click.option("--pred-json", required=True, help="Predicted panoptic JSON.")
@click.option("--pred-dir", default=None, help="Predicted PNG folder (default: the JSON path without .json).")
@click.option("--workers", default=1, show_default=True, help="Processes scoring images in parallel.")
@click.option("--json", "as_json", is_flag=True, help="Print panopticapi's result shape as JSON.")
@click.option("--per-class", is_flag=True, help="Also print the per-category table.")
def pq(gt_json, gt_dir, pred_json, pred_dir, workers, as_json, per_class):
    """PQ, SQ and RQ (All / Things / Stuff, per category) of a prediction set.

    The numbers are exactly those of panopticapi's pq_compute on the same inputs.
    """
    t0 = time.perf_counter()
    try:
        results = pq_compute(gt_json, pred_json, gt_dir, pred_dir, workers=workers, progress=not as_json)
    except (PredictionError, FileNotFoundError) as e:
        raise click.ClickException(str(e))
    if as_json:
        click.echo(json.dumps(results, indent=1))
        return
    cats = {c["id"]: c for c in json.loads(storage.read_text(gt_json))["categories"]} if per_class else None
    click.echo(format_table(results, cats))
    click.echo(f"({time.perf_counter() - t0:.1f}s)")
