"""``gate.html``: champion and challenger side by side on the same validation data.

What the gate's two numbers do not say: which categories got better or worse (per-category PQ
deltas, sorted by change) and on which images the two models disagree most (the largest
per-image PQ differences, each shown as image | ground truth | champion | challenger). Built
from what ``panoptic evaluate`` already wrote for each model (``metrics.json``,
``per_image.csv``, the predicted PNGs); only the few images shown are read from the shards.
"""

from __future__ import annotations

import csv
import html
import io
import math
import time
from dataclasses import dataclass, field

import numpy as np

from components.common import storage
from components.common.metrics import PER_IMAGE_FILE, check_metrics, present

GATE_REPORT = "gate.html"
SHOWN = 8   # images in the report (the largest per-image PQ differences)
THUMB = 300   # px, the longest side of each picture: four side by side fit a laptop's screen


class IncomparableEvaluations(ValueError):
    """Two evaluations that did not score the same validation images."""


@dataclass
class Evaluation:
    """One model's evaluation as ``panoptic evaluate`` wrote it (checked as it is read)."""

    label: str
    folder: str
    metrics: dict
    per_image: dict[int, tuple[str, float]] = field(repr=False)   # image_id -> (file_name, PQ)
    model_uri: str | None = None   # predicts the images shown when the folder has no prediction PNGs
    tracking: str | None = None    # the registry holding model_uri (models:/...)

    @staticmethod
    def read(folder: str, label: str, model_uri: str | None = None, tracking: str | None = None) -> "Evaluation":
        uri = storage.join(folder, "metrics.json")
        metrics = check_metrics(storage.read_json(uri, "evaluation"), uri)
        return Evaluation(label, folder, metrics, read_per_image(storage.join(folder, PER_IMAGE_FILE)), model_uri,
                          tracking)


