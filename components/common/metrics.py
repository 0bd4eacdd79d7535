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


def counts_problems(metrics: dict, tol: float = 1e-6) -> list[str]:
    """Where a metrics.json's figures disagree with its own counts (``counts``: tp, fp, fn and IoU
    sum per category, which evaluate writes beside them): each category's PQ must be
    ``iou / (tp + fp/2 + fn/2)`` and PQ the mean over the categories present, as computed. An
    edited PQ, or counts that were, is refused rather than believed."""
    counts = metrics.get("counts")
    if counts is None:
        return []   # evaluations written before the counts were kept: only the ranges are checked
    if not isinstance(counts, dict):
        return ["counts: not a mapping"]
    per_class = {str(k): v for k, v in metrics["results"]["per_class"].items()}
    problems, present = [], []
    for cid, c in counts.items():
        if str(cid) not in per_class:
            continue   # a ground-truth category the model does not know: not in its averages either
        if not isinstance(c, dict) or not all(isinstance(c.get(k), int) and not isinstance(c.get(k), bool)
                                              and c[k] >= 0 for k in ("tp", "fp", "fn")):
            problems.append(f"counts of {cid} are not whole numbers >= 0")
            continue
        iou = c.get("iou", 0.0)
        if not isinstance(iou, (int, float)) or not math.isfinite(iou) or not 0 <= iou <= c["tp"] + tol:
            problems.append(f"IoU sum of {cid}={iou!r} outside 0..tp")
            continue
        n = c["tp"] + 0.5 * (c["fp"] + c["fn"])
        if not n:
            continue
        pq = iou / n
        present.append(pq)
        stated = per_class.get(str(cid), {}).get("pq")
        if stated is None or abs(stated - pq) > tol:
            problems.append(f"per-class PQ of {cid}={stated!r} but its counts give {pq:.6f}")
    if present and not problems and abs(sum(present) / len(present) - metrics["PQ"]) > tol:
        problems.append(f"PQ={metrics['PQ']!r} but its per-category counts give {sum(present) / len(present):.6f}")
    return problems[:5]


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
    if not bad:
        bad += counts_problems(metrics)
    if bad:
        raise InvalidMetrics(f"{source}: metrics the gate cannot use ({', '.join(bad[:8])}): every PQ, SQ and RQ "
                             f"must be a finite number in 0..1; re-run `panoptic evaluate`. Nothing was promoted")
    return metrics
