"""`panoptic runs compare`: a table of pipeline runs from MLflow, and the retraining history as a chart.

A row per pipeline run, per sweep trial (the child runs of a train stage with ``train.sweep``)
and per model registered by hand with `panoptic register` (which has no pipeline run):
PQ/SQ/RQ, what the run decided ("train" or "skip": nothing new), the gate's decision and
reason, the version it registered and its aliases now, the params that differ.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime

from components.common.tracking import DEFAULT_EXPERIMENT, PIPELINE_TAG, setup

METRICS = ("PQ", "SQ", "RQ", "PQ_th", "PQ_st")


def _current_aliases(names: set[str]) -> dict[tuple[str, str], list[str]]:
    """(model name, version) -> its aliases now (registration-time tags go stale)."""
    from mlflow.tracking import MlflowClient

    from components.common.tracking import is_not_found, tracking_uri

    client = MlflowClient(tracking_uri())
    out: dict[tuple[str, str], list[str]] = {}
    for name in names:
        try:
            aliases = client.get_registered_model(name).aliases
        except Exception as e:
            if is_not_found(e):  # the model was deleted
                continue
            raise
        for alias, version in sorted(aliases.items()):
            out.setdefault((name, str(version)), []).append(alias)
    return out


def history(experiment: str | None = None, max_runs: int = 50) -> list[dict]:
    """The runs, oldest first: pipeline runs and registrations made by hand."""
    mlflow = setup(None, experiment)
    exp = [experiment or DEFAULT_EXPERIMENT]
    runs = mlflow.search_runs(experiment_names=exp, filter_string=f"tags.`{PIPELINE_TAG}` = 'pipeline'",
                              max_results=max_runs, output_format="list")
    by_hand = [r for r in mlflow.search_runs(experiment_names=exp, filter_string="tags.`panoptic.stage` = 'register'",
                                             max_results=max_runs, output_format="list")
               if "mlflow.parentRunId" not in r.data.tags]
    trials = mlflow.search_runs(experiment_names=exp, filter_string=f"tags.`{PIPELINE_TAG}` = 'trial'",
                                max_results=max_runs, output_format="list")
    models = {r.data.tags.get("model.name") for r in runs} | {"panoptic-fpn"}
    current = _current_aliases(models - {None})
    rows = []
    kinds = [(r, "pipeline") for r in runs] + [(r, "by hand") for r in by_hand] + [(r, "trial") for r in trials]
    for r, kind in kinds:
        m, t = r.data.metrics, r.data.tags
        start = r.info.start_time or 0
        dur = ((r.info.end_time or start) - start) / 1000 if start else 0
        version = t.get("model.version", "")
        if kind == "by hand":  # its version: the one whose register_run_id is this run
            version = _version_of_run(r.info.run_id)
        promote = t.get("gate.promote")
        rows.append({"run": r.info.run_id[:8], "name": r.info.run_name or "", "kind": kind, "data": _training_data(r),
                     "start": datetime.fromtimestamp(start / 1000).strftime("%Y-%m-%d %H:%M") if start else "",
                     "start_ms": start, **{k: m.get(k) for k in METRICS},
                     "decision": t.get("decision", "train" if kind == "by hand" else ""),
                     "gate": {"True": "pass", "False": "fail"}.get(str(promote), ""), "version": version,
                     "aliases": ",".join(current.get((t.get("model.name", "panoptic-fpn"), version), [])),
                     "reason": (("sweep trial: the best, its model went on to the gate" if t.get("sweep.best") == "True"
                                 else "sweep trial") if kind == "trial"
                                else t.get("gate.reason") or t.get("decision.reason", "")),
                     "duration_s": round(dur),
                     "params": dict(r.data.params)})
    rows.sort(key=lambda row: row["start_ms"])
    return rows


def _training_data(run) -> str:
    """The training subset as MLflow's Dataset column shows it: ``name (digest)``, digest cut to 8."""
    for d in run.inputs.dataset_inputs if run.inputs else ():
        if d.dataset.name.endswith(" subset") and any(t.value == "training" for t in d.tags):
            return f"{d.dataset.name} ({d.dataset.digest[:8]})"
    return ""


