"""Box AP and mask AP beside PQ (components/evaluate/coco_ap.py): the thing segments of the panoptic
ground truth as COCO instances, the model's detections as COCO results, and the figures equal to
pycocotools' own COCOeval on the same files, both on constructed detections (a nontrivial AP) and
on the files the evaluate stage writes for a trained model."""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch

from components.common.coco_panoptic import CategoryMaps
from components.data.reader import ShardDataset
from components.data.records import load_index
from components.evaluate import coco_ap
from components.evaluate.core import EvaluateSettings, evaluate
from components.model.config import load_config
from components.train.trainer import train
from tests.training import make_shards, micro_config

pycocotools = pytest.importorskip("pycocotools")   # requirements-dev.txt: the reference


def _pycocotools(gt: dict, dets: list[dict]) -> dict:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = json.loads(json.dumps(gt))
        coco.createIndex()
        for kind, iou_type in coco_ap.IOU_TYPES:
            ev = COCOeval(coco, coco.loadRes(json.loads(json.dumps(dets))), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            for k, v in zip(coco_ap.AP_KEYS, ev.stats[:6]):
                out[f"{k}_{kind}"] = float(v) if v >= 0 else None
    return out


@pytest.fixture(scope="module")
def val(synth_root, tmp_path_factory):
    return make_shards(synth_root, str(tmp_path_factory.mktemp("ap")), split="val2017")


def _samples(val: str):
    cats = CategoryMaps.from_json(load_index(val)["categories"])
    data = ShardDataset(val, cats, load_config("tiny").input, train=False, with_gt=True, rank=0, world_size=1)
    return cats, list(data)


def test_the_ground_truth_is_every_thing_segment_as_an_instance(val):
    cats, samples = _samples(val)
    for s in samples:
        gt = coco_ap.ground_truth(s["image_id"], s["gt_ids"], s["segments_info"], cats.thing_ids)
        things = [seg for seg in s["segments_info"] if cats.is_thing(seg["category_id"])]
        assert len(gt) == len(things)
        for a, seg in zip(gt, things):
            from pycocotools import mask

            assert mask.area(a["segmentation"]) == int((s["gt_ids"] == seg["id"]).sum()) == a["area"]
            assert a["iscrowd"] == seg.get("iscrowd", 0) and a["bbox"] == [float(v) for v in seg["bbox"]]


def test_constructed_detections_score_as_pycocotools_scores_them(val):
    cats, samples = _samples(val)
    rng = np.random.default_rng(7)
    images, gts, dets = [], [], []
    for s in samples:
        h, w = s["gt_ids"].shape
        images.append({"id": s["image_id"], "height": h, "width": w, "file_name": s["file_name"]})
        gts += coco_ap.ground_truth(s["image_id"], s["gt_ids"], s["segments_info"], cats.thing_ids)
        boxes, scores, classes, masks = [], [], [], []
        for seg in s["segments_info"]:
            if not cats.is_thing(seg["category_id"]) or rng.random() < 0.2:   # some missed
                continue
            m = np.roll(s["gt_ids"] == seg["id"], int(rng.integers(-3, 4)), axis=int(rng.integers(2)))
            x, y, bw, bh = seg["bbox"]
            j = rng.normal(0, 2, 4)
            boxes.append([x + j[0], y + j[1], x + bw + j[2], y + bh + j[3]])
            cls = cats.thing_contiguous(seg["category_id"])
            classes.append(cls if rng.random() > 0.15 else int(rng.integers(cats.num_things)))   # some mislabelled
            scores.append(float(rng.random()))
            masks.append(m)
        for _ in range(2):   # false positives
            x, y = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            m = np.zeros((h, w), bool)
            m[y:y + 20, x:x + 20] = True
            boxes.append([x, y, x + 20, y + 20])
            classes.append(int(rng.integers(cats.num_things)))
            scores.append(float(rng.random()))
            masks.append(m)
        instances = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                     "scores": torch.tensor(scores), "classes": torch.tensor(classes, dtype=torch.int64),
                     "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.bool)}
        dets += coco_ap.detections(s["image_id"], instances, cats.thing_ids)
    doc = coco_ap.gt_document(images, gts, {c["id"]: c for c in cats.to_json()})
    ours, theirs = coco_ap.coco_ap(doc, dets), _pycocotools(doc, dets)
    assert 0.2 < ours["AP_box"] < 0.95 and 0.2 < ours["AP_mask"] < 0.95   # a figure worth comparing
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert (ours[k] is None) == (theirs[k] is None), k
        if ours[k] is not None:
            assert ours[k] == pytest.approx(theirs[k], abs=1e-9), k


def test_the_evaluate_stage_reports_pycocotools_ap_for_its_own_files(synth_root, val, tmp_path):
    shards = make_shards(synth_root, str(tmp_path / "train"))
    model = train(micro_config(solver={"max_iter": 4}, model={"roi_score_thresh_test": 0.0}), shards,
                  str(tmp_path / "run"), progress=False).model_uri
    m = evaluate(model, val, str(tmp_path / "ev"), EvaluateSettings(report_samples=0), progress=False).metrics
    pred = tmp_path / "ev" / "predictions"
    gt, dets = json.load(open(pred / coco_ap.GT_FILE)), json.load(open(pred / coco_ap.RESULTS_FILE))
    assert dets and len({d["image_id"] for d in dets}) > 1
    assert {i["id"] for i in gt["images"]} == {d["image_id"] for d in json.load(open(pred / "panoptic_val.json"))
                                               ["annotations"]}
    theirs = _pycocotools(gt, dets)
    for k in coco_ap.metric_names():
        assert (m[k] is None) == (theirs[k] is None), k
        if m[k] is not None:
            assert m[k] == pytest.approx(theirs[k], abs=1e-9), k
    assert "box AP / mask AP" in open(tmp_path / "ev" / "report.html").read()
    off = evaluate(model, val, str(tmp_path / "off"), EvaluateSettings(report_samples=0, coco_ap=False),
                   progress=False).metrics
    assert "AP_box" not in off and off["PQ"] == m["PQ"]
    assert not os.path.exists(tmp_path / "off" / "predictions" / coco_ap.GT_FILE)
