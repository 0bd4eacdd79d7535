"""gate.html from two evaluations: its figures are the evaluations' own, its categories and
images are the ones that changed most, in order."""

from __future__ import annotations

import csv
import json
import os
import re

import pytest

from components.common import storage
from components.common.coco_panoptic import decode_png, encode_png
from components.common.hashing import samples_digest
from components.common.metrics import summary_metrics
from components.common.pq import PQStat
from components.data.records import load_index, shard_image_ids
from components.register.gate_report import (
    Evaluation,
    IncomparableEvaluations,
    build,
    category_deltas,
    read_per_image,
    read_samples,
)
from tests.training import make_shards


def fake_evaluation(shards: str, out: str, spoil=lambda image_id, seg: seg) -> dict:
    """What ``panoptic evaluate`` writes, for "predictions" that are the ground truth passed
    through ``spoil`` (segment -> segment, or None to drop it), scored by our PQ accumulator."""
    categories = {int(c["id"]): c for c in load_index(shards)["categories"]}
    ids = shard_image_ids(shards)
    rows = read_samples(shards, set(ids))
    stat, per_image, anns = PQStat(), [], []
    for image_id in ids:
        row = rows[image_id]
        gt = decode_png(row["panoptic_png"])
        segs = [dict(s) for s in row["segments_info"]]
        pred, info = gt.copy(), []
        for s in segs:
            new = spoil(image_id, dict(s))
            if new is None:
                pred[gt == s["id"]] = 0
            else:
                info.append(new)
        one = PQStat()
        one.add_image(image_id, gt, segs, pred, info, categories)
        stat += one
        per_image.append((image_id, row["file_name"], one.results(categories)["All"]["pq"]))
        stem = row["file_name"].rsplit(".", 1)[0]
        storage.write_bytes(os.path.join(out, "predictions", "panoptic_val", f"{stem}.png"), encode_png(pred))
        anns.append({"image_id": image_id, "file_name": f"{stem}.png", "segments_info": info})
    results = stat.results(categories)
    metrics = {**summary_metrics(results), "images": len(ids), "results": results,
               "counts": {str(k): v for k, v in stat.counts().items()}, "shards": shards,
               "val_samples_digest": samples_digest(load_index(shards).get("source_manifest_hash", ""), ids)}
    storage.write_text(os.path.join(out, "metrics.json"), json.dumps(metrics))
    storage.write_text(os.path.join(out, "predictions", "panoptic_val.json"), json.dumps({"annotations": anns}))
    with open(os.path.join(out, "per_image.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "file_name", "pq", "predicted_segments"])
        w.writerows((i, n, f"{q:.6f}", 0) for i, n, q in per_image)
    return metrics


@pytest.fixture(scope="module")
def two(synth_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gate")
    shards = make_shards(synth_root, str(tmp / "val"), split="val2017")
    ids = shard_image_ids(shards)
    spoiled = {ids[1]: None, ids[4]: "relabel"}   # the champion drops every segment of one image, mislabels another
    cats = sorted(int(c["id"]) for c in load_index(shards)["categories"])

    def champion(image_id, seg):
        if image_id not in spoiled:
            return seg
        if spoiled[image_id] is None:
            return None
        return {**seg, "category_id": next(c for c in cats if c != seg["category_id"])}

    a = fake_evaluation(shards, str(tmp / "champion"), champion)
    b = fake_evaluation(shards, str(tmp / "challenger"))
    return {"shards": shards, "a": a, "b": b, "tmp": tmp, "spoiled": spoiled, "ids": ids}


def test_the_report_shows_the_evaluations_figures_and_what_changed_most(two, tmp_path):
    champ = Evaluation.read(str(two["tmp"] / "champion"), "v1 (champion)")
    chall = Evaluation.read(str(two["tmp"] / "challenger"), "v2 (challenger)")
    out = str(tmp_path / "gate.html")
    built = build(champ, chall, two["shards"], out, verdict="Promoted: PQ 1.0000 beats 0.9", shown=4)
    assert built["summary"]["PQ"] == (two["a"]["PQ"], two["b"]["PQ"]) and two["b"]["PQ"] == 1.0
    page = open(out).read()
    for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert f"{100 * two['a'][k]:.2f}" in page and f"{100 * two['b'][k]:.2f}" in page
        assert f"{100 * (two['b'][k] - two['a'][k]):+.2f}" in page
    # images: the two the champion got wrong, first, with their per-image PQ from per_image.csv
    first = [r["image_id"] for r in built["images"][:2]]
    assert set(first) == set(two["spoiled"]) and all(r["delta"] > 0 for r in built["images"][:2])
    per_a = read_per_image(str(two["tmp"] / "champion" / "per_image.csv"))
    for r in built["images"]:
        assert r["champion"] == per_a[r["image_id"]][1] and r["challenger"] == 1.0
        assert [cap for cap, _ in r["pictures"]] == ["image", "ground truth", "v1 (champion)", "v2 (challenger)"]
        assert all(arr is not None and arr.ndim == 3 for _, arr in r["pictures"])
    deltas = [abs(r["delta"]) for r in built["images"]]
    assert deltas == sorted(deltas, reverse=True)
    assert len(built["images"]) == 2   # the others score alike: not shown
    assert page.count("<div class='card'>") == 2 and page.count("data:image/png;base64,") == 8
    # categories: every one present in either, sorted by change, equal to the per-class difference
    a, b = two["a"]["results"]["per_class"], two["b"]["results"]["per_class"]
    for d in built["categories"]:
        key = str(d["category_id"]) if str(d["category_id"]) in b else d["category_id"]
        assert d["delta"] == pytest.approx(b[key]["pq"] - a.get(key, {"pq": 0})["pq"])
    assert [d["delta"] for d in built["categories"]] == sorted((d["delta"] for d in built["categories"]), reverse=True)
    assert len(re.findall(r"\[(thing|stuff)\]", page)) == len(built["categories"])
    assert "Promoted: PQ 1.0000 beats 0.9" in page and "<script" not in page


def test_categories_in_neither_evaluation_are_left_out():
    cats = {1: {"name": "a", "isthing": 1}, 2: {"name": "b", "isthing": 0}, 3: {"name": "c", "isthing": 1}}
    absent = {"pq": 0.0, "tp": 0, "fp": 0, "fn": 0}
    one = {"results": {"per_class": {"1": {"pq": 0.5, "tp": 1, "fp": 1, "fn": 0}, "2": absent, "3": absent}}}
    two = {"results": {"per_class": {"1": {"pq": 0.25, "tp": 1, "fp": 2, "fn": 1}, "2": absent,
                                     "3": {"pq": 0.0, "tp": 0, "fp": 1, "fn": 0}}}}
    rows = category_deltas(one, two, cats)
    assert [(r["name"], r["delta"]) for r in rows] == [("c", 0.0), ("a", -0.25)]


def test_evaluations_of_different_images_are_refused(two, tmp_path):
    champ = Evaluation.read(str(two["tmp"] / "champion"), "v1")
    chall = Evaluation.read(str(two["tmp"] / "challenger"), "v2")
    chall.metrics = {**chall.metrics, "val_samples_digest": "0" * 64}
    with pytest.raises(IncomparableEvaluations, match="different validation samples"):
        build(champ, chall, two["shards"], str(tmp_path / "g.html"))
    assert not os.path.exists(tmp_path / "g.html")


@pytest.mark.parametrize("row, problem", [("5,x.jpg,nan,1", "out of 0..1"), ("5,x.jpg,1.5,1", "out of 0..1"),
                                          ("five,x.jpg,0.5,1", "must be numbers")])
def test_a_hostile_per_image_file_is_refused_naming_the_line(tmp_path, row, problem):
    p = tmp_path / "per_image.csv"
    p.write_text("image_id,file_name,pq,predicted_segments\n1,a.jpg,0.5,2\n" + row + "\n")
    with pytest.raises(ValueError, match=f"per_image.csv:3: .*{re.escape(problem)}"):
        read_per_image(str(p))

