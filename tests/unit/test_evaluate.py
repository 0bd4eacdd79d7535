"""`evaluate` overlaps PQ counting and PNG writing with inference on threads: its results must
not depend on how many threads do that work."""

import filecmp
import json
import os

from components.evaluate.core import EvaluateSettings, evaluate
from components.train.trainer import train
from tests.training import make_shards, micro_config


def test_threaded_postprocessing_gives_the_same_metrics_and_files(synth_root, tmp_path):
    shards = make_shards(synth_root, str(tmp_path / "train"))
    val = make_shards(synth_root, str(tmp_path / "val"), split="val2017")
    model = train(micro_config(solver={"max_iter": 2}), shards, str(tmp_path / "run"), progress=False).model_uri
    runs = {}
    for workers in (0, 4):  # 0: in the loop, one image after another
        out = str(tmp_path / f"eval{workers}")
        m = evaluate(model, val, out, EvaluateSettings(batch_size=2, post_workers=workers, report_samples=3),
                     progress=False).metrics
        runs[workers] = (out, m)
    (a, ma), (b, mb) = runs[0], runs[4]
    assert ma["images"] == mb["images"] > 0
    assert ma["results"] == mb["results"] and ma["counts"] == mb["counts"]
    assert mb["timing"]["loop_s"] > 0
    pngs = sorted(os.listdir(os.path.join(a, "predictions", "panoptic_val")))
    assert len(pngs) == ma["images"]
    _, mismatch, errors = filecmp.cmpfiles(os.path.join(a, "predictions", "panoptic_val"),
                                           os.path.join(b, "predictions", "panoptic_val"), pngs, shallow=False)
    assert not mismatch and not errors
    ja = json.load(open(os.path.join(a, "predictions", "panoptic_val.json")))
    jb = json.load(open(os.path.join(b, "predictions", "panoptic_val.json")))
    assert ja == jb  # same annotations, in the same (sample) order


def test_pairs_counted_on_the_inference_device_give_the_hosts_metrics(synth_root, tmp_path):
    """On CUDA evaluate counts (gt, pred) pixel pairs where the prediction is (``device_pair_counts``);
    here the same path on the CPU's tensors: the metrics are the host path's, exactly."""
    shards = make_shards(synth_root, str(tmp_path / "train"))
    val = make_shards(synth_root, str(tmp_path / "val"), split="val2017")
    model = train(micro_config(solver={"max_iter": 2}), shards, str(tmp_path / "run"), progress=False).model_uri
    host, device = (evaluate(model, val, str(tmp_path / where), EvaluateSettings(pair_counts=where, report_samples=0),
                             progress=False).metrics for where in ("host", "device"))
    assert host["results"] == device["results"] and host["counts"] == device["counts"] and host["images"] > 0
