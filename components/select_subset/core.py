"""Stage 1: choose a reproducible subset of a COCO panoptic split.

``select_subset(cfg, source, split, out)`` writes ``out/manifest.json`` (the chosen image ids,
strategy, parameters, seed, the source annotation file's sha256 and a hash of the manifest
itself), ``out/category_histogram.csv`` and ``out/category_histogram.png`` (images per
category in the subset vs the full split).
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from components.common import storage
from components.common.coco_panoptic import CategoryMaps, annotation_json_uri, load_split
from components.common.hashing import canonical_hash, sha256_bytes
from components.common.plots import figure_png, pyplot

MANIFEST_SCHEMA = 1
STRATEGIES = ("random", "balanced")


def _size(value, name: str) -> float | None:
    """A subset size as given (a number, its text, or "all"/"" for every image), checked finite."""
    import math

    if isinstance(value, str):
        if value.strip().lower() in ("all", ""):
            return None
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{name} {value!r}: a count, a fraction in (0, 1) or 'all'") from None
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{name} {value!r}: a count, a fraction in (0, 1) or 'all'")
    return value


@dataclass(frozen=True)
class SplitSettings:
    """What to select.

    Args:
        size: a count (``>= 1``) or a fraction of the eligible images (``0 < size < 1``);
            ``None`` (or ``"all"``, the CLI's and the DAG's word) takes every eligible image.
        strategy: ``random`` (seeded) or ``balanced`` (each category first reaches
            ``min_per_category`` images, rarest category first, then the rest is random).
        include_categories: keep only images with at least one of these (ids or names).
        exclude_categories: drop images with any of these (ids or names).
        min_segments / max_segments: bounds on segments per image (inclusive).
        crowded_only: keep only images with at least one ``iscrowd=1`` segment.
    """

    size: float | str | None = None
    strategy: str = "random"
    seed: int = 0
    min_per_category: int = 50
    include_categories: tuple = ()
    exclude_categories: tuple = ()
    min_segments: int = 0
    max_segments: int | None = None
    crowded_only: bool = False

    def __post_init__(self):
        object.__setattr__(self, "size", _size(self.size, "size"))
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.size is not None and (self.size <= 0 or (self.size >= 1 and self.size != int(self.size))):
            raise ValueError(f"size {self.size} must be a positive count or a fraction in (0, 1)")
        if self.max_segments is not None and self.max_segments < self.min_segments:
            raise ValueError("max_segments must be >= min_segments")


@dataclass(frozen=True)
class SubsetSettings(SplitSettings):
    """The subset stage's settings in the pipeline: the train subset (``SplitSettings``'s fields)
    and the validation subset, each from its split.

    The validation subset has its own seed, so changing the training seed (a new training
    sample) keeps the evaluation data, and so the gate's comparison, the same.
    """

    val_size: float | str | None = None
    val_seed: int = 0
    train_split: str = "train2017"
    val_split: str = "val2017"

    def __post_init__(self):
        object.__setattr__(self, "val_size", _size(self.val_size, "val_size"))
        super().__post_init__()
        self.val_config()  # validate it now too

    def train_config(self) -> SplitSettings:
        return SplitSettings(**{f.name: getattr(self, f.name) for f in fields(SplitSettings)})

    def val_config(self) -> SplitSettings:
        return SplitSettings(size=self.val_size, seed=self.val_seed)


@dataclass
class SubsetResult:
    manifest_uri: str
    image_ids: list[int]
    manifest: dict = field(repr=False)
    category_names: dict[str, str] = field(default_factory=dict, repr=False)   # id (as in the manifest) -> name


def _category_ids(names_or_ids, cats: CategoryMaps) -> set[int]:
    by_name = {c.name: c.id for c in cats.categories}
    out = set()
    for v in names_or_ids:
        if isinstance(v, int) or str(v).isdigit():
            cid = int(v)
            if cid not in cats.by_id:
                raise ValueError(f"category id {cid} is not in this split's categories")
        elif v in by_name:
            cid = by_name[v]
        else:
            raise ValueError(f"unknown category {v!r}; known: {', '.join(sorted(by_name))}")
        out.add(cid)
    return out


def eligible_images(annotations: dict[int, dict], cats: CategoryMaps, cfg: SplitSettings) -> list[int]:
    """Image ids (sorted) that pass the filters."""
    include = _category_ids(cfg.include_categories, cats)
    exclude = _category_ids(cfg.exclude_categories, cats)
    keep = []
    for image_id in sorted(annotations):
        segs = annotations[image_id].get("segments_info", [])
        present = {s["category_id"] for s in segs}
        if include and not present & include:
            continue
        if present & exclude:
            continue
        if len(segs) < cfg.min_segments or (cfg.max_segments is not None and len(segs) > cfg.max_segments):
            continue
        if cfg.crowded_only and not any(s.get("iscrowd") for s in segs):
            continue
        keep.append(image_id)
    return keep


def choose(eligible: list[int], annotations: dict[int, dict], cfg: SplitSettings) -> tuple[list[int], dict]:
    """Pick the subset. Returns (sorted image ids, notes such as unmet category minimums)."""
    if cfg.size is None:
        n = len(eligible)
    else:
        n = int(cfg.size) if cfg.size >= 1 else int(round(cfg.size * len(eligible)))
    if n > len(eligible):
        raise ValueError(f"asked for {n} images but only {len(eligible)} images match the filters; "
                         f"lower --size or relax the filters")
    if n == 0:
        raise ValueError("the subset would be empty; raise --size or relax the filters")
    rng = np.random.default_rng(cfg.seed)
    order = [eligible[i] for i in rng.permutation(len(eligible))]
    notes: dict = {}
    if cfg.strategy == "random":
        return sorted(order[:n]), notes

    # balanced: rarest category first, take images containing it (in the seeded order)
    # until it has min_per_category images or none are left, then fill at random.
    has = {i: {s["category_id"] for s in annotations[i].get("segments_info", [])} for i in eligible}
    freq = Counter(c for i in eligible for c in has[i])
    chosen: list[int] = []
    chosen_set: set[int] = set()
    count: Counter = Counter()
    for cat in sorted(freq, key=lambda c: (freq[c], c)):
        for image_id in order:
            if count[cat] >= cfg.min_per_category or len(chosen) >= n:
                break
            if cat in has[image_id] and image_id not in chosen_set:
                chosen.append(image_id)
                chosen_set.add(image_id)
                count.update(has[image_id])
    unmet = {c: count[c] for c in freq if count[c] < min(cfg.min_per_category, freq[c])}
    if unmet:
        notes["unmet_min_per_category"] = {str(c): v for c, v in sorted(unmet.items())}
    for image_id in order:
        if len(chosen) >= n:
            break
        if image_id not in chosen_set:
            chosen.append(image_id)
            chosen_set.add(image_id)
    return sorted(chosen), notes


def category_histogram(image_ids, annotations, cats: CategoryMaps) -> dict[int, int]:
    """Images containing each category (every category listed, zeros included)."""
    hist = {c.id: 0 for c in cats.categories}
    for i in image_ids:
        for c in {s["category_id"] for s in annotations[i].get("segments_info", [])}:
            if c in hist:
                hist[c] += 1
    return hist


def _histogram_png(full: dict[int, int], subset: dict[int, int], cats: CategoryMaps, n_full: int, n_sub: int) -> bytes:
    """The subset beside the split, a category a row (most frequent first), so that the names stay
    readable however many categories there are: 9 inches wide, a sixth of an inch a row."""
    plt = pyplot()

    ids = sorted(full, key=lambda c: (-full[c], c))
    names = [cats.by_id[c].name for c in ids]
    y = np.arange(len(ids))
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.17 * len(ids) + 1.4)), dpi=100)
    ax.barh(y - 0.2, [full[c] / max(n_full, 1) for c in ids], 0.4, label=f"full split ({n_full} images)")
    ax.barh(y + 0.2, [subset[c] / max(n_sub, 1) for c in ids], 0.4, label=f"subset ({n_sub} images)")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_ylim(len(ids) - 0.5, -0.5)
    ax.set_xlabel("fraction of images containing the category")
    ax.set_title("Category histogram: subset vs full split", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return figure_png(fig)


def select_subset(cfg: SplitSettings, source: str, split: str, out: str) -> SubsetResult:
    """Choose the subset of ``source``/``split`` and write the manifest and histogram to ``out``."""
    data = load_split(source, split)
    annotation_sha = sha256_bytes(storage.read_bytes(annotation_json_uri(source, split)))
    known_images = {int(im["id"]) for im in data.images}
    annotated = {i: a for i, a in data.annotations.items() if i in known_images}
    eligible = eligible_images(annotated, data.categories, cfg)
    image_ids, notes = choose(eligible, annotated, cfg)

    full_hist = category_histogram(sorted(annotated), annotated, data.categories)
    sub_hist = category_histogram(image_ids, annotated, data.categories)
    params = asdict(cfg)
    params["include_categories"] = list(cfg.include_categories)
    params["exclude_categories"] = list(cfg.exclude_categories)
    manifest = {
        "schema_version": MANIFEST_SCHEMA,
        "source": {"root": source, "split": split, "annotation_sha256": annotation_sha,
                   "num_images": len(annotated)},
        "strategy": cfg.strategy,
        "seed": cfg.seed,
        "params": params,
        "num_eligible": len(eligible),
        "num_images": len(image_ids),
        "image_ids": image_ids,
        "category_histogram": {"subset": {str(k): v for k, v in sub_hist.items()},
                               "full": {str(k): v for k, v in full_hist.items()}},
        "notes": notes,
    }
    manifest["manifest_hash"] = canonical_hash(manifest)

    manifest_uri = storage.join(out, "manifest.json")
    storage.write_text(manifest_uri, json.dumps(manifest, indent=1, sort_keys=True))
    rows = io.StringIO()
    w = csv.writer(rows, lineterminator="\n")
    w.writerow(["category_id", "name", "isthing", "images_full", "images_subset",
                "fraction_full", "fraction_subset"])
    for c in sorted(full_hist, key=lambda c: (-full_hist[c], c)):
        cat = data.categories.by_id[c]
        w.writerow([c, cat.name, int(cat.isthing), full_hist[c], sub_hist[c],
                    f"{full_hist[c] / max(len(annotated), 1):.4f}", f"{sub_hist[c] / len(image_ids):.4f}"])
    storage.write_text(storage.join(out, "category_histogram.csv"), rows.getvalue())
    storage.write_bytes(storage.join(out, "category_histogram.png"),
                        _histogram_png(full_hist, sub_hist, data.categories, len(annotated), len(image_ids)))
    return SubsetResult(manifest_uri=manifest_uri, image_ids=image_ids, manifest=manifest,
                        category_names={str(c.id): c.name for c in data.categories.categories})
