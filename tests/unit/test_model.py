import logging
import pickle

import numpy as np
import pytest
import torch

from components.common.coco_panoptic import Category, CategoryMaps
from components.model.artifact import load_model, save_model
from components.model.config import ConfigError, load_config, parse_overrides
from components.model.panoptic_fpn import PanopticFPN, param_count
from components.model.postprocessing import combine_semantic_and_instance_outputs, paste_masks
from components.model.weights import CLASS_DEPENDENT, WeightsError, load_weights
from tests.detectron2_weights import detectron2_keys, detectron2_state


def coco_like(num_things, num_stuff):
    return CategoryMaps(tuple(Category(i + 1, f"t{i}", True) for i in range(num_things)) +
                        tuple(Category(100 + i, f"s{i}", False) for i in range(num_stuff)))


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    return PanopticFPN.from_config(load_config("r50_1x"), coco_like(80, 53))


@pytest.fixture(scope="module")
def d2_state():
    return detectron2_state(50)


def test_r50_1x_has_detectrons_parameters(r50):
    """The same tensors as a real detectron2 build lists (fixtures/detectron2/keys_r50.json):
    the same parameter count, and one of ours for each of its tensors, shape for shape."""
    keys = detectron2_keys(50)
    assert param_count(r50) == 45_973_990  # detectron2's panoptic_fpn_R_50 (FrozenBN stats are buffers)
    assert len(r50.state_dict()) == len(keys) == 330
    frozen = [n for n, p in r50.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("backbone.body.conv1", "backbone.body.layer1")) for n in frozen)
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
    assert set(losses) == {"loss_sem_seg", "loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, params[-3:]))
    r50.eval()
    with torch.no_grad():
        out = r50([{**sample, "height": 240, "width": 300}])[0]
    panoptic, segments = out["panoptic_seg"]
    assert panoptic.shape == (240, 300) and out["sem_seg"].shape == (54, 240, 300)


def _pkl(tmp_path, state, name="model_final.pkl"):
    path = tmp_path / name  # the model zoo's layout: a pickle of numpy arrays under "model"
    path.write_bytes(pickle.dumps({"model": state, "__author__": "test"}))
    return str(path)


def test_detectron2_checkpoint_loads_every_tensor(tmp_path, d2_state):
    torch.manual_seed(1)
    model = PanopticFPN.from_config(load_config("r50_1x"), coco_like(80, 53))
    report = load_weights(model, _pkl(tmp_path, d2_state))
    assert report.kind == "detectron2" and len(report.loaded) == len(d2_state) == 330
    assert report.fresh == [] and report.reinitialized == [] and report.dropped == {}
    sd = model.state_dict()
    def eq(ours, theirs):
        return torch.equal(sd[ours], torch.from_numpy(d2_state[theirs]))

    assert eq("backbone.body.bn1.running_var", "backbone.bottom_up.stem.conv1.norm.running_var")
    assert eq("backbone.body.layer2.0.downsample.1.bias", "backbone.bottom_up.res3.0.shortcut.norm.bias")
    assert eq("backbone.fpn.inner_blocks.3.0.weight", "backbone.fpn_lateral5.weight")
    assert eq("rpn.head.objectness_logits.weight", "proposal_generator.rpn_head.objectness_logits.weight")
    assert eq("sem_seg_head.p5.4.norm.weight", "sem_seg_head.p5.4.norm.weight")  # conv 3 of P5: index 4


def test_unmatched_checkpoint_tensors_fail_the_load_naming_each(tmp_path, d2_state):
    model = PanopticFPN.from_config(load_config("r50_1x"), coco_like(80, 53))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(d2_state)
    bad["sem_seg_head.p5.1.weight"] = bad.pop("sem_seg_head.p5.2.weight")       # a misplaced name
    bad["backbone.fpn_lateral6.weight"] = np.zeros((256, 2048, 1, 1), np.float32)  # a tensor we lack
    bad["backbone.fpn_output2.weight"] = np.zeros((128, 256, 3, 3), np.float32)    # a wrong shape
    with pytest.raises(WeightsError) as e:
        load_weights(model, _pkl(tmp_path, bad))
    msg = str(e.value)
    assert "3 tensor(s)" in msg and "nothing was loaded" in msg
    for name in ("sem_seg_head.p5.1.weight", "backbone.fpn.inner_blocks.4.0.weight",
                 "backbone.fpn.layer_blocks.0.0.weight"):
        assert name in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_other_category_count_reinitializes_only_class_layers(tmp_path, d2_state, caplog):
    torch.manual_seed(2)
    model = PanopticFPN.from_config(load_config("r50_1x"), coco_like(6, 5))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="components.model.weights"):
        report = load_weights(model, _pkl(tmp_path, d2_state))
    assert sorted(report.reinitialized) == sorted(k for k in fresh if k.startswith(CLASS_DEPENDENT))
    assert len(report.reinitialized) == 8 and len(report.loaded) == 330 - 8
    assert "another category set" in caplog.text and "roi_heads.box_predictor.cls_score.weight" in caplog.text
    sd = model.state_dict()
    assert all(torch.equal(sd[k], fresh[k]) for k in report.reinitialized)
    assert torch.equal(sd["roi_heads.box_head.fc2.weight"], torch.from_numpy(d2_state["roi_heads.box_head.fc2.weight"]))


