"""The optimizer recipes (components/train/trainer.py: param_groups, build_optimizer, lr_factor):
each parameter's weight decay and LR factor as the published recipes set them, the cosine
schedule, and AdamW runs resuming to the same weights as an uninterrupted run."""

from __future__ import annotations

import math

import pytest
import torch

from components.common.coco_panoptic import Category, CategoryMaps
from components.model.config import ConfigError, load_config
from components.model.panoptic_fpn import PanopticFPN
from components.train.trainer import CheckpointError, build_optimizer, lr_factor, param_groups, train
from tests.training import load_state, make_shards, max_abs_diff, micro_config

CATS = CategoryMaps((Category(1, "a", True, (1, 0, 0), "thing"), Category(2, "b", False, (0, 1, 0), "stuff")))


def _settings(config: str) -> tuple[dict, object]:
    """{parameter name: (weight decay, LR factor)} of a built-in config's model, and the config."""
    cfg = load_config(config, {"model.weights": ""})
    model = PanopticFPN.from_config(cfg, CATS)
    by_id = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in param_groups(model, cfg):
        for p in g["params"]:
            out[by_id[id(p)]] = (g["weight_decay"], g["lr"] / cfg.solver.lr())
    assert set(out) == {n for n, p in model.named_parameters() if p.requires_grad}   # each once
    return out, cfg


def test_sgd_keeps_detectrons_two_groups():
    got, cfg = _settings("r50_1x")
    opt = build_optimizer(PanopticFPN.from_config(cfg, CATS), cfg)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]   # weights and biases; norms
    assert got["roi_heads.box_predictor.cls_score.bias"] == (1e-4, 1.0)   # WEIGHT_DECAY_BIAS = WEIGHT_DECAY
    assert got["sem_seg_head.p2.0.norm.weight"] == (0.0, 1.0)             # WEIGHT_DECAY_NORM = 0
    assert all(factor == 1.0 for _, factor in got.values())


def test_swin_t_follows_its_published_recipe():
    got, cfg = _settings("swin_t_3x")
    s = cfg.solver
    assert (s.optimizer, s.base_lr, s.weight_decay, tuple(s.betas)) == ("AdamW", 1e-4, 0.05, (0.9, 0.999))
    tables = [n for n in got if n.endswith("relative_position_bias_table")]
    assert tables and all(got[n][0] == 0.0 for n in tables)
    norms = [n for n in got if ".norm" in n and n.startswith("backbone.body")]
    assert norms and all(got[n][0] == 0.0 for n in norms)
    assert got["backbone.body.features.1.0.attn.qkv.weight"] == (0.05, 1.0)
    opt = build_optimizer(PanopticFPN.from_config(cfg, CATS), cfg)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999)


def test_convnext_t_decays_the_lr_layer_by_layer_as_its_recipe():
    got, cfg = _settings("convnext_t_3x")
    d = cfg.solver.layer_decay
    assert d == 0.95 and cfg.solver.base_lr == 1e-4
    assert got["backbone.body.features.0.0.weight"][1] == pytest.approx(d ** 7)     # the stem
    assert got["backbone.body.features.1.0.block.0.weight"][1] == pytest.approx(d ** 6)   # stage 1
    assert got["backbone.body.features.5.8.block.0.weight"][1] == pytest.approx(d ** 2)   # stage 3, block 9
    assert got["backbone.body.features.7.2.block.0.weight"][1] == pytest.approx(d ** 1)   # stage 4
    assert got["roi_heads.box_head.fc1.weight"][1] == 1.0                               # the heads
    # no decay on the 1-D parameters (biases, norms) and the layer scales; weights 0.05
    assert got["backbone.body.features.1.0.layer_scale"][0] == 0.0
    assert got["backbone.body.features.1.0.block.0.bias"][0] == 0.0
    assert got["backbone.body.features.1.0.block.0.weight"][0] == 0.05


def test_layer_decay_is_refused_for_a_backbone_without_layer_groups():
    with pytest.raises(ConfigError, match="solver.layer_decay is ConvNeXt's layer-wise LR decay"):
        load_config("r50_1x", {"solver.layer_decay": 0.9})
    with pytest.raises(ConfigError, match="solver.optimizer must be SGD or AdamW"):
        load_config("r50_1x", {"solver.optimizer": "Adam"})


def test_cosine_schedule_is_detectrons_warmup_cosine():
    cfg = micro_config(solver={"lr_scheduler": "cosine", "max_iter": 100, "warmup_iters": 10, "warmup_factor": 0.001,
                               "base_lr": 0.01, "base_lr_end": 0.0})
    assert lr_factor(0, cfg) == pytest.approx(0.001)
    assert lr_factor(50, cfg) == pytest.approx(0.5)
    assert lr_factor(100, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(25, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    end = micro_config(solver={"lr_scheduler": "cosine", "max_iter": 100, "warmup_iters": 0, "base_lr": 0.01,
                               "base_lr_end": 0.001})
    assert lr_factor(100, end) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def shards(synth_root, tmp_path_factory):
    return make_shards(synth_root, str(tmp_path_factory.mktemp("opt")))


def test_an_adamw_cosine_run_resumes_to_the_same_weights(shards, tmp_path):
    cfg = micro_config(solver={"optimizer": "AdamW", "base_lr": 1e-4, "weight_decay": 0.05,
                               "lr_scheduler": "cosine"})
    full = train(cfg, shards, str(tmp_path / "a"), progress=False)
    train(cfg, shards, str(tmp_path / "b"), stop_after=3, progress=False)
    again = train(cfg, shards, str(tmp_path / "b"), progress=False)
    assert again.resumed_from == 3
    assert max_abs_diff(load_state(full.model_uri), load_state(again.model_uri)) <= 1e-6
    assert [h["lr"] for h in full.history][-1] < [h["lr"] for h in full.history][2]   # it decays


def test_a_resume_allowed_a_new_lr_trains_on_the_new_lr(shards, tmp_path):
    # the restored optimizer and scheduler held the checkpoint's LR while the record said the new one
    old, new = micro_config(solver={"base_lr": 0.01}), micro_config(solver={"base_lr": 0.02})
    train(old, shards, str(tmp_path / "run"), stop_after=3, progress=False)
    resumed = train(new, shards, str(tmp_path / "run"), progress=False, allow_config_change=True)
    fresh = train(new, shards, str(tmp_path / "fresh"), progress=False)
    assert [h["lr"] for h in resumed.history if h["iter"] > 3] == \
        pytest.approx([h["lr"] for h in fresh.history if h["iter"] > 3], rel=1e-12)
    train(old, shards, str(tmp_path / "run2"), stop_after=2, progress=False)
    with pytest.raises(CheckpointError, match="solver.optimizer changed"):
        train(micro_config(solver={"optimizer": "AdamW"}), shards, str(tmp_path / "run2"), progress=False,
              allow_config_change=True)
