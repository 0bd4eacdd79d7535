"""`panoptic data synth` and `panoptic data validate`."""

from __future__ import annotations

import json
import os
import sys
import time

import click

from components.common.validation import validate_split
from components.synthetic.generator import SynthSettings, generate


@click.command("synth")
@click.option("--out", required=True, help="Output folder or s3://bucket/prefix (COCO panoptic layout).")
@click.option("--train", "n_train", default=200, show_default=True, help="Number of train2017 images.")
@click.option("--val", "n_val", default=50, show_default=True, help="Number of val2017 images.")
@click.option("--seed", default=0, show_default=True, help="Same seed -> byte-identical files.")
@click.option("--min-side", default=192, show_default=True, help="Smallest image side in pixels.")
@click.option("--max-side", default=512, show_default=True, help="Largest image side in pixels.")
@click.option("--workers", default=min(4, os.cpu_count() or 1), show_default=True,
              help="Processes rendering scenes (the files are the same whatever the number).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def synth(out, n_train, n_val, seed, min_side, max_side, workers, quiet):
    """Write a synthetic dataset in the exact COCO panoptic layout.

    OUT/train2017/*.jpg, OUT/val2017/*.jpg, OUT/annotations/panoptic_{train,val}2017.json
    and OUT/annotations/panoptic_{train,val}2017/*.png.
    """
    try:
        cfg = SynthSettings(train=n_train, val=n_val, seed=seed, min_side=min_side, max_side=max_side)
    except ValueError as e:
        raise click.BadParameter(str(e))
    t0 = time.perf_counter()
    counts = generate(out, cfg, progress=not quiet, workers=workers)
    click.echo(f"wrote {counts} to {out} in {time.perf_counter() - t0:.1f}s")


@click.command("validate")
@click.argument("root")
@click.option("--split", default="train2017", show_default=True, help="Split name (train2017, val2017, ...).")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@click.option("--workers", default=4, show_default=True, help="Reader threads.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def validate(root, split, as_json, workers, quiet):
    """Check every invariant of a COCO panoptic split at ROOT (local or s3://).

    Exit code 0 when all is well, 1 when any problem was found (each one named with its file).
    """
    try:
        report = validate_split(root, split, workers=workers, progress=not quiet)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e))
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else report.render())
    sys.exit(0 if report.ok else 1)


@click.command("augment-preview")
@click.option("--shards", required=True, help="A training shard folder (panoptic preprocess's output).")
@click.option("--config", default="tiny", show_default=True, help="Built-in config name or YAML: its `input` section.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Config override, e.g. input.copy_paste_prob=1.0 or input.lsj_size=512 (repeatable).")
@click.option("--samples", default=6, show_default=True, help="Samples to draw.")
@click.option("--seed", default=0, show_default=True, help="The training seed (same seed: the same samples).")
@click.option("--out", default="augment_preview.png", show_default=True, help="PNG to write (local or s3://).")
def augment_preview_cmd(shards, config, sets, samples, seed, out):
    """Draw training samples as the trainer will see them: each image beside its targets
    (stuff by category colour, instances by shade with their boxes, crowds white, VOID dark)."""
    from components.common import storage
    from components.data.preview import augment_preview
    from components.model.config import ConfigError, load_config, parse_overrides

    try:
        cfg = load_config(config, parse_overrides(list(sets)))
    except ConfigError as e:
        raise click.BadParameter(str(e), param_hint="--config/--set")
    storage.write_bytes(out, augment_preview(shards, cfg.input, samples, seed))
    click.echo(f"wrote {out}: {samples} samples of {shards} (input: lsj_size {cfg.input.lsj_size}, "
               f"copy_paste_prob {cfg.input.copy_paste_prob}, flip_prob {cfg.input.flip_prob})")


@click.group("data")
def data():
    """Datasets: make a synthetic one, validate a COCO panoptic split, preview augmentation."""


data.add_command(synth)
data.add_command(validate)
data.add_command(augment_preview_cmd)