def read_per_image(uri: str) -> dict[int, tuple[str, float]]:
    """``per_image.csv`` -> {image_id: (file_name, PQ)}; every row checked (id a whole number,
    PQ finite in 0..1, no id twice)."""
    text = storage.read_text(uri) if storage.exists(uri) else None
    if text is None:
        raise FileNotFoundError(f"{uri}: no per-image PQ (evaluate writes it; re-run `panoptic evaluate`)")
    rows = {}
    for n, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
        try:
            image_id, pq = int(row["image_id"]), float(row["pq"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{uri}:{n}: image_id and pq must be numbers; re-run `panoptic evaluate`") from None
        if not (math.isfinite(pq) and 0.0 <= pq <= 1.0) or image_id in rows:
            raise ValueError(f"{uri}:{n}: PQ {pq} out of 0..1 or image {image_id} listed twice; re-run "
                             f"`panoptic evaluate`")
        rows[image_id] = (str(row.get("file_name") or "")[:300], pq)
    return rows


def category_deltas(champion: dict, challenger: dict, categories: dict[int, dict]) -> list[dict]:
    """Per-category PQ of both and the change, for every category present in either evaluation
    (in the ground truth or either prediction), largest gain first, largest drop last."""
    a, b = champion["results"]["per_class"], challenger["results"]["per_class"]
    rows = []
    for key in sorted(set(a) | set(b), key=int):
        ra, rb = a.get(key, {"tp": 0, "fp": 0, "fn": 0}), b.get(key, {"tp": 0, "fp": 0, "fn": 0})
        if not (present(ra) or present(rb)):
            continue
        c = categories[int(key)]
        pa, pb = float(ra.get("pq", 0.0)), float(rb.get("pq", 0.0))
        rows.append({"category_id": int(key), "name": c["name"], "isthing": bool(c["isthing"]),
                     "champion": pa, "challenger": pb, "delta": pb - pa})
    return sorted(rows, key=lambda r: (-r["delta"], r["category_id"]))


def disagreements(champion: Evaluation, challenger: Evaluation, count: int = SHOWN) -> list[dict]:
    """The ``count`` images whose per-image PQ differs most between the two (|challenger -
    champion|, then image id); both evaluations must have scored the same images."""
    if set(champion.per_image) != set(challenger.per_image):
        only = sorted(set(champion.per_image) ^ set(challenger.per_image))
        raise IncomparableEvaluations(
            f"{champion.folder} and {challenger.folder} scored different images ({len(only)} in one only, e.g. "
            f"{only[:5]}): evaluate both models on the same shards")
    rows = [{"image_id": i, "file_name": challenger.per_image[i][0], "champion": champion.per_image[i][1],
             "challenger": challenger.per_image[i][1], "delta": challenger.per_image[i][1] - champion.per_image[i][1]}
            for i in challenger.per_image]
    rows.sort(key=lambda r: (-abs(r["delta"]), r["image_id"]))
    return [r for r in rows[:count] if r["delta"] != 0]   # images both score alike say nothing


def read_samples(shards: str, image_ids: set[int]) -> dict[int, dict]:
    """The rows of ``image_ids`` from the shards (only those rows' images are read)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from components.data.records import load_index

    index = load_index(shards)
    folder = shards if not shards.endswith(".json") else storage.dirname(shards)
    found: dict[int, dict] = {}
    wanted = list(image_ids)
    for s in index["shards"]:
        if len(found) == len(image_ids):
            break
        fs, path = storage.resolve(storage.join(folder, s["file"]))
        with fs.open_input_file(path) as f:
            table = pq.read_table(f, filters=pc.field("image_id").isin(wanted))
        for row in table.to_pylist():
            found[int(row["image_id"])] = row
    return found


def _predicted(ev: Evaluation, file_name: str, annotations: dict) -> tuple[np.ndarray, list] | None:
    """One image's predicted ids and segments from ``ev``'s prediction files (None if not written)."""
    from components.common.coco_panoptic import decode_png

    stem = file_name.rsplit(".", 1)[0]
    uri = storage.join(ev.folder, "predictions", "panoptic_val", f"{stem}.png")
    if stem not in annotations or not storage.exists(uri):
        return None
    return decode_png(storage.read_bytes(uri), uri), annotations[stem]


def _predict(ev: Evaluation, image: np.ndarray, models: dict) -> tuple[np.ndarray, list] | None:
    """``ev``'s model run on one image (its evaluation wrote no PNGs: a registered version's
    metrics); None without a model."""
    if not ev.model_uri:
        return None
    from components.model.artifact import load_model
    from components.model.inference import predict_image

    if ev.model_uri not in models:
        local = ev.model_uri
        if local.startswith(("models:/", "runs:/")):
            from components.common.tracking import download_model_file

            local = download_model_file(local, ev.tracking)
        models[ev.model_uri] = load_model(local, "cpu")[:2]
    return predict_image(*models[ev.model_uri], image)


def _annotations(ev: Evaluation) -> dict[str, list]:
    """{stem: segments_info} of ``ev``'s predictions JSON ({} when it was not written)."""
    uri = storage.join(ev.folder, "predictions", "panoptic_val.json")
    if not storage.exists(uri):
        return {}
    doc = storage.read_json(uri, "predictions")
    anns = doc.get("annotations") if isinstance(doc, dict) else None
    if not isinstance(anns, list):
        raise ValueError(f"{uri}: not a COCO panoptic predictions file (no annotations list); re-run evaluate")
    return {str(a.get("file_name", "")).rsplit(".", 1)[0]: a.get("segments_info") or []
            for a in anns if isinstance(a, dict)}


def build(champion: Evaluation, challenger: Evaluation, val_shards: str, out_uri: str, *, verdict: str = "",
          facts: dict | None = None, shown: int = SHOWN) -> dict:
    """Write ``gate.html`` for the two evaluations to ``out_uri``; returns what it shows
    (``summary``, ``categories``, ``images``, ``seconds``) for callers and tests."""
    from components.common.coco_panoptic import decode_image, decode_png
    from components.common.overlays import overlay
    from components.common.plots import thumbnail
    from components.data.records import load_index

    t0 = time.perf_counter()
    if champion.metrics.get("val_samples_digest") != challenger.metrics.get("val_samples_digest"):
        raise IncomparableEvaluations(
            f"{champion.folder} and {challenger.folder} were measured on different validation samples "
            f"({str(champion.metrics.get('val_samples_digest'))[:12]} vs "
            f"{str(challenger.metrics.get('val_samples_digest'))[:12]}): evaluate both on the same shards")
    categories = {int(c["id"]): c for c in load_index(val_shards)["categories"]}
    deltas = category_deltas(champion.metrics, challenger.metrics, categories)
    images = disagreements(champion, challenger, shown)
    samples = read_samples(val_shards, {r["image_id"] for r in images})
    anns = (_annotations(champion), _annotations(challenger))
    models: dict = {}
    for r in images:
        row = samples.get(r["image_id"])
        if row is None:
            raise IncomparableEvaluations(f"{val_shards}: image {r['image_id']} was scored but is not in these shards")
        image = decode_image(row["image"], row["file_name"])
        gt = decode_png(row["panoptic_png"], row["file_name"])
        r["pictures"] = [("image", thumbnail(image, THUMB)),
                         ("ground truth", thumbnail(overlay(image, gt, row["segments_info"], categories), THUMB))]
        for ev, a in zip((champion, challenger), anns):
            pred = _predicted(ev, row["file_name"], a) or _predict(ev, image, models)
            drawn = None if pred is None else thumbnail(overlay(image, *pred, categories), THUMB)
            r["pictures"].append((ev.label, drawn))
    summary = {k: (champion.metrics.get(k), challenger.metrics.get(k))
               for k in ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")}
    page = render(champion, challenger, summary, deltas, images, verdict, facts or {})
    storage.write_text(out_uri, page)
    return {"summary": summary, "categories": deltas, "images": images, "seconds": time.perf_counter() - t0,
            "uri": out_uri}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * float(x):.2f}"


def _signed(x: float) -> str:
    return f"{100 * x:+.2f}"


def delta_chart(deltas: list[dict]) -> str:
    """Inline SVG: one bar per category from 0, gains right (green), drops left (red), largest
    gain on top; the label says thing or stuff."""
    esc = html.escape
    if not deltas:
        return "<p class='note'>No category is present in either evaluation.</p>"
    row, label_w, half = 18, 210, 300
    span = max(1e-9, max(abs(d["delta"]) for d in deltas))
    width, height = label_w + 2 * half + 70, row * len(deltas) + 30
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-size='11' "
             f"font-family='system-ui, sans-serif' role='img' aria-label='per-category PQ change'>",
             f"<line x1='{label_w + half}' y1='18' x2='{label_w + half}' y2='{height}' stroke='#888'/>",
             f"<text x='{label_w + half}' y='12' text-anchor='middle' fill='#555'>0 (PQ change, points; "
             f"scale ±{100 * span:.1f})</text>"]
    for k, d in enumerate(deltas):
        y = 22 + k * row
        w = half * abs(d["delta"]) / span
        x = label_w + half - w if d["delta"] < 0 else label_w + half
        colour = "#1a9850" if d["delta"] > 0 else "#d73027" if d["delta"] < 0 else "#999"
        kind = "thing" if d["isthing"] else "stuff"
        parts.append(f"<text x='{label_w - 6}' y='{y + 11}' text-anchor='end'>{esc(d['name'][:28])} "
                     f"<tspan fill='{'#d95f02' if d['isthing'] else '#1b9e77'}'>[{kind}]</tspan></text>")
        parts.append(f"<rect x='{x:.1f}' y='{y + 2}' width='{max(w, 1):.1f}' height='{row - 5}' fill='{colour}'>"
                     f"<title>{esc(d['name'])}: {_pct(d['champion'])} → {_pct(d['challenger'])}</title></rect>")
        tx = label_w + half + (w + 4 if d["delta"] >= 0 else 4)
        parts.append(f"<text x='{tx:.1f}' y='{y + 11}' fill='#333'>{_signed(d['delta'])}</text>")
    parts.append("</svg>")
    return "".join(parts)


