"""`panoptic subset`: a thin CLI over ``select_subset``."""

from __future__ import annotations

import click

from components.common import storage
from components.select_subset.core import STRATEGIES, SplitSettings, select_subset

TOP = 10  # categories listed on the console; the CSV and the chart hold them all


def _size(value: str | None) -> float | None:
    if value is None or value == "all":
        return None
    try:
        v = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: give a count (20000), a fraction (0.2) or 'all'")
    return v


def _list(value: str) -> tuple:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


@click.command("subset")
@click.option("--source", required=True,
              help="COCO panoptic root (local or s3://), with annotations/panoptic_SPLIT.json.")
@click.option("--split", default="train2017", show_default=True)
@click.option("--out", required=True, help="Folder (or s3:// prefix) for manifest.json and the histogram.")
@click.option("--size", default="all", show_default=True, help="Count (20000), fraction (0.2) or 'all'.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="random", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--min-per-category", default=50, show_default=True, help="balanced: images per category first.")
@click.option("--include-categories", default="", help="Comma list of ids or names: keep images with any of them.")
@click.option("--exclude-categories", default="", help="Comma list of ids or names: drop images with any of them.")
@click.option("--min-segments", default=0, show_default=True)
@click.option("--max-segments", type=int, default=None)
@click.option("--crowded-only", is_flag=True, help="Only images with at least one iscrowd=1 segment.")
def subset(source, split, out, size, strategy, seed, min_per_category, include_categories, exclude_categories,
           min_segments, max_segments, crowded_only):
    """Choose a reproducible subset of a split and write OUT/manifest.json.

    Same inputs and seed give an identical manifest. Also writes the category histogram of
    the subset vs the full split (category_histogram.csv / .png).
    """
    try:
        cfg = SplitSettings(size=_size(size), strategy=strategy, seed=seed, min_per_category=min_per_category,
                           include_categories=_list(include_categories), exclude_categories=_list(exclude_categories),
                           min_segments=min_segments, max_segments=max_segments, crowded_only=crowded_only)
        result = select_subset(cfg, source, split, out)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e))
    m = result.manifest
    click.echo(f"selected {m['num_images']} of {m['num_eligible']} eligible images "
               f"({m['source']['num_images']} in {split}); strategy={strategy} seed={seed}")
    hist = m["category_histogram"]
    present = [c for c in hist["subset"] if hist["subset"][c]]
    click.echo(f"categories: {len(present)} of {len(hist['full'])} present in the subset; the most frequent:")
    names = result.category_names
    click.echo(f"  {'category':24s} {'id':>5s} {'images (full)':>14s} {'images (subset)':>16s}")
    for cid in sorted(hist["subset"], key=lambda c: (-hist["subset"][c], int(c)))[:TOP]:
        click.echo(f"  {names.get(cid, cid)[:24]:24s} {cid:>5s} {hist['full'][cid]:>14d} {hist['subset'][cid]:>16d}")
    absent = [c for c in hist["full"] if hist["full"][c] and not hist["subset"][c]]
    if absent:
        click.echo(f"  absent from the subset though in the split: {len(absent)} categories")
    click.echo(f"every category: {storage.join(out, 'category_histogram.csv')} (chart: category_histogram.png)")
    for note, val in m["notes"].items():
        click.echo(f"note: {note}: {val}")
    click.echo(f"manifest: {result.manifest_uri} (hash {m['manifest_hash'][:12]})")
