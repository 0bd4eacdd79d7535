"""report.html and `pq --per-class` for a reader: the chart fits the page and follows the categories
present; categories in neither set say "not present" instead of a PQ of 0; an image with no
predicted segment says so."""

import io

import numpy as np
from PIL import Image

from components.evaluate.report import CHART_DPI, CHART_WIDTH_IN, per_class_chart, render_report
from components.evaluate.tables import format_table


def coco_like(n_present: int, n_total: int = 133):
    cats = {i: {"id": i, "name": f"category-{i}", "isthing": int(i < 80), "color": [i, 2 * i % 255, 90]}
            for i in range(1, n_total + 1)}
    rng = np.random.default_rng(0)
    per_class = {}
    for i in cats:
        if i <= n_present:
            tp = int(rng.integers(1, 9))
            per_class[i] = {"pq": float(rng.uniform(0.1, 0.9)), "sq": 0.8, "rq": 0.6, "tp": tp, "fp": 1, "fn": 2}
        else:
            per_class[i] = {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 0, "fn": 0}
    summary = {"pq": 0.5, "sq": 0.8, "rq": 0.6, "n": n_present}
    return cats, {"All": summary, "Things": summary, "Stuff": summary, "per_class": per_class}


def _size(png: bytes):
    return Image.open(io.BytesIO(png)).size


def test_chart_is_page_wide_at_most_and_grows_with_the_categories_present():
    w133, h133 = _size(per_class_chart(*reversed(coco_like(133))))
    w100, h100 = _size(per_class_chart(*reversed(coco_like(100))))
    w5, h5 = _size(per_class_chart(*reversed(coco_like(5))))
    assert w133 == w100 == w5 == CHART_WIDTH_IN * CHART_DPI <= 1000  # fits a 1400 px window with margins
    assert h5 < h100 < h133
    assert abs((h133 - h100) / 33 - (h100 - h5) / 95) < 1.0  # one fixed row height per category present


def test_absent_categories_are_not_present_not_zero_and_empty_predictions_are_noted():
    cats, results = coco_like(6, 20)
    sample = {"image_id": 7, "file_name": "x.jpg", "pq": 0.0, "predicted_segments": 0,
              "image": np.zeros((8, 8, 3), np.uint8), "gt_overlay": np.zeros((8, 8, 3), np.uint8),
              "pred_overlay": np.zeros((8, 8, 3), np.uint8)}
    page = render_report(title="t", results=results, categories=cats, samples=[sample])
    assert page.count("not present (in neither the ground truth nor the predictions)") == 14
    assert "14 categories" in page and "No segment was predicted in this image" in page
    assert "img { max-width: 100%; height: auto; }" in page
    table = format_table(results, cats)
    absent_rows = [line for line in table.splitlines() if "not present" in line]
    assert len(absent_rows) == 14 and all("0.00" not in line for line in absent_rows)
    assert table.splitlines()[-1].endswith("not present")  # absent categories come last
