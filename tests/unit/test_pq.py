import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from components.common.coco_panoptic import encode_png
from components.common.pq import PQStat
from components.evaluate.pq_files import pq_compute, pq_files
from components.evaluate.prediction_files import PredictionError
from tests.predictions import MODES, write_predictions

ENGINES = ("numpy", "hotcoco")


def score(engine, *args, workers=1):
    """Our numpy engine (also inside `panoptic evaluate`), or `panoptic pq`'s path with hotcoco's."""
    return pq_compute(*args, workers=workers) if engine == "numpy" else pq_files(*args, use="hotcoco")


def reference(gt_json, pred_json, gt_dir, pred_dir):
    from panopticapi.evaluation import pq_compute as ref
    with contextlib.redirect_stdout(io.StringIO()):
        return ref(gt_json, pred_json, gt_folder=gt_dir, pred_folder=pred_dir)


def assert_same(ours, ref):
    for name in ("All", "Things", "Stuff"):
        assert ours[name]["n"] == ref[name]["n"], name
        for k in ("pq", "sq", "rq"):
            assert abs(ours[name][k] - ref[name][k]) <= 1e-9, (name, k, ours[name][k], ref[name][k])
    assert set(ours["per_class"]) == set(ref["per_class"])
    for cat, r in ref["per_class"].items():
        for k in ("pq", "sq", "rq"):
            assert abs(ours["per_class"][cat][k] - r[k]) <= 1e-9, (cat, k)


def _gt(root, split="val2017"):
    return (os.path.join(root, "annotations", f"panoptic_{split}.json"),
            os.path.join(root, "annotations", f"panoptic_{split}"))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", MODES)
def test_equals_panopticapi(synth_root, tmp_path, mode, engine):
    gt_json, gt_dir = _gt(synth_root)
    pred_json, pred_dir = write_predictions(synth_root, "val2017", str(tmp_path), mode, seed=11)
    ours = score(engine, gt_json, pred_json, gt_dir, pred_dir)
    ref = reference(gt_json, pred_json, gt_dir, pred_dir)
    assert_same(ours, ref)
    if mode == "perfect":
        assert ours["All"]["pq"] == 1.0
    if mode == "empty":
        assert ours["All"]["pq"] == 0.0
    if mode != "perfect":
        assert ours["All"]["pq"] < 1.0
    # more processes, same numbers
    assert_same(score(engine, gt_json, pred_json, gt_dir, pred_dir, workers=2), ref)


@pytest.mark.parametrize("engine", ENGINES)
def test_train_split_with_many_sizes_and_crowds(synth_root, tmp_path, engine):
    gt_json, gt_dir = _gt(synth_root, "train2017")
    pred_json, pred_dir = write_predictions(synth_root, "train2017", str(tmp_path), "mixed", seed=5)
    assert_same(score(engine, gt_json, pred_json, gt_dir, pred_dir), reference(gt_json, pred_json, gt_dir, pred_dir))


def _one_image(tmp_path, gt_png, gt_segs, pred_png, pred_segs, cats):
    for name, png, segs in (("gt", gt_png, gt_segs), ("pred", pred_png, pred_segs)):
        os.makedirs(tmp_path / name, exist_ok=True)
        (tmp_path / name / "1.png").write_bytes(encode_png(png))
        (tmp_path / f"{name}.json").write_text(json.dumps({
            "annotations": [{"image_id": 1, "file_name": "1.png", "segments_info": segs}], "categories": cats}))
    return str(tmp_path / "gt.json"), str(tmp_path / "pred.json"), str(tmp_path / "gt"), str(tmp_path / "pred")


CATS = [{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "b", "isthing": 1},
        {"id": 92, "name": "s", "isthing": 0}]


@pytest.mark.parametrize("engine", ENGINES)
def test_iou_boundary_void_and_crowd_rules(tmp_path, engine):
    gt = np.zeros((12, 20), np.uint32)
    gt[:10, :10] = 5          # thing, 100 px
    gt[:10, 10:18] = 6        # crowd of category 1, 80 px
    gt[:10, 18:] = 0          # VOID, 20 px
    gt[10:] = 3               # stuff, 40 px (panopticapi divides by zero without one)
    pred = np.zeros_like(gt)
    pred[:10, :6] = 7         # IoU 60/100 with 5 -> match
    pred[:10, 6:10] = 8       # unmatched cat 1 on GT thing -> FP
    pred[:10, 10:19] = 9      # cat 1 on crowd + VOID -> ignored (not FP)
    pred[10:] = 4
    gt_segs = [{"id": 5, "category_id": 1, "iscrowd": 0, "area": 100},
               {"id": 6, "category_id": 1, "iscrowd": 1, "area": 80},
               {"id": 3, "category_id": 92, "iscrowd": 0, "area": 40}]
    pred_segs = [{"id": 7, "category_id": 1}, {"id": 8, "category_id": 1}, {"id": 9, "category_id": 1},
                 {"id": 4, "category_id": 92}]
    args = _one_image(tmp_path, gt, gt_segs, pred, pred_segs, CATS)
    ours, ref = score(engine, *args), reference(*args)
    assert_same(ours, ref)
    assert ours["per_class"][1]["rq"] == pytest.approx(1 / 1.5)  # 1 TP, 1 FP
    # exactly IoU 0.5 is not a match (strictly greater), as in panopticapi
    pred2 = np.zeros_like(gt)
    pred2[:10, :5] = 7
    pred2[10:] = 4
    args = _one_image(tmp_path, gt, gt_segs, pred2, [{"id": 7, "category_id": 1}, {"id": 4, "category_id": 92}], CATS)
    ours = score(engine, *args)
    assert ours["per_class"][1]["pq"] == 0.0
    assert_same(ours, reference(*args))