def render(champion: Evaluation, challenger: Evaluation, summary: dict, deltas: list[dict], images: list[dict],
           verdict: str, facts: dict) -> str:
    from components.common.plots import png_data_uri

    esc = html.escape
    def cells(k: str) -> str:
        a, b = summary[k]
        if a is None or b is None:
            return f"<td>{_pct(a)}</td><td>{_pct(b)}</td><td>n/a</td>"
        trend = "up" if b > a else "down" if b < a else ""
        return f"<td>{_pct(a)}</td><td>{_pct(b)}</td><td class='{trend}'>{_signed(b - a)}</td>"

    rows = "".join(f"<tr><td>{label}</td>{cells('PQ' + s)}{cells('SQ' + s)}{cells('RQ' + s)}</tr>"
                   for label, s in (("all", ""), ("things", "_th"), ("stuff", "_st")))
    heads = "".join(f"<th>{m} {esc(champion.label)}</th><th>{m} {esc(challenger.label)}</th><th>Δ</th>"
                    for m in ("PQ", "SQ", "RQ"))
    cards = []
    for r in images:
        figures = "".join(
            f"<figure><img src='{png_data_uri(arr)}' alt='{esc(cap)}'><figcaption>{esc(cap)}</figcaption></figure>"
            if arr is not None else f"<figure class='missing'><figcaption>{esc(cap)}: prediction not written "
                                    f"(evaluate with write_predictions)</figcaption></figure>"
            for cap, arr in r["pictures"])
        cards.append(f"<div class='card'><h3>image {r['image_id']} ({esc(r['file_name'])}): PQ "
                     f"{_pct(r['champion'])} → {_pct(r['challenger'])} ({_signed(r['delta'])})</h3>"
                     f"<div class='row'>{figures}</div></div>")
    info = "".join(f"<li><b>{esc(str(k))}</b>: {esc(str(v))}</li>" for k, v in facts.items())
    gains = sum(d["delta"] > 0 for d in deltas)
    drops = sum(d["delta"] < 0 for d in deltas)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Gate: {esc(challenger.label)} vs {esc(champion.label)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; margin: 8px 0 20px; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
td.up {{ color: #1a7f37; font-weight: 600; }} td.down {{ color: #c62828; font-weight: 600; }}
.verdict {{ font-size: 17px; padding: 8px 12px; background: #f3f6fa; border-left: 5px solid #4a78b5; }}
.row {{ display: flex; gap: 8px; flex-wrap: wrap; }}
figure {{ margin: 0; }} figcaption {{ font-size: 12px; color: #555; text-align: center; }}
figure.missing {{ width: 200px; border: 1px dashed #bbb; display: flex; align-items: center; }}
.card {{ border-top: 1px solid #ddd; padding-top: 8px; margin-top: 12px; }}
h3 {{ font-size: 15px; margin: 4px 0; }}
img {{ max-width: 100%; height: auto; }}
.note {{ color: #555; font-size: 14px; }}
</style></head><body>
<h1>{esc(challenger.label)} vs {esc(champion.label)}</h1>
<p class="verdict">{esc(verdict) or "no gate decision recorded"}</p>
<ul>{info}<li><b>validation images</b>: {challenger.metrics.get('images')} (the same samples for both:
digest {esc(str(challenger.metrics.get('val_samples_digest'))[:12])})</li></ul>
<h2>Panoptic Quality</h2>
<table><tr><th></th>{heads}</tr>{rows}</table>
<h2>Per-category PQ change</h2>
<p class="note">{len(deltas)} categories present in the ground truth or either prediction: {gains} better,
{drops} worse, {len(deltas) - gains - drops} unchanged; categories in neither are left out.</p>
{delta_chart(deltas)}
<h2>Where the two disagree most</h2>
<p class="note">The {len(images)} validation images with the largest per-image PQ difference
(|challenger − champion|, from each evaluation's {PER_IMAGE_FILE}), largest first{
"" if images else ": none, both models score every image alike"}.</p>
{''.join(cards)}
</body></html>
"""


def no_champion_page(name: str, version: str, metrics: dict, reason: str) -> str:
    """gate.html when there is no champion to compare with (the first version)."""
    esc = html.escape
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Gate: {esc(name)} v{esc(str(version))}"
            f"</title></head><body style='font-family: system-ui, sans-serif; margin: 24px'>"
            f"<h1>{esc(name)} version {esc(str(version))}: no champion to compare with</h1>"
            f"<p>{esc(reason)}</p><p>PQ {_pct(metrics.get('PQ'))}, SQ {_pct(metrics.get('SQ'))}, RQ "
            f"{_pct(metrics.get('RQ'))} on {metrics.get('images')} validation images. The next version's gate "
            f"report compares it with this one.</p></body></html>\n")