def _version_of_run(run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    from components.common.tracking import tracking_uri

    try:
        found = MlflowClient(tracking_uri()).search_model_versions(f"tags.register_run_id = '{run_id}'")
    except Exception:
        return ""
    return str(found[0].version) if found else ""


def compare_runs(experiment: str | None = None, as_csv: bool = False, max_runs: int = 50, wide: bool = False,
                 width: int | None = None) -> str:
    """The runs, best PQ first: a table that fits ``width`` columns (default: the terminal's), the
    gate's reason cut to what is left; ``wide``: every column (the training data, the params that
    differ, durations, full reasons); ``as_csv``: all of it as CSV."""
    import shutil

    rows = history(experiment, max_runs)
    if not rows:
        return "no pipeline runs yet (run `make run` or `panoptic pipeline run-local`)"
    params = sorted({k for r in rows for k in r["params"]})
    differing = [p for p in params if len({r["params"].get(p) for r in rows}) > 1]
    ranked = sorted(rows, key=lambda row: -(row["PQ"] if row["PQ"] is not None else -1))
    if as_csv or wide:
        table = [{k: r[k] for k in ("run", "name", "start", *METRICS, "data", "decision", "gate", "version",
                                    "aliases", "duration_s")} | {p: r["params"].get(p, "") for p in differing}
                 | {"reason": r["reason"]} for r in ranked]
        if as_csv:
            buf = io.StringIO()
            w = csv.DictWriter(buf, list(table[0]), lineterminator="\n")
            w.writeheader()
            w.writerows(table)
            return buf.getvalue()
        return _columns(table, None)
    table = [{"run": r["run"], "when": r["start"][5:], "name": _short_name(r), "PQ": r["PQ"], "SQ": r["SQ"],
              "RQ": r["RQ"], "decision": r["decision"] or "-", "gate": r["gate"] or "-",
              "model": _model(r),
              "reason": r["reason"]} for r in ranked]
    width = width or shutil.get_terminal_size(fallback=(120, 24)).columns
    return _columns(table, width) + "\n(every column: --wide; all of it as CSV: --csv)"


def _short_name(row: dict) -> str:
    """The run's name without what other columns say: the experiment's prefix, the date."""
    import re

    name = row["name"]
    name = name[len(DEFAULT_EXPERIMENT) + 1:] if name.startswith(DEFAULT_EXPERIMENT + " ") else name
    return re.sub(r"\s*\d{4}-\d\d-\d\d \d\d:\d\d", "", name).strip() or name


def _model(row: dict) -> str:
    """``v3 champion``: the version and its weightiest alias now."""
    if not row["version"]:
        return "-"
    aliases = row["aliases"].split(",") if row["aliases"] else []
    alias = "champion" if "champion" in aliases else aliases[0] if aliases else ""
    return f"v{row['version']} {alias}".strip()


def _columns(table: list[dict], width: int | None) -> str:
    """Aligned columns; with ``width``, the last column cut (with …) so that lines fit it."""
    def fmt(v):
        if v is None:
            return "-"
        return f"{100 * v:.2f}" if isinstance(v, float) else str(v)

    cols = list(table[0])
    widths = {c: max(len(c), *(len(fmt(r[c])) for r in table)) for c in cols}
    last = cols[-1]
    if width is not None:
        room = width - sum(widths[c] + 2 for c in cols[:-1])
        widths[last] = max(30, min(widths[last], room))   # a reason needs some room, even in a narrow terminal
    def cell(v, c):
        text = fmt(v)
        return text if len(text) <= widths[c] else text[: widths[c] - 1] + "…"
    lines = ["  ".join(c.ljust(widths[c]) for c in cols).rstrip()]
    lines += ["  ".join(cell(r[c], c).ljust(widths[c]) for c in cols).rstrip() for r in table]
    return "\n".join(lines)


def history_chart(path: str, experiment: str | None = None, max_runs: int = 50) -> str:
    """PQ, SQ and RQ of each run over time (PNG at ``path``): champions (promoted) as stars,
    rejected challengers as crosses, sweep trials as diamonds (the best one gold), registrations
    made by hand as squares, runs that found nothing new as grey lines; each run numbered, its
    decision and the gate's reason listed under the chart (the legend beside it, off the points)."""
    import textwrap

    from components.common import storage
    from components.common.plots import figure_png, pyplot

    rows = history(experiment, max_runs)
    plt = pyplot()
    notes = []
    for x, r in enumerate(rows, 1):
        head = f"#{x} {r['start']}  {r['kind']}  {r['decision'] or '-'} {r['gate'] or ''} v{r['version'] or '-'}: "
        notes += textwrap.wrap(head + (r["reason"] or "-"), 150, subsequent_indent=" " * 8)
    # in inches, top to bottom: title 0.5, the chart 3.0, its date labels 1.0, the notes 0.16 a line
    height = 0.5 + 3.0 + 1.0 + 0.16 * len(notes) + 0.3
    fig = plt.figure(figsize=(12, height), dpi=100)
    ax = fig.add_axes((0.06, 1 - 3.5 / height, 0.72, 3.0 / height))
    xs = list(range(1, len(rows) + 1))
    for key, color in (("PQ", "#1f77b4"), ("SQ", "#2ca02c"), ("RQ", "#ff7f0e")):
        pts = [(x, 100 * r[key]) for x, r in zip(xs, rows) if r[key] is not None and r["kind"] != "trial"]
        if pts:
            ax.plot(*zip(*pts), "-", color=color, alpha=0.5, label=key)
    for x, r in zip(xs, rows):
        if r["PQ"] is None:
            ax.axvline(x, color="0.8", lw=1, zorder=0)
            continue
        if r["kind"] == "trial":
            best = "the best" in r["reason"]
            marker, color, label = "D", "gold" if best else "white", "sweep trial (gold: the best)"
        elif r["kind"] == "by hand":
            marker, color, label = "s", "purple", "registered by hand"
        elif r["gate"] == "pass":
            marker, color, label = "*", "gold", "champion (gate passed)"
        else:
            marker, color, label = "x", "red", "rejected challenger"
        ax.scatter([x], [100 * r["PQ"]], marker=marker, s=170 if marker == "*" else 55, color=color, edgecolor="k",
                   zorder=3, label=label)
        ax.annotate(f"#{x}", (x, 100 * r["PQ"]), textcoords="offset points", xytext=(5, 6), fontsize=8)
    handles, labels = ax.get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    if any(r["PQ"] is None for r in rows):
        seen["nothing new (skipped)"] = plt.Line2D([], [], color="0.8", lw=1)
    ax.legend(seen.values(), seen.keys(), loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8,
              borderaxespad=0)
    ax.set_xticks(xs, [r["start"][5:] for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_xlim(0.5, len(rows) + 0.5)
    ax.set_ylabel("%")
    ax.set_title("Retraining history: PQ / SQ / RQ per run")
    fig.text(0.02, 1 - 4.5 / height, "\n".join(notes), fontsize=7, family="monospace", va="top")
    buf = figure_png(fig, tight=False)
    storage.write_bytes(path, buf)
    return path