@pytest.mark.parametrize("case,match", [
    ("png_id_not_in_json", r"image with ID 1 segment with ID 9 is presented in PNG and not presented in JSON"),
    ("json_id_not_in_png", r"image with ID 1 the following segment IDs \[44\] are presented in JSON"),
    ("unknown_category", r"image with ID 1 segment with ID 7 has unknown category_id 3"),
    ("duplicate_ids", r"image with ID 1 segment IDs \[7\] are listed more than once"),
    ("wrong_size", r"image with ID 1 the prediction is 10x19 \(HxW\) but the ground truth is 10x20"),
    ("missing_png", r"image with ID 1 the prediction PNG .*1.png does not exist"),
    ("no_prediction", r"no prediction for the image with id: 1"),
])
@pytest.mark.parametrize("engine", ENGINES)
def test_bad_predictions_name_the_image(tmp_path, case, match, engine):
    gt = np.full((10, 20), 5, np.uint32)
    gt_segs = [{"id": 5, "category_id": 1, "iscrowd": 0, "area": 200}]
    pred = np.full((10, 20), 7, np.uint32)
    segs = [{"id": 7, "category_id": 1}]
    if case == "png_id_not_in_json":
        pred[0, 0] = 9
    elif case == "json_id_not_in_png":
        segs.append({"id": 44, "category_id": 1})
    elif case == "unknown_category":
        segs = [{"id": 7, "category_id": 3}]
    elif case == "duplicate_ids":
        segs = segs * 2
    elif case == "wrong_size":
        pred = pred[:, :19]
    args = _one_image(tmp_path, gt, gt_segs, pred, segs, CATS)
    if case == "missing_png":
        os.remove(tmp_path / "pred" / "1.png")
    if case == "no_prediction":
        (tmp_path / "pred.json").write_text(json.dumps({"annotations": [], "categories": CATS}))
    with pytest.raises(PredictionError, match=match if engine == "numpy" or case in ("duplicate_ids", "no_prediction")
                       else r"image (with ID )?1\b|1\.png"):
        score(engine, *args)


def test_pq_cli_json_shape(synth_root, tmp_path):
    gt_json, gt_dir = _gt(synth_root)
    pred_json, pred_dir = write_predictions(synth_root, "val2017", str(tmp_path), "mixed", seed=2)
    out = subprocess.run([sys.executable, "-m", "components.cli", "pq", "--gt-json", gt_json, "--gt-dir", gt_dir,
                          "--pred-json", pred_json, "--pred-dir", pred_dir, "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert set(res) == {"All", "Things", "Stuff", "per_class"}
    assert set(res["All"]) == {"pq", "sq", "rq", "n"}
    ref = reference(gt_json, pred_json, gt_dir, pred_dir)
    assert abs(res["All"]["pq"] - ref["All"]["pq"]) <= 1e-9
    assert {int(k) for k in res["per_class"]} == set(ref["per_class"])
    table = subprocess.run(out.args[:-1], capture_output=True, text=True)
    assert "Things" in table.stdout and "PQ" in table.stdout
    bad = subprocess.run(out.args[:-1] + ["--pred-dir", str(tmp_path / "nope")], capture_output=True, text=True)
    assert bad.returncode == 1 and "does not exist" in bad.stderr


def test_stat_merging_adds_up():
    a, b = PQStat(), PQStat()
    a[1].tp, a[1].iou, b[1].fp, b[2].fn = 2, 1.5, 1, 3
    a += b
    assert (a[1].tp, a[1].fp, a[2].fn, a[1].iou) == (2, 1, 3, 1.5)


@pytest.mark.parametrize("mode", MODES)
def test_device_pair_counting_equals_panopticapi(synth_root, tmp_path, mode):
    """The pair counting that runs on the inference device (torch integer ops; here the CPU,
    the same code on a GPU) gives the numpy path's pairs and panopticapi's PQ."""
    import torch

    from components.common.coco_panoptic import decode_png
    from components.common.pq import device_pair_counts, pair_counts

    gt_json, gt_dir = _gt(synth_root)
    pred_json, pred_dir = write_predictions(synth_root, "val2017", str(tmp_path), mode, seed=11)
    gt, pred = json.load(open(gt_json)), json.load(open(pred_json))
    categories = {c["id"]: c for c in gt["categories"]}
    preds = {a["image_id"]: a for a in pred["annotations"]}
    stat = PQStat()
    for ann in gt["annotations"]:
        p = preds[ann["image_id"]]
        gt_ids = decode_png(open(os.path.join(gt_dir, ann["file_name"]), "rb").read(), ann["file_name"])
        pred_ids = decode_png(open(os.path.join(pred_dir, p["file_name"]), "rb").read(), p["file_name"])
        keys, counts = device_pair_counts(torch.from_numpy(gt_ids.astype(np.int64)),
                                          torch.from_numpy(pred_ids.astype(np.int64)))
        ref_keys, ref_counts = pair_counts(gt_ids, pred_ids)
        assert np.array_equal(keys, ref_keys) and np.array_equal(counts, ref_counts)
        stat.add_pairs(ann["image_id"], keys, counts, ann["segments_info"], p["segments_info"], categories)
    assert_same(stat.results(categories), reference(gt_json, pred_json, gt_dir, pred_dir))
