"""One trial of a Katib sweep (the trial template's command): train with the trial's
assignment, evaluate on the validation shards, print the metrics as ``NAME=VALUE`` lines for
Katib's stdout collector. ``python -m pipeline.sweep_trial --help``."""

from __future__ import annotations

import json

import click
import yaml


@click.command()
@click.option("--train-shards", required=True)
@click.option("--val-shards", required=True)
@click.option("--output", required=True, help="The trial's folder (model.pt, evaluation/).")
@click.option("--settings", required=True, help="The train settings (JSON) the assignment applies to.")
@click.option("--assign", "assignments", multiple=True, metavar="NAME=VALUE", help="The trial's values (repeatable).")
@click.option("--objective", default="PQ", show_default=True)
@click.option("--report-period", default=0, show_default=True,
              help="Also print the objective every this many iterations, scored on the validation shards while "
                   "it trains (Katib's median stopping reads them); 0: only the final one.")
def main(train_shards, val_shards, output, settings, assignments, objective, report_period):
    from components.common.logs import setup_logging
    from components.common.metrics import METRIC_KEYS
    from components.common.settings import parse_settings
    from components.train.settings import TrainSettings
    from components.train.sweep import run_trial
    from pipeline.steps import evaluate_trial

    setup_logging()
    train = parse_settings(TrainSettings, json.loads(settings), "--settings")
    assignment = {}
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: use NAME=VALUE", param_hint="--assign")
        assignment[name] = yaml.safe_load(value)   # Katib passes every value as text
    def report(metrics, step):   # an intermediate score, as Katib's stdout collector reads a metric
        click.echo(f"{objective}={metrics[objective]:.6f}")

    _, metrics = run_trial(train, assignment, train_shards, val_shards, output, evaluate_trial,
                           report_period=report_period, report_fn=report)
    from components.common import storage
    from components.train.sweep import TRIAL_RECORD

    # what the train step reads when Katib's optimal trial is one that was stopped early
    storage.write_text(storage.join(output, TRIAL_RECORD), json.dumps(
        {"assignment": assignment, "metrics": {k: metrics[k] for k in METRIC_KEYS}}))
    for k in (objective, *[m for m in METRIC_KEYS if m != objective]):   # the objective's last line: the final
        click.echo(f"{k}={metrics[k]:.6f}")


if __name__ == "__main__":
    main()