def test_caffe2_imagenet_resnet_loads_into_the_backbone(tmp_path, d2_state):
    """detectron2's ImageNetPretrained/MSRA/R-50.pkl layout: Caffe2 names under "blobs", affine-only
    norms (statistics implied: 0 and 1 - eps), momentum blobs and the classifier left out."""
    blobs = {"conv1_w": d2_state["backbone.bottom_up.stem.conv1.weight"],
             "res_conv1_bn_s": d2_state["backbone.bottom_up.stem.conv1.norm.weight"],
             "res_conv1_bn_b": d2_state["backbone.bottom_up.stem.conv1.norm.bias"],
             "fc1000_w": np.zeros((1000, 2048), np.float32), "fc1000_b": np.zeros(1000, np.float32)}
    branch = {"conv1": "2a", "conv2": "2b", "conv3": "2c", "shortcut": "1"}
    for k, v in d2_state.items():
        parts = k.split(".")
        if k.startswith("backbone.bottom_up.res") and parts[-1] in ("weight", "bias"):
            stage, block, conv = parts[2][3:], parts[3], parts[4]
            leaf = "_w" if parts[-2] == conv else ("_bn_s" if parts[-1] == "weight" else "_bn_b")
            blobs[f"res{stage}_{block}_branch{branch[conv]}{leaf}"] = v
            blobs[f"res{stage}_{block}_branch{branch[conv]}{leaf}_momentum"] = np.zeros_like(v)
    path = tmp_path / "R-50.pkl"
    path.write_bytes(pickle.dumps({"blobs": blobs}, protocol=2))
    model = PanopticFPN.from_config(load_config("r50_1x"), coco_like(80, 53))
    report = load_weights(model, str(path))
    assert report.kind == "caffe2-resnet"
    assert all(k.startswith("backbone.body.") for k in report.loaded) and len(report.loaded) == 265
    assert set(report.dropped.values()) == {"ImageNet classifier", "optimizer momentum"}
    assert all(not k.startswith("backbone.body.") for k in report.fresh)
    sd = model.state_dict()
    assert torch.equal(sd["backbone.body.layer3.5.bn2.weight"],
                       torch.from_numpy(d2_state["backbone.bottom_up.res4.5.conv2.norm.weight"]))
    assert torch.all(sd["backbone.body.layer3.5.bn2.running_var"] == 1 - 1e-5)


def test_a_model_artifact_of_another_format_is_refused(tmp_path):
    """Only this version's model.pt format loads (no old users: no converters for old layouts)."""
    cats = coco_like(3, 2)
    model = PanopticFPN.from_config(load_config("tiny"), cats).eval()
    save_model(model, load_config("tiny"), cats, str(tmp_path / "v2.pt"))
    blob = torch.load(str(tmp_path / "v2.pt"), weights_only=True)
    torch.save({**blob, "format": "panoptic-fpn/v1"}, str(tmp_path / "v1.pt"))
    with pytest.raises(WeightsError, match="format 'panoptic-fpn/v1'.*reads panoptic-fpn/v2"):
        load_model(str(tmp_path / "v1.pt"))


def test_paste_masks_matches_grid_sample_pasting():
    """Our separable pasting equals bilinear grid_sample over the box (detectron2's way), thresholded."""
    torch.manual_seed(0)
    probs = torch.rand(6, 28, 28)
    boxes = torch.tensor([[10.3, 5.7, 60.2, 40.9], [0.0, 0.0, 99.0, 79.0], [50.5, 30.5, 51.2, 31.1],
                          [-5.0, 70.0, 20.0, 95.0], [90.2, 10.0, 130.0, 50.0], [20.0, 20.0, 20.0, 40.0]])
    h, w = 80, 100
    ours = paste_masks(probs, boxes, (h, w))
    ys, xs = torch.arange(h) + 0.5, torch.arange(w) + 0.5
    ref = []
    for p, (x0, y0, x1, y1) in zip(probs, boxes.tolist()):
        if x1 <= x0 or y1 <= y0:
            ref.append(torch.zeros(h, w, dtype=torch.bool))
            continue
        gx = ((xs - x0) / (x1 - x0) * 2 - 1)[None, :].expand(h, w)
        gy = ((ys - y0) / (y1 - y0) * 2 - 1)[:, None].expand(h, w)
        grid = torch.stack([gx, gy], -1)[None]
        ref.append(torch.nn.functional.grid_sample(p[None, None], grid, align_corners=False)[0, 0] >= 0.5)
    ref = torch.stack(ref)
    assert (ours == ref).float().mean() > 0.9999 and ours[1].sum() > 1000 and not ours[5].any()


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
