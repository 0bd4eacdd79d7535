"""PQ results as people read them: the console table, and the per-category table MLflow shows."""

from __future__ import annotations

from components.common.metrics import present  # noqa: F401 (evaluate's table rule)

PER_CLASS_TABLE = "evaluate/per_class_table.json"   # an MLflow table artifact (the UI shows it as a table)


def per_class_table(results: dict, categories: list[dict]) -> dict[str, list]:
    """Per-category results as columns for ``mlflow.log_table``, in category id order (PQ/SQ/RQ
    in points). A category in neither the ground truth nor the predictions has empty PQ/SQ/RQ
    and ``present`` false (panopticapi counts it as 0, which is not a measurement)."""
    names = {int(c["id"]): c for c in categories}
    cols: dict[str, list] = {k: [] for k in ("category_id", "name", "kind", "PQ", "SQ", "RQ", "TP", "FP", "FN",
                                            "present")}
    for cid, r in sorted(((int(k), v) for k, v in results["per_class"].items())):
        seen = present(r)
        cols["category_id"].append(cid)
        cols["name"].append(names.get(cid, {}).get("name", str(cid)))
        cols["kind"].append("thing" if names.get(cid, {}).get("isthing") else "stuff")
        for k in ("PQ", "SQ", "RQ"):
            cols[k].append(round(100 * r[k.lower()], 3) if seen else None)
        for k in ("TP", "FP", "FN"):
            cols[k].append(int(r.get(k.lower(), 0)))
        cols["present"].append(seen)
    return cols


def format_table(results: dict, categories: dict[int, dict] | None = None) -> str:
    """The PQ table; with ``categories``, a row per category too, best first, the categories in
    neither set last and marked "not present" (panopticapi reports them as PQ 0)."""
    lines = [f"{'':10s}|{'PQ':>8s}{'SQ':>8s}{'RQ':>8s}{'N':>6s}", "-" * 40]
    for name in ("All", "Things", "Stuff"):
        r = results[name]
        lines.append(f"{name:10s}|{100 * r['pq']:8.2f}{100 * r['sq']:8.2f}{100 * r['rq']:8.2f}{r['n']:6d}")
    if categories:
        lines += ["", f"{'category':24s}{'PQ':>8s}{'SQ':>8s}{'RQ':>8s}{'TP':>6s}{'FP':>6s}{'FN':>6s}"]
        rows = sorted(results["per_class"].items(), key=lambda kv: (not present(kv[1]), -kv[1]["pq"], int(kv[0])))
        for cat, r in rows:
            name = categories.get(int(cat), {}).get("name", str(cat))[:23]
            if present(r):
                lines.append(f"{name:24s}{100 * r['pq']:8.2f}{100 * r['sq']:8.2f}{100 * r['rq']:8.2f}"
                             f"{r.get('tp', ''):>6}{r.get('fp', ''):>6}{r.get('fn', ''):>6}")
            else:
                lines.append(f"{name:24s}{'not present':>24s}")
    return "\n".join(lines)
