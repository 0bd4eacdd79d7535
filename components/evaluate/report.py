"""The evaluation report: the per-class chart and the self-contained report.html."""

from __future__ import annotations

import html

from components.common.plots import figure_png, png_data_uri, pyplot, thumbnail  # noqa: F401 (report API)
from components.evaluate.tables import present

CHART_WIDTH_IN, CHART_DPI, ROW_IN = 9.0, 100, 0.19  # 900 px wide whatever the number of categories


def per_class_chart(results: dict, categories: dict[int, dict]) -> bytes:
    """Horizontal bars of per-category PQ, one row per category *present* (in the ground truth or
    the predictions), things and stuff coloured apart, best first. The chart is 900 px wide and
    grows in height with the categories (readable at COCO's 133)."""
    plt = pyplot()

    rows = sorted(((int(c), r["pq"]) for c, r in results["per_class"].items() if present(r)),
                  key=lambda t: (-t[1], t[0]))
    height = max(1.6, 0.9 + ROW_IN * len(rows))
    fig, ax = plt.subplots(figsize=(CHART_WIDTH_IN, height), dpi=CHART_DPI)
    y = range(len(rows))
    ax.barh(y, [100 * v for _, v in rows],
            color=["#d95f02" if categories[c]["isthing"] else "#1b9e77" for c, _ in rows])
    ax.set_yticks(list(y), [categories[c]["name"] for c, _ in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # best on top, no margin rows
    ax.set_xlim(0, 100)
    ax.set_xlabel("PQ")
    ax.xaxis.set_label_position("top")
    ax.xaxis.tick_top()
    ax.set_title(f"PQ per category present ({len(rows)}; orange: things, green: stuff)", fontsize=10)
    return figure_png(fig)


def render_report(*, title: str, results: dict, categories: dict[int, dict], samples: list[dict],
                  extra: dict | None = None) -> str:
    """A self-contained HTML page: summary table, per-class chart, sample triptychs (worst first).

    ``samples``: dicts with ``image_id``, ``file_name``, ``pq`` (per image), ``image``,
    ``gt_overlay``, ``pred_overlay`` ((H, W, 3) uint8 arrays).
    """
    esc = html.escape
    absent = [int(c) for c, r in results["per_class"].items() if not present(r)]
    rows = "".join(
        f"<tr><td>{name}</td><td>{100 * results[name]['pq']:.2f}</td><td>{100 * results[name]['sq']:.2f}</td>"
        f"<td>{100 * results[name]['rq']:.2f}</td><td>{results[name]['n']}</td></tr>"
        for name in ("All", "Things", "Stuff"))
    cls_rows = "".join(
        f"<tr><td>{esc(categories[int(c)]['name'])}</td><td>{'thing' if categories[int(c)]['isthing'] else 'stuff'}"
        + (f"</td><td>{100 * r['pq']:.2f}</td><td>{100 * r['sq']:.2f}</td><td>{100 * r['rq']:.2f}</td>"
           f"<td>{r.get('tp', '')}</td><td>{r.get('fp', '')}</td><td>{r.get('fn', '')}</td></tr>" if present(r) else
           "</td><td colspan='6' class='absent'>not present (in neither the ground truth nor the predictions)"
           "</td></tr>")
        for c, r in sorted(results["per_class"].items(), key=lambda kv: (not present(kv[1]), -kv[1]["pq"], int(kv[0]))))
    absent_note = (f"<p class='note'>Not present in the ground truth nor the predictions, so not in the chart or the "
                   f"averages: {len(absent)} categor{'y' if len(absent) == 1 else 'ies'} "
                   f"({esc(', '.join(categories[c]['name'] for c in sorted(absent)[:12]))}"
                   f"{', ...' if len(absent) > 12 else ''}).</p>" if absent else "")
    facts = "".join(f"<li><b>{esc(str(k))}</b>: {esc(str(v))}</li>" for k, v in (extra or {}).items())
    cards = "".join(
        f"<div class='card'><h3>image {s['image_id']} ({esc(s['file_name'])}): PQ {100 * s['pq']:.1f}</h3>"
        + ("<p class='note'>No segment was predicted in this image: the prediction shows the photo alone.</p>"
           if s.get("predicted_segments") == 0 else "") +
        f"<div class='row'><figure><img src='{png_data_uri(s['image'])}'><figcaption>image</figcaption></figure>"
        f"<figure><img src='{png_data_uri(s['gt_overlay'])}'><figcaption>ground truth</figcaption></figure>"
        f"<figure><img src='{png_data_uri(s['pred_overlay'])}'><figcaption>prediction</figcaption></figure>"
        f"</div></div>" for s in samples)
    chart = png_data_uri(per_class_chart(results, categories))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; margin: 8px 0 20px; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
.row {{ display: flex; gap: 8px; flex-wrap: wrap; }}
figure {{ margin: 0; }} figcaption {{ font-size: 12px; color: #555; text-align: center; }}
.card {{ border-top: 1px solid #ddd; padding-top: 8px; margin-top: 12px; }}
h3 {{ font-size: 15px; margin: 4px 0; }}
details {{ margin: 12px 0; }}
img {{ max-width: 100%; height: auto; }}
.chart {{ max-height: 80vh; overflow-y: auto; max-width: 920px; }}
.note {{ background: #fff4e5; border-left: 4px solid #f0a020; padding: 4px 8px; font-size: 14px; }}
td.absent {{ color: #888; text-align: left; font-style: italic; }}
</style></head><body>
<h1>{esc(title)}</h1>
<ul>{facts}</ul>
<h2>Panoptic Quality</h2>
<table><tr><th></th><th>PQ</th><th>SQ</th><th>RQ</th><th>categories</th></tr>{rows}</table>
<div class="chart"><img src="{chart}" alt="per-class PQ"></div>
{absent_note}
<details><summary>per-category table</summary>
<table><tr><th>category</th><th>kind</th><th>PQ</th><th>SQ</th><th>RQ</th><th>TP</th><th>FP</th><th>FN</th></tr>{cls_rows}</table></details>
<h2>Samples, worst first</h2>
{cards}
</body></html>
"""
