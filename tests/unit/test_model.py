import io
import pickle

import numpy as np
import pytest
import torch

from components.common.coco_panoptic import Category, CategoryMaps
from components.model.config import ConfigError, load_config, parse_overrides
from components.model.panoptic_fpn import PanopticFPN, param_count
from components.model.postprocessing import combine_semantic_and_instance_outputs
from components.model.weights import convert_detectron2, load_weights
from tests.detectron2_names import detectron2_panoptic_fpn_r50


def coco_like(num_things, num_stuff):
    return CategoryMaps(tuple(Category(i + 1, f"t{i}", True) for i in range(num_things)) +
                        tuple(Category(100 + i, f"s{i}", False) for i in range(num_stuff)))


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    return PanopticFPN.from_config(load_config("r50_1x"), coco_like(80, 53))


def test_r50_1x_has_detectrons_parameter_count(r50):
    d2 = sum(int(np.prod(shape)) for _, shape, is_param in detectron2_panoptic_fpn_r50() if is_param)
    ours = param_count(r50)
    # the documented differences: torchvision's box regressor and mask predictor also have
    # outputs for background (4 x 1024 + 4, and 256 + 1 parameters)
    assert ours - d2 == (4 * 1024 + 4) + (256 + 1)
    assert 45_000_000 < d2 < 47_000_000
    # frozen: stem + res2, as detectron2's FREEZE_AT=2
    frozen = [n for n, p in r50.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("backbone.body.conv1", "backbone.body.layer1")) for n in frozen)
    # MSRA stride placement
    assert r50.backbone.body.layer2[0].conv1.stride == (2, 2) and r50.backbone.body.layer2[0].conv2.stride == (1, 1)


def test_r50_train_step_on_cpu(r50):
    rng = np.random.default_rng(0)
    masks = torch.zeros((2, 256, 320), dtype=torch.uint8)
    masks[0, 20:120, 30:150] = 1
    masks[1, 150:230, 200:300] = 1
    sem = torch.full((256, 320), 1, dtype=torch.uint8)
    sem[masks.bool().any(0)] = 0
    sample = {"image": torch.from_numpy(rng.integers(0, 255, (3, 256, 320), dtype=np.uint8)),
              "boxes": torch.tensor([[30, 20, 150, 120], [200, 150, 300, 230]], dtype=torch.float32),
              "labels": torch.tensor([3, 7]), "masks": masks, "sem_seg": sem}
    r50.train()
    params = [p for p in r50.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params[-3:]]
    opt = torch.optim.SGD(params, lr=0.001, momentum=0.9)
    losses = r50([sample])
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask",
                           "loss_sem_seg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, params[-3:]))
    r50.eval()
    with torch.no_grad():
        out = r50([{**sample, "height": 240, "width": 300}])[0]
    panoptic, segments = out["panoptic_seg"]
    assert panoptic.shape == (240, 300) and out["sem_seg"].shape == (54, 240, 300)


