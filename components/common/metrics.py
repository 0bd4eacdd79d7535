"""The names of the PQ figures every stage reports, logs and compares: one definition."""

from __future__ import annotations

# (prefix of the figure, key of the group in pq results)
GROUPS = (("", "All"), ("_th", "Things"), ("_st", "Stuff"))
METRIC_KEYS = tuple(f"{m}{suffix}" for suffix, _ in GROUPS for m in ("PQ", "SQ", "RQ"))


def summary_metrics(results: dict) -> dict[str, float]:
    """``PQ``, ``SQ``, ``RQ`` and their ``_th`` (things) / ``_st`` (stuff) forms from pq results
    (``{"All": {"pq", "sq", "rq", ...}, "Things": ..., "Stuff": ...}``)."""
    return {f"{m}{suffix}": results[group][m.lower()] for suffix, group in GROUPS for m in ("PQ", "SQ", "RQ")}
