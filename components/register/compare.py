"""`panoptic runs compare`: a table of pipeline runs from MLflow."""

from __future__ import annotations

import csv
import io

from components.common.tracking import DEFAULT_EXPERIMENT, PIPELINE_TAG, setup

METRICS = ("PQ", "SQ", "RQ", "PQ_th", "PQ_st")


def _current_aliases(mlflow, names: set[str]) -> dict[tuple[str, str], list[str]]:
    """(model name, version) -> its aliases now (registration-time tags go stale)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow.get_tracking_uri())
    out: dict[tuple[str, str], list[str]] = {}
    for name in names:
        try:
            aliases = client.get_registered_model(name).aliases
        except Exception:  # the model was deleted
            continue
        for alias, version in sorted(aliases.items()):
            out.setdefault((name, str(version)), []).append(alias)
    return out


def compare_runs(experiment: str | None = None, as_csv: bool = False, max_runs: int = 50) -> str:
    mlflow = setup(None, experiment)
    runs = mlflow.search_runs(experiment_names=[experiment or DEFAULT_EXPERIMENT],
                              filter_string=f"tags.`{PIPELINE_TAG}` = 'pipeline'", max_results=max_runs,
                              output_format="list")
    if not runs:
        return "no pipeline runs yet (run `make run` or `panoptic pipeline run-local`)"
    current = _current_aliases(mlflow, {r.data.tags.get("model.name") for r in runs} - {None})
    params = sorted({k for r in runs for k in r.data.params})
    differing = [p for p in params if len({r.data.params.get(p) for r in runs}) > 1]
    rows = []
    for r in runs:
        m = r.data.metrics
        dur = ((r.info.end_time or r.info.start_time) - r.info.start_time) / 1000 if r.info.start_time else 0
        rows.append({"run": r.info.run_id[:8], "name": r.info.run_name or "", **{k: m.get(k) for k in METRICS},
                     "duration_s": round(dur), "version": r.data.tags.get("model.version", ""),
                     "aliases": ",".join(current.get((r.data.tags.get("model.name"), r.data.tags.get("model.version")),
                                                     [])),
                     **{p: r.data.params.get(p, "") for p in differing}})
    rows.sort(key=lambda row: -(row["PQ"] if row["PQ"] is not None else -1))
    cols = list(rows[0])
    if as_csv:
        buf = io.StringIO()
        w = csv.DictWriter(buf, cols, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()

    def fmt(v):
        return "-" if v is None else f"{100 * v:.2f}" if isinstance(v, float) else str(v)

    widths = {c: max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(fmt(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)