def test_detectron2_checkpoint_converts_and_loads(tmp_path):
    torch.manual_seed(0)
    cats = coco_like(6, 5)
    model = PanopticFPN.from_config(load_config("r50_1x"), cats)
    rng = np.random.default_rng(1)
    fake = {name: rng.standard_normal(shape).astype(np.float32)
            for name, shape, _ in detectron2_panoptic_fpn_r50(num_things=6, num_stuff=5)}
    path = tmp_path / "model_final.pkl"  # the model zoo's layout: a pickle of numpy arrays
    path.write_bytes(pickle.dumps({"model": fake, "__author__": "test", "matching_heuristics": True}))
    report = load_weights(model, str(path))
    assert report["skipped"] == []
    assert report["missing"] == []
    sd = model.state_dict()
    eq = lambda ours, theirs: torch.equal(sd[ours], torch.from_numpy(fake[theirs]))
    assert eq("backbone.body.conv1.weight", "backbone.bottom_up.stem.conv1.weight")
    assert eq("backbone.body.bn1.running_var", "backbone.bottom_up.stem.conv1.norm.running_var")
    assert eq("backbone.body.layer3.5.conv2.weight", "backbone.bottom_up.res4.5.conv2.weight")
    assert eq("backbone.body.layer2.0.downsample.1.bias", "backbone.bottom_up.res3.0.shortcut.norm.bias")
    assert eq("backbone.fpn.inner_blocks.3.0.weight", "backbone.fpn_lateral5.weight")
    assert eq("backbone.fpn.layer_blocks.0.0.bias", "backbone.fpn_output2.bias")
    assert eq("rpn.head.cls_logits.weight", "proposal_generator.rpn_head.objectness_logits.weight")
    assert eq("roi_heads.box_head.fc7.weight", "roi_heads.box_head.fc2.weight")
    assert eq("roi_heads.mask_head.3.0.weight", "roi_heads.mask_head.mask_fcn4.weight")
    assert eq("sem_seg_head.p5.2.norm.weight", "sem_seg_head.p5.2.norm.weight")
    # class layouts: detectron2's background is last, torchvision's first
    cls = torch.from_numpy(fake["roi_heads.box_predictor.cls_score.weight"])
    assert torch.equal(sd["roi_heads.box_predictor.cls_score.weight"][0], cls[-1])
    assert torch.equal(sd["roi_heads.box_predictor.cls_score.weight"][1:], cls[:-1])
    assert torch.equal(sd["roi_heads.box_predictor.bbox_pred.weight"][4:],
                       torch.from_numpy(fake["roi_heads.box_predictor.bbox_pred.weight"]))
    assert sd["roi_heads.box_predictor.bbox_pred.weight"][:4].abs().sum() == 0
    assert torch.equal(sd["roi_heads.mask_predictor.mask_fcn_logits.weight"][1:],
                       torch.from_numpy(fake["roi_heads.mask_head.predictor.weight"]))
    # a .pth in detectron2's naming converts the same way
    buf = io.BytesIO()
    torch.save({"model": {k: torch.from_numpy(v) for k, v in fake.items()}}, buf)
    assert set(convert_detectron2(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))) == set(sd)


def test_wrong_class_count_is_reported_not_loaded(tmp_path):
    model = PanopticFPN.from_config(load_config("tiny", {"model": {"backbone_norm": "FrozenBN"}}), coco_like(6, 5))
    fake = {"roi_heads.box_predictor.cls_score.weight": np.zeros((81, 256), np.float32),
            "roi_heads.box_head.fc1.weight": np.ones(tuple(model.roi_heads.box_head.fc6.weight.shape), np.float32)}
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps({"model": fake}))
    report = load_weights(model, str(path), verbose=False)
    assert report["loaded"] == ["roi_heads.box_head.fc6.weight"]
    assert "roi_heads.box_predictor.cls_score.weight (shape (81, 256) vs (7, 256))" in report["skipped"]
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_weights(model, str(tmp_path / "nope.pth"))


def test_fusion_follows_detectron2_rules():
    semantic = torch.zeros((10, 10), dtype=torch.long)
    semantic[:, 5:] = 2
    semantic[0, 0] = 1
    masks = torch.zeros((3, 10, 10), dtype=torch.bool)
    masks[0, :5, :5] = True          # score 0.9: painted
    masks[1, :4, :4] = True          # score 0.8: fully covered -> dropped (overlap > 0.5)
    masks[2, 5:, 5:] = True          # score 0.3: below the score threshold
    pan, segs = combine_semantic_and_instance_outputs(
        instance_masks=masks, instance_scores=torch.tensor([0.9, 0.8, 0.3]), instance_classes=torch.tensor([1, 2, 3]),
        semantic=semantic, stuff_area_thresh=10)
    assert [(s["isthing"], s["category"]) for s in segs] == [(True, 1), (False, 2)]
    assert (pan[:5, :5] == 1).all() and (pan[:, 5:] == 2).all()
    assert (pan[5:, :5] == 0).all()  # class 1 stuff has < 10 px and 'things' (0) is never stuff


def test_config_files_and_errors(tmp_path):
    assert load_config("r50_3x").solver.max_iter == 270000
    assert load_config("r50_3x").model.backbone == "resnet50"
    assert load_config("tiny", parse_overrides(["solver.max_iter=7", "model.box_loss_beta=0.11"])).solver.max_iter == 7
    with pytest.raises(ConfigError, match="unknown key `solver.max_iters`"):
        load_config("tiny", {"solver": {"max_iters": 3}})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="solver.amp must be"):
        load_config("tiny", {"solver": {"amp": "fp8"}})
    # YAML reads a bare `off` as false: the override users type must still mean "off"
    assert load_config("tiny", parse_overrides(["solver.amp=off"])).solver.amp == "off"
    assert load_config("tiny", parse_overrides(["solver.amp=bf16"])).solver.amp == "bf16"
