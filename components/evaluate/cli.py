"""`panoptic pq` (and `panoptic evaluate`)."""

from __future__ import annotations

import json
import time

import click


@click.command("pq")
@click.option("--gt-json", required=True, help="Ground-truth panoptic JSON (local or s3://).")
@click.option("--gt-dir", default=None, help="Ground-truth PNG folder (default: the JSON path without .json).")
@click.option("--pred-json", required=True, help="Predicted panoptic JSON.")
@click.option("--pred-dir", default=None, help="Predicted PNG folder (default: the JSON path without .json).")
@click.option("--workers", type=int, default=None, show_default="one per core",
              help="Processes of the numpy engine (hotcoco's uses every core).")
@click.option("--engine", type=click.Choice(["auto", "hotcoco", "numpy"]), default="auto", show_default=True,
              help="auto: hotcoco's Rust engine for local files, numpy's for s3://.")
@click.option("--json", "as_json", is_flag=True, help="Print panopticapi's result shape as JSON.")
@click.option("--per-class", is_flag=True, help="Also print the per-category table.")
def pq(gt_json, gt_dir, pred_json, pred_dir, workers, engine, as_json, per_class):
    """PQ, SQ and RQ (All / Things / Stuff, per category) of a prediction set.

    The numbers are exactly those of panopticapi's pq_compute on the same inputs.
    """
    from components.evaluate.pq_files import pq_files
    from components.evaluate.prediction_files import PredictionError, read_json
    from components.evaluate.tables import format_table

    t0 = time.perf_counter()
    try:
        results = pq_files(gt_json, pred_json, gt_dir, pred_dir, workers=workers, progress=not as_json,
                           use=None if engine == "auto" else engine)
    except (PredictionError, FileNotFoundError) as e:
        raise click.ClickException(str(e))
    if as_json:
        click.echo(json.dumps(results, indent=1))
        return
    cats = {c["id"]: c for c in read_json(gt_json, "ground-truth", gt=True)["categories"]} if per_class else None
    click.echo(format_table(results, cats))
    click.echo(f"({time.perf_counter() - t0:.1f}s)")


@click.command("evaluate")
@click.option("--model", "model_uri", required=True, help="model.pt from `panoptic train` (local, s3:// or URL).")
@click.option("--shards", required=True, help="Val shard folder from `panoptic preprocess`.")
@click.option("--out", required=True, help="Folder for predictions, metrics.json, per_class.csv, report.html.")
@click.option("--batch-size", default=2, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--max-images", type=int, default=None, help="Evaluate only the first N images.")
@click.option("--report-samples", default=8, show_default=True, help="Images shown in report.html (worst first).")
@click.option("--workers", default=1, show_default=True, help="DataLoader workers.")
@click.option("--quiet", is_flag=True)
def evaluate_cmd(model_uri, shards, out, batch_size, device, max_images, report_samples, workers, quiet):
    """Run the model over val shards; write COCO panoptic predictions, metrics.json (PQ/SQ/RQ
    all/things/stuff), per_class.csv and a self-contained report.html."""
    from components.common.tracking import RegistryError
    from components.evaluate.core import EvaluateSettings, evaluate

    try:
        settings = EvaluateSettings(batch_size=batch_size, device=device, max_images=max_images,
                                    report_samples=report_samples, num_workers=workers)
        r = evaluate(model_uri, shards, out, settings, progress=not quiet)
    except (FileNotFoundError, ValueError, RegistryError) as e:
        raise click.ClickException(str(e))
    from components.evaluate.tables import format_table

    click.echo(format_table(r.metrics["results"]))
    t = r.metrics["timing"]
    click.echo(f"{r.metrics['images']} images; inference {t['images_per_s_inference']:.2f} img/s; "
               f"PQ accumulation {100 * t['pq_overhead_vs_inference']:.2f}% of inference time")
    click.echo(f"report: {r.report_uri}")


evaluate_cmd.name = "evaluate"
