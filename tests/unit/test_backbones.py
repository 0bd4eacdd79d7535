"""The backbone table: every backbone trains a step on the CPU, gives the FPN levels the heads
expect, has its published size, takes its ImageNet weights through the weights layer; a new
backbone needs only its file (the meta-architecture reads no backbone layer)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from components.common.coco_panoptic import Category, CategoryMaps
from components.model.backbones import STRIDES, Backbone, register_backbone
from components.model.config import load_config
from components.model.panoptic_fpn import PanopticFPN
from components.train.trainer import train
from tests.training import MICRO, make_shards

# the CPU-sized config of each backbone (add a new one here: the train step and the learning
# test in tests/integration/test_backbones_learn.py then run on it)
TINY_CONFIGS = {"resnet18": "tiny", "swin_t": "swin_t_tiny", "convnext_t": "convnext_t_tiny"}

COCO = CategoryMaps(tuple([Category(id=i + 1, name=f"t{i}", isthing=True) for i in range(80)]
                          + [Category(id=100 + i, name=f"s{i}", isthing=False) for i in range(53)]))

# (config, parameters of the whole model, of the backbone trunk; the trunk's published size:
# torchvision's ImageNet classifier less its head and final norm, plus our four stage norms)
SIZES = {
    "r50_1x": (45_973_990, 23_454_912),
    "r101_3x": (64_913_894, 42_394_816),
    "swin_t_3x": (49_425_376, 27_520_698),       # Swin-T: 28,288,354 - 770,536 + 2,880
    "convnext_t_3x": (49_726_150, 27_821_472),   # ConvNeXt-T: 28,589,128 - 770,536 + 2,880
}


def micro(name: str, **solver):
    over = json.loads(json.dumps(MICRO))
    over["solver"].update(solver)
    return load_config(name, over)


@pytest.mark.parametrize("config", sorted(SIZES))
def test_sizes_match_the_published_models(config):
    torch.manual_seed(0)
    model = PanopticFPN.from_config(load_config(config), COCO)
    assert (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.backbone.body.parameters())) \
        == SIZES[config]


@pytest.mark.parametrize("backbone", sorted(TINY_CONFIGS))
def test_fpn_levels_have_the_strides_and_channels_the_heads_expect(backbone):
    cfg = load_config(TINY_CONFIGS[backbone])
    model = PanopticFPN.from_config(cfg, COCO).eval()
    assert model.backbone.strides == STRIDES and model.backbone.out_channels == cfg.model.fpn_channels
    x = torch.randn(1, 3, 128, 192)
    with torch.no_grad():
        features = model.backbone(x)
    assert list(features) == ["0", "1", "2", "3", "pool"]
    for (k, f), stride in zip(features.items(), STRIDES):
        assert f.shape == (1, cfg.model.fpn_channels, 128 // stride, 192 // stride), (k, f.shape)


@pytest.mark.parametrize("backbone", sorted(TINY_CONFIGS))
def test_a_training_step_on_cpu_reaches_the_backbone(backbone, synth_root, tmp_path):
    shards = make_shards(synth_root, str(tmp_path / "data"), size=4)
    cfg = micro(TINY_CONFIGS[backbone], max_iter=2, warmup_iters=1, steps=[2])
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in PanopticFPN.from_config(cfg, COCO).backbone.body.state_dict().items()}
    result = train(cfg, shards, str(tmp_path / "run"), progress=False)
    assert len(result.history) == 2 and all(torch.isfinite(torch.tensor(h["total_loss"])) for h in result.history)
    state = torch.load(result.model_uri, weights_only=False)["state_dict"]
    body = {k[len("backbone.body."):]: v for k, v in state.items() if k.startswith("backbone.body.")}
    moved = [k for k, v in body.items() if v.is_floating_point() and k in before and v.shape == before[k].shape
             and not torch.equal(v, before[k])]
    assert len(moved) > len(body) // 3, f"{backbone}: only {len(moved)} of {len(body)} backbone tensors trained"


class _TwoConvBody(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 8, 8, 3, stride=4 if i == 0 else 2, padding=1)
                                   for i in range(4))

    def forward(self, x):
        out = {}
        for i, conv in enumerate(self.convs):
            x = conv(x)
            out[str(i)] = x
        return out


def test_a_new_backbone_is_one_registered_builder(synth_root, tmp_path, monkeypatch):
    """No file of the model changes: the table, a builder and a config (here overrides) are enough."""
    from components.model.backbone_names import BACKBONES
    from components.model.backbones import _BUILDERS

    monkeypatch.setitem(BACKBONES, "two_conv_test", "test_backbones")
    register_backbone("two_conv_test")(
        lambda m, **_: Backbone(_TwoConvBody(), [8] * 4, m.fpn_channels, channels_last_helps=False))
    try:
        shards = make_shards(synth_root, str(tmp_path / "data"), size=4)
        over = json.loads(json.dumps(MICRO))
        over["solver"].update(max_iter=1, warmup_iters=1, steps=[1])
        over["model"] = {"backbone": "two_conv_test"}
        result = train(load_config("tiny", over), shards, str(tmp_path / "run"), progress=False)
        assert len(result.history) == 1
    finally:
        _BUILDERS.pop("two_conv_test")


def test_imagenet_weights_load_through_the_weights_layer(tmp_path):
    """A torchvision ImageNet Swin / ConvNeXt state dict (here: the same architecture at CPU
    size, seeded) becomes the backbone body, tensor for tensor; its classifier is dropped."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    from torchvision.models.swin_transformer import SwinTransformer

    from components.model.weights import load_weights

    nets = {
        "swin_t_tiny": SwinTransformer([4, 4], 32, [1, 1, 1, 1], [1, 2, 4, 8], [7, 7], num_classes=1000),
        "convnext_t_tiny": ConvNeXt([CNBlockConfig(32, 64, 1), CNBlockConfig(64, 128, 1), CNBlockConfig(128, 256, 1),
                                     CNBlockConfig(256, None, 1)], num_classes=1000),
    }
    for config, net in nets.items():
        path = tmp_path / f"{config}.pth"
        torch.save(net.state_dict(), path)
        model = PanopticFPN.from_config(load_config(config), COCO)
        report = load_weights(model, str(path))
        assert report.kind == "torchvision-features"
        ours = model.backbone.body.state_dict()
        for k, v in net.state_dict().items():
            if k.startswith("features."):
                assert torch.equal(ours[k], v), k
            else:
                assert k in report.dropped
        assert all(k.startswith("backbone.body.features.") for k in report.loaded)


def test_channels_last_is_the_backbones_call():
    for config, helps in (("tiny", True), ("swin_t_tiny", False), ("convnext_t_tiny", True)):
        model = PanopticFPN.from_config(load_config(config), COCO)
        assert model.use_channels_last() is helps and model.channels_last is helps
