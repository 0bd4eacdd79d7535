"""The weights a training run starts from, as a first-time user gets them: detectron2's ImageNet
ResNets by their real address for the R50/R101 configs, the model zoo's COCO Panoptic FPN for
``train.init=coco`` (its heads' rows picked for the data's categories), the pixel format and
statistics of whatever weights are chosen, and no frozen layer left random."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import urllib.request

import numpy as np
import pytest
import torch

from components.common.coco_panoptic import Category, CategoryMaps
from components.model import weights
from components.model.panoptic_fpn import PanopticFPN
from components.synthetic.generator import CATEGORIES
from components.train.settings import COCO_PANOPTIC, TrainSettings, resolve_config
from tests.detectron2_weights import _draw, detectron2_keys

BGR_MSRA = ("BGR", (103.53, 116.28, 123.675), (1.0, 1.0, 1.0))
RGB_IMAGENET = ("RGB", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))


def _pixels(cfg):
    return cfg.model.input_format, tuple(cfg.model.pixel_mean), tuple(cfg.model.pixel_std)


@pytest.mark.parametrize("config,address", [("r50_1x", "ImageNetPretrained/MSRA/R-50.pkl"),
                                            ("r50_3x", "ImageNetPretrained/MSRA/R-50.pkl"),
                                            ("r101_3x", "ImageNetPretrained/MSRA/R-101.pkl")])
def test_the_cluster_configs_start_from_detectrons_imagenet_weights_in_their_pixel_format(config, address):
    cfg = resolve_config(TrainSettings(config=config))
    assert cfg.model.weights == "detectron2://" + address and _pixels(cfg) == BGR_MSRA
    assert cfg.model.freeze_at == 2 and cfg.model.backbone_norm == "FrozenBN"   # frozen, but not random
    imagenet = resolve_config(TrainSettings(config=config, init="imagenet"))
    assert imagenet.model.weights.startswith("torchvision:") and _pixels(imagenet) == RGB_IMAGENET
    coco = resolve_config(TrainSettings(config=config, init="coco"))
    assert coco.model.weights == COCO_PANOPTIC[cfg.model.backbone] and _pixels(coco) == BGR_MSRA
    assert coco.model.weights.startswith("detectron2://COCO-PanopticSegmentation/panoptic_fpn_R_")
    # said pixel values win over the weights' (the user's word)
    said = resolve_config(TrainSettings(config=config, init="imagenet", overrides={"model.pixel_std": [1, 1, 1]}))
    assert tuple(said.model.pixel_std) == (1, 1, 1)


@pytest.mark.parametrize("settings", [TrainSettings(config="r50_1x", init="scratch"),
                                      TrainSettings(config="r101_3x", init="scratch"),
                                      TrainSettings(config="r50_1x", overrides={"model.weights": ""})])
def test_frozen_layers_from_random_weights_are_refused_naming_the_fix(settings):
    with pytest.raises(ValueError, match=r"no initial weights, but model.freeze_at=2 .* would stay random.*"
                                         r"train.init=imagenet.*r50_scratch_gn_3x"):
        resolve_config(settings)


def test_scratch_is_for_configs_that_learn_every_layer():
    assert resolve_config(TrainSettings(config="r50_scratch_gn_3x")).model.weights == ""
    assert resolve_config(TrainSettings(config="tiny", init="scratch")).model.weights == ""
    assert resolve_config(TrainSettings(config="r50_1x", init="scratch", overrides={
        "model.freeze_at": 0, "model.backbone_norm": "GN"})).model.weights == ""


def test_a_frozen_random_config_is_refused_before_any_task_starts():
    import click

    from pipeline.cli import pipeline_arguments

    with pytest.raises(click.BadParameter, match="would stay random"):
        pipeline_arguments(["train.config=r50_1x", "train.init=scratch"])


def test_a_detectron2_address_is_fetched_from_its_real_url_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PANOPTIC_CACHE", str(tmp_path))
    asked = []

    def offline(url, timeout=None):
        asked.append(url)
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    url = "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/R-50.pkl"
    with pytest.raises(OSError, match=rf"cannot download {url} .*--set train.init=PATH.*or put the file at "
                                      rf"{tmp_path}"):
        weights.fetch("detectron2://ImageNetPretrained/MSRA/R-50.pkl")
    assert asked == [url]
    cached = tmp_path / (hashlib.sha256(url.encode()).hexdigest()[:16] + "-R-50.pkl")
    cached.write_bytes(b"cached bytes")
    assert weights.fetch("detectron2://ImageNetPretrained/MSRA/R-50.pkl") == b"cached bytes"
    assert asked == [url]   # no second download


HEAD_KEYS = ("roi_heads.box_predictor.cls_score.", "roi_heads.box_predictor.bbox_pred.",
             "roi_heads.mask_head.predictor.", "sem_seg_head.predictor.", "proposal_generator.rpn_head.conv.")


def _small_zoo_checkpoint(path) -> dict[str, np.ndarray]:
    """The model zoo's format (a pickle of {"model": {detectron2 name: array}}) with COCO's 133
    categories, holding only the class-dependent heads and the RPN's conv: the rest of the model
    is left fresh, which the loader allows."""
    state = {k: _draw(k, shape, 7) for k, shape in detectron2_keys(50).items() if k.startswith(HEAD_KEYS)}
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 81
    assert state["sem_seg_head.predictor.weight"].shape[0] == 54
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f)
    return state


def test_init_coco_loads_the_zoo_checkpoint_into_the_datas_categories(tmp_path, monkeypatch, caplog):
    cfg = resolve_config(TrainSettings(config="r50_1x", init="coco"))
    url = weights.DETECTRON2_PREFIX + cfg.model.weights[len("detectron2://"):]
    monkeypatch.setenv("PANOPTIC_CACHE", str(tmp_path))   # the zoo file "downloaded" once, as the cache keeps it
    zoo = _small_zoo_checkpoint(tmp_path / (hashlib.sha256(url.encode()).hexdigest()[:16] + "-" +
                                            os.path.basename(url)))
    categories = CategoryMaps(CATEGORIES)   # 6 things, 5 stuff: COCO ids
    model = PanopticFPN.from_config(cfg, categories)
    with caplog.at_level(logging.INFO, logger="components.model.weights"):
        report = weights.load_weights(model, cfg.model.weights, categories)
    assert "picked for this data's 6 thing and 5 stuff categories" in caplog.text
    own = model.state_dict()
    things = [weights.COCO_THING_IDS.index(c) for c in categories.thing_ids]
    stuff = [0] + [1 + weights.COCO_STUFF_IDS.index(c) for c in categories.stuff_ids]
    name = "roi_heads.box_predictor.cls_score.weight"
    assert torch.equal(own[name], torch.as_tensor(zoo[name][things + [80]]))   # and the background row
    name = "roi_heads.box_predictor.bbox_pred.weight"
    assert torch.equal(own[name], torch.as_tensor(zoo[name][[4 * t + k for t in things for k in range(4)]]))
    name = "roi_heads.mask_head.predictor.weight"
    assert torch.equal(own[name], torch.as_tensor(zoo[name][things]))
    name = "sem_seg_head.predictor.bias"
    assert torch.equal(own[name], torch.as_tensor(zoo[name][stuff]))
    assert not report.reinitialized and len(report.loaded) == len(zoo)

    # categories that are not COCO's: the heads start fresh, said in the log
    foreign = CategoryMaps((Category(1, "disc", True, (1, 2, 3), "x"), Category(1001, "lava", False, (3, 2, 1), "x")))
    model = PanopticFPN.from_config(cfg, foreign)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="components.model.weights"):
        report = weights.load_weights(model, cfg.model.weights, foreign)
    assert "not COCO categories" in caplog.text and sorted(report.reinitialized) == sorted(
        k for k in zoo if k.startswith(weights.CLASS_DEPENDENT))
