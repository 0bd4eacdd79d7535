"""Pictures of panoptic results: overlays, the per-class chart, and the self-contained report.html."""

from __future__ import annotations

import base64
import html
import io

import numpy as np
from PIL import Image

from components.common.coco_panoptic import segment_index_map
from components.common.plots import figure_png, pyplot


def segment_colors(segments: list[dict], categories: dict[int, dict], seed: int = 0) -> list[tuple[int, int, int]]:
    """A colour per segment: its category's colour, jittered per instance so neighbours differ."""
    rng = np.random.default_rng(seed)
    out = []
    for s in segments:
        base = np.asarray(categories.get(s["category_id"], {}).get("color", (200, 200, 200)), float)
        jitter = rng.integers(-40, 41, 3) if categories.get(s["category_id"], {}).get("isthing") else 0
        out.append(tuple(int(v) for v in np.clip(base + jitter, 0, 255)))
    return out


def overlay(image: np.ndarray, ids: np.ndarray, segments: list[dict], categories: dict[int, dict],
            alpha: float = 0.55) -> np.ndarray:
    """Blend segment colours over an (H, W, 3) image; boundaries dark; VOID left as is."""
    index = segment_index_map(ids, [s["id"] for s in segments])
    colors = np.array(segment_colors(segments, categories) + [(0, 0, 0)], np.float32)
    painted = colors[index]  # index -1 -> the last row
    out = image.astype(np.float32)
    labelled = index >= 0
    out[labelled] = (1 - alpha) * out[labelled] + alpha * painted[labelled]
    edge = np.zeros(ids.shape, bool)
    edge[:-1] |= ids[:-1] != ids[1:]
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    out[edge] *= 0.25
    return np.clip(out, 0, 255).astype(np.uint8)


def png_data_uri(arr: np.ndarray | bytes) -> str:
    if isinstance(arr, (bytes, bytearray)):
        data = bytes(arr)
    else:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG", optimize=True)
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def per_class_chart(results: dict, categories: dict[int, dict]) -> bytes:
    """Bar chart of per-category PQ, things and stuff coloured apart, best first."""
    plt = pyplot()

    rows = sorted(((int(c), r["pq"]) for c, r in results["per_class"].items()), key=lambda t: -t[1])
    names = [categories[c]["name"] for c, _ in rows]
    colors = ["#d95f02" if categories[c]["isthing"] else "#1b9e77" for c, _ in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * len(rows) + 2), 3.8), dpi=100)
    ax.bar(range(len(rows)), [100 * v for _, v in rows], color=colors)
    ax.set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("PQ")
    ax.set_ylim(0, 100)
    ax.set_title("PQ per category (orange: things, green: stuff)")
    return figure_png(fig)


def thumbnail(arr: np.ndarray, max_side: int = 360) -> np.ndarray:
    h, w = arr.shape[:2]
    s = min(1.0, max_side / max(h, w))
    if s >= 1.0:
        return arr
    return np.asarray(Image.fromarray(arr).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR))


def render_report(*, title: str, results: dict, categories: dict[int, dict], samples: list[dict],
                  extra: dict | None = None) -> str:
    """A self-contained HTML page: summary table, per-class chart, sample triptychs (worst first).

    ``samples``: dicts with ``image_id``, ``file_name``, ``pq`` (per image), ``image``,
    ``gt_overlay``, ``pred_overlay`` ((H, W, 3) uint8 arrays).
    """
    esc = html.escape
    rows = "".join(
        f"<tr><td>{name}</td><td>{100 * results[name]['pq']:.2f}</td><td>{100 * results[name]['sq']:.2f}</td>"
        f"<td>{100 * results[name]['rq']:.2f}</td><td>{results[name]['n']}</td></tr>"
        for name in ("All", "Things", "Stuff"))
    cls_rows = "".join(
        f"<tr><td>{esc(categories[int(c)]['name'])}</td><td>{'thing' if categories[int(c)]['isthing'] else 'stuff'}"
        f"</td><td>{100 * r['pq']:.2f}</td><td>{100 * r['sq']:.2f}</td><td>{100 * r['rq']:.2f}</td></tr>"
        for c, r in sorted(results["per_class"].items(), key=lambda kv: -kv[1]["pq"]))
    facts = "".join(f"<li><b>{esc(str(k))}</b>: {esc(str(v))}</li>" for k, v in (extra or {}).items())
    cards = "".join(
        f"<div class='card'><h3>image {s['image_id']} ({esc(s['file_name'])}): PQ {100 * s['pq']:.1f}</h3>"
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
</style></head><body>
<h1>{esc(title)}</h1>
<ul>{facts}</ul>
<h2>Panoptic Quality</h2>
<table><tr><th></th><th>PQ</th><th>SQ</th><th>RQ</th><th>categories</th></tr>{rows}</table>
<img src="{chart}" alt="per-class PQ">
<details><summary>per-category table</summary>
<table><tr><th>category</th><th>kind</th><th>PQ</th><th>SQ</th><th>RQ</th></tr>{cls_rows}</table></details>
<h2>Samples, worst first</h2>
{cards}
</body></html>
"""
