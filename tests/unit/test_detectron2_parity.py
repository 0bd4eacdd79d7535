"""Our Panoptic FPN against golden outputs of a real detectron2 build (no detectron2 needed).

``tests/fixtures/detectron2/README.md`` says how the golden files were made. The weights are
regenerated here from their seed, saved as a model-zoo ``.pkl`` and loaded the way a user
loads one (``model.weights`` -> ``load_weights``); the photos go through our own test-time
resize. Bounds per image: see ``test_inference_matches_detectron2``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from components.common.coco_panoptic import Category, CategoryMaps
from components.model.config import load_config
from components.model.panoptic_fpn import PanopticFPN
from components.model.weights import load_weights
from tests import detectron2_parity as P
from tests.detectron2_weights import FIXTURES, write_model_zoo_pkl

pytestmark = pytest.mark.slow

COCO_LIKE = CategoryMaps(tuple(Category(i + 1, f"thing{i}", True) for i in range(80)) +
                         tuple(Category(100 + i, f"stuff{i}", False) for i in range(53)))


def _model(tmp_path_factory, config: str, depth: int) -> PanopticFPN:
    path = write_model_zoo_pkl(str(tmp_path_factory.mktemp("weights") / f"panoptic_fpn_r{depth}.pkl"), depth)
    torch.manual_seed(0)
    model = PanopticFPN.from_config(load_config(config), COCO_LIKE)
    report = load_weights(model, path)
    assert not report.fresh and not report.reinitialized and not report.dropped  # every tensor, both ways
    return model.eval()


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    return _model(tmp_path_factory, "r50_1x", 50)


def _check(ref: dict, ours: dict) -> dict:
    r = P.compare(ref, ours)
    assert r["resize_equal"], "our test-time resize differs from detectron2's ResizeShortestEdge"
    assert r["anchors_max_diff"] <= 1e-4, r
    assert r["proposals_matched_099"] >= 0.99, r
    assert r["sem_rel_diff"] <= 1e-4, r
    n_ref, n_ours, n_matched = r["detections"]
    assert n_ref == n_ours == n_matched, r
    assert r["box_max_diff"] <= 0.01 and r["score_max_diff"] <= 1e-4, r
    # every matched mask at IoU >= 0.99 with detectron2's, or (a small one) a few pixels apart:
    # the golden files were made on another CPU (see PIXELS_AT_THRESHOLD)
    assert r["masks_apart"] == 0, r
    assert r["panoptic_agree"] >= 0.999, r
    assert r["segments_same"] and r["segments_apart"] == 0, r
    return r


@pytest.mark.parametrize("photo", P.PHOTOS)
def test_inference_matches_detectron2(r50, photo):
    ref = P.unpack(np.load(P.golden_path("r50", photo)))
    # the fixture itself is worth comparing: confident detections, things and stuff in the fusion
    assert (ref["scores"] >= 0.5).sum() >= 50
    assert sum(s["isthing"] for s in ref["segments"]) >= 20 and sum(not s["isthing"] for s in ref["segments"]) >= 4
    _check(ref, P.run_ours(r50, P.load_photo(photo)))


def test_r101_inference_matches_detectron2(tmp_path_factory):
    model = _model(tmp_path_factory, "r101_3x", 101)
    ref = P.unpack(np.load(P.golden_path("r101", "chelsea")))
    _check(ref, P.run_ours(model, P.load_photo("chelsea")))


def test_training_losses_match_detectron2(r50):
    """Same batch, same seeds before the RPN and the RoI heads (both draw their samples with one
    randperm per image and sign, in the same order), detectron2's proposals into our RoI heads."""
    golden = np.load(f"{FIXTURES}/train_r50.npz")
    theirs = json.loads(str(golden["losses"]))
    proposals = [golden[f"proposals_{i}"] for i in range(len(P.TRAIN_PHOTOS))]
    ours, our_proposals = P.train_losses_ours(r50, P.training_batch(), proposals)
    r50.eval()
    assert set(ours) == set(theirs) == {"loss_sem_seg", "loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg",
                                        "loss_mask"}
    for k in theirs:
        assert ours[k] == pytest.approx(theirs[k], rel=1e-5), (k, ours[k], theirs[k])
    for ref, mine in zip(proposals, our_proposals):  # the RPN's training-mode proposals agree too
        assert (P._iou_matrix(ref, mine).max(1) >= 0.99).mean() >= 0.99
