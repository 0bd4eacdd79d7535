"""`panoptic preprocess`: a thin CLI over ``preprocess``."""

from __future__ import annotations

import click

from components.preprocess.core import DataQualityError, PreprocessSettings, preprocess

DEFAULTS = PreprocessSettings()


@click.command("preprocess")
@click.option("--manifest", required=True, help="manifest.json (or its folder) from `panoptic subset`.")
@click.option("--out", required=True, help="Shard folder or s3:// prefix.")
@click.option("--source", default=None, help="Dataset root, if not the one recorded in the manifest.")
@click.option("--shard-images", default=DEFAULTS.shard_images, show_default=True, help="Images per shard.")
@click.option("--max-side", type=int, default=None, help="Resize images whose longer side exceeds this.")
@click.option("--max-bad-fraction", default=DEFAULTS.max_bad_fraction, show_default=True,
              help="Fail when more samples are quarantined.")
@click.option("--workers", type=int, default=None, show_default="one per usable CPU",
              help="Shard writers at once: this process + N-1 spawned ones (0 or 1: this process alone).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def preprocess_cmd(manifest, out, source, shard_images, max_side, max_bad_fraction, workers, quiet):
    """Write the manifest's samples as Parquet shards + index.json + quarantine.jsonl.

    Atomic and idempotent: a re-run skips shards already complete and rewrites the rest.
    Every sample is checked; bad ones go to quarantine.jsonl with their reasons.
    """
    try:
        cfg = PreprocessSettings(shard_images=shard_images, max_side=max_side, max_bad_fraction=max_bad_fraction,
                               workers=workers)
        r = preprocess(cfg, manifest, out, source=source, progress=not quiet)
    except (ValueError, FileNotFoundError, DataQualityError) as e:
        raise click.ClickException(str(e))
    click.echo(f"images in {r.images_in} = rows written {r.rows_written} + quarantined {r.quarantined}; "
               f"{len(r.shards)} shards ({r.skipped_shards} already complete); index: {r.index_uri}")


preprocess_cmd.name = "preprocess"
