"""The names of the PQ figures every stage reports, logs and compares, and what an evaluation's
files must hold before anyone uses them: one definition."""

from __future__ import annotations

import math

# (prefix of the figure, key of the group in pq results)
GROUPS = (("", "All"), ("_th", "Things"), ("_st", "Stuff"))
METRIC_KEYS = tuple(f"{m}{suffix}" for suffix, _ in GROUPS for m in ("PQ", "SQ", "RQ"))
PER_IMAGE_FILE = "per_image.csv"   # an evaluation's PQ of each image, in the order scored


def summary_metrics(results: dict) -> dict[str, float]:
    """``PQ``, ``SQ``, ``RQ`` and their ``_th`` (things) / ``_st`` (stuff) forms from pq results
    (``{"All": {"pq", "sq", "rq", ...}, "Things": ..., "Stuff": ...}``)."""
    return {f"{m}{suffix}": results[group][m.lower()] for suffix, group in GROUPS for m in ("PQ", "SQ", "RQ")}


def present(r: dict) -> bool:
    """Whether a category occurs in the ground truth or the predictions (a per_class entry)."""
    return r.get("tp", 1) + r.get("fp", 0) + r.get("fn", 0) > 0


class InvalidMetrics(ValueError):
    """An evaluation that cannot be gated on: a metric that is no finite number in 0..1, or the
    evaluation of another model file."""


def unit_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0.0 <= v <= 1.0


def check_metrics(metrics, source: str) -> dict:
    """``metrics`` (a metrics.json) when every number the gate reads is a finite value in 0..1 and
    it says what it measured; else ``InvalidMetrics`` naming ``source`` and the values."""
    if not isinstance(metrics, dict):
        raise InvalidMetrics(f"{source}: not an evaluation (a {type(metrics).__name__}, not a mapping)")
    bad = [f"{k}={metrics.get(k)!r}" for k in METRIC_KEYS if k in ("PQ", "SQ", "RQ") or k in metrics
           if not unit_number(metrics.get(k))]
    per_class = (metrics.get("results") or {}).get("per_class") if isinstance(metrics.get("results"), dict) else None
    if not isinstance(per_class, dict):
        bad.append("results.per_class missing")
    else:
        bad += [f"per-class PQ of {c}={r.get('pq') if isinstance(r, dict) else r!r}" for c, r in per_class.items()
                if not isinstance(r, dict) or not unit_number(r.get("pq"))][:5]
    images = metrics.get("images")
    if not isinstance(images, int) or isinstance(images, bool) or images < 1:
        bad.append(f"images={images!r}")
    if bad:
        raise InvalidMetrics(f"{source}: metrics the gate cannot use ({', '.join(bad[:8])}): every PQ, SQ and RQ "
                             f"must be a finite number in 0..1; re-run `panoptic evaluate`. Nothing was promoted")
    return metrics
