"""Weights: our model artifact, torchvision checkpoints, and detectron2 model-zoo checkpoints.

``load_weights(model, spec)`` takes:

* ``torchvision:NAME``: a torchvision checkpoint by name (``resnet50_imagenet``,
  ``resnet18_imagenet``, ``maskrcnn_resnet50_fpn_coco``), downloaded once into
  ``$PANOPTIC_CACHE`` (default ``~/.cache/panoptic``);
* an ``http(s)://`` URL (cached the same way), a local path or an ``s3://`` URI holding a
  torchvision state dict (full Mask R-CNN or backbone only), one of our ``model.pt`` files, or
  a detectron2 checkpoint (``.pkl`` from the model zoo, or ``.pth``), converted by
  ``convert_detectron2``.

Tensors whose shapes differ from the model's (e.g. a COCO classifier for a dataset with other
classes) are skipped and reported, never silently loaded.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import urllib.request

import numpy as np
import torch

from components.common import storage
from components.common.coco_panoptic import CategoryMaps
from components.model.config import Config, from_dict

MODEL_FORMAT = "panoptic-fpn/v1"

TORCHVISION_URLS = {
    "resnet50_imagenet": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet18_imagenet": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "maskrcnn_resnet50_fpn_coco": "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth",
}


def cache_dir() -> str:
    return os.environ.get("PANOPTIC_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "panoptic"))


def fetch(spec: str) -> bytes:
    """The bytes behind a weights spec (see module docstring), from the cache when there."""
    if spec.startswith("torchvision:"):
        name = spec.split(":", 1)[1]
        if name not in TORCHVISION_URLS:
            raise ValueError(f"unknown torchvision weights {name!r}; known: {', '.join(TORCHVISION_URLS)}")
        spec = TORCHVISION_URLS[name]
    if spec.startswith(("http://", "https://")):
        path = os.path.join(cache_dir(), hashlib.sha256(spec.encode()).hexdigest()[:16] + "-" + os.path.basename(spec))
        if not os.path.exists(path):
            os.makedirs(cache_dir(), exist_ok=True)
            try:
                with urllib.request.urlopen(spec, timeout=60) as r:
                    data = r.read()
            except OSError as e:
                raise OSError(f"cannot download {spec} ({e}); download it elsewhere and pass its local path "
                              f"or s3:// URI instead, or put it at {path}") from e
            storage.write_bytes(path, data)
        spec = path
    try:
        return storage.read_bytes(spec)
    except FileNotFoundError:
        raise FileNotFoundError(f"{spec}: weights file not found") from None


def read_state(data: bytes, name: str = "<weights>") -> dict:
    """A checkpoint's raw content: torch.save zip, or a (detectron2) pickle of numpy arrays."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception:
        try:
            return pickle.loads(data, encoding="latin1")
        except Exception as e:
            raise ValueError(f"{name}: neither a torch checkpoint nor a pickle ({e})") from e


def is_detectron2(state: dict) -> bool:
    return any(k.startswith(("backbone.bottom_up.", "backbone.fpn_", "proposal_generator.", "roi_heads.box_head.fc1",
                             "roi_heads.box_head.fc2", "roi_heads.mask_head.mask_fcn", "roi_heads.mask_head.predictor"))
               for k in state)


_RES = re.compile(r"^backbone\.bottom_up\.res(\d)\.(\d+)\.(conv[123]|shortcut)(\.norm)?\.(\w+)$")


def convert_detectron2(state: dict, num_things: int | None = None) -> dict[str, torch.Tensor]:
    """detectron2 Panoptic FPN parameter names and layouts -> ours.

    * ResNet: ``res{2..5}.{i}.conv{j}[.norm]`` -> ``layer{1..4}.{i}.conv{j}``/``bn{j}``, shortcut ->
      ``downsample.0``/``.1``; stem -> ``conv1``/``bn1``.
    * FPN: ``fpn_lateral{2..5}`` -> ``inner_blocks.{0..3}.0``; ``fpn_output{k}`` -> ``layer_blocks``.
    * RPN: ``rpn_head.conv`` -> ``rpn.head.conv.0.0``, ``objectness_logits`` -> ``cls_logits``,
      ``anchor_deltas`` -> ``bbox_pred``.
    * Box head: ``fc1``/``fc2`` -> ``fc6``/``fc7``. detectron2 puts background as the *last*
      class and predicts boxes for foreground classes only; torchvision puts background first
      and predicts boxes for it too: logits are rotated, a zero box row is prepended.
    * Mask head: ``mask_fcn{1..4}`` -> ``mask_head.{0..3}.0``, ``deconv`` -> ``conv5_mask``,
      ``predictor`` -> ``mask_fcn_logits`` with a zero background channel prepended.
    * Semantic head: same names as ours.
    """
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        t = torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
        new = None
        m = _RES.match(key)
        if m:
            stage, block, conv, norm, leaf = m.groups()
            prefix = f"backbone.body.layer{int(stage) - 1}.{block}."
            if conv == "shortcut":
                new = prefix + ("downsample.1." if norm else "downsample.0.") + leaf
            else:
                j = conv[-1]
                new = prefix + (f"bn{j}." if norm else f"conv{j}.") + leaf
        elif key.startswith("backbone.bottom_up.stem.conv1."):
            leaf = key.split(".")[-1]
            new = "backbone.body." + ("bn1." if ".norm." in key else "conv1.") + leaf
        elif key.startswith("backbone.fpn_lateral"):
            k = int(key[len("backbone.fpn_lateral")]) - 2
            new = f"backbone.fpn.inner_blocks.{k}.0.{key.split('.')[-1]}"
        elif key.startswith("backbone.fpn_output"):
            k = int(key[len("backbone.fpn_output")]) - 2
            new = f"backbone.fpn.layer_blocks.{k}.0.{key.split('.')[-1]}"
        elif key.startswith("proposal_generator.rpn_head."):
            part, leaf = key.split(".")[-2:]
            new = {"conv": "rpn.head.conv.0.0.", "objectness_logits": "rpn.head.cls_logits.",
                   "anchor_deltas": "rpn.head.bbox_pred."}[part] + leaf
        elif key.startswith("roi_heads.box_head.fc"):
            j = int(key.split(".")[2][2:])
            new = f"roi_heads.box_head.fc{j + 5}.{key.split('.')[-1]}"
        elif key.startswith("roi_heads.box_predictor.cls_score."):
            new, t = key, torch.cat([t[-1:], t[:-1]])  # background last -> first
        elif key.startswith("roi_heads.box_predictor.bbox_pred."):
            new, t = key, torch.cat([torch.zeros_like(t[:4]), t])  # a box regressor for background
        elif key.startswith("roi_heads.mask_head.mask_fcn"):
            j = int(key.split(".")[2][len("mask_fcn"):])
            new = f"roi_heads.mask_head.{j - 1}.0.{key.split('.')[-1]}"
        elif key.startswith("roi_heads.mask_head.deconv."):
            new = "roi_heads.mask_predictor.conv5_mask." + key.split(".")[-1]
        elif key.startswith("roi_heads.mask_head.predictor."):
            new, t = "roi_heads.mask_predictor.mask_fcn_logits." + key.split(".")[-1], \
                torch.cat([torch.zeros_like(t[:1]), t])
        elif key.startswith("sem_seg_head."):
            new = key
        elif key in ("pixel_mean", "pixel_std"):
            new = key
        if new is not None:
            out[new] = t.float() if t.is_floating_point() else t
    if num_things is not None and "roi_heads.box_predictor.cls_score.weight" in out:
        n = out["roi_heads.box_predictor.cls_score.weight"].shape[0] - 1
        if n != num_things:
            raise ValueError(f"the detectron2 checkpoint predicts {n} thing classes, the model {num_things}")
    return out


def load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Load the tensors whose names and shapes match; return what was loaded, skipped, missing."""
    own = model.state_dict()
    loaded, skipped = [], []
    for k, v in state.items():
        if k in own and own[k].shape == v.shape:
            own[k].copy_(v.to(own[k].dtype))
            loaded.append(k)
        elif k in own:
            skipped.append(f"{k} (shape {tuple(v.shape)} vs {tuple(own[k].shape)})")
        else:
            skipped.append(f"{k} (not in the model)")
    missing = [k for k in own if k not in state]
    return {"loaded": loaded, "skipped": skipped, "missing": missing}


def load_weights(model: torch.nn.Module, spec: str, verbose: bool = True) -> dict[str, list[str]]:
    """Initialise ``model`` from a weights spec (see module docstring)."""
    state = read_state(fetch(spec), spec)
    if isinstance(state, dict) and state.get("format") == MODEL_FORMAT:
        state = state["state_dict"]
    elif is_detectron2(state.get("model", state) if isinstance(state, dict) else state):
        state = convert_detectron2(state)
    elif "conv1.weight" in state and "layer1.0.conv1.weight" in state:  # an ImageNet backbone
        state = {f"backbone.body.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    report = load_state_into(model, state)
    if not report["loaded"]:
        raise ValueError(f"{spec}: no tensor matched the model's names and shapes; is it a Panoptic FPN, "
                         f"Mask R-CNN, ResNet or detectron2 checkpoint?")
    if verbose and report["skipped"]:
        print(f"weights {spec}: loaded {len(report['loaded'])} tensors, skipped {len(report['skipped'])}: "
              f"{', '.join(report['skipped'][:5])}{' ...' if len(report['skipped']) > 5 else ''}")
    return report


def save_model(model: torch.nn.Module, cfg: Config, categories: CategoryMaps, uri: str) -> None:
    """Write the model artifact: weights + config + categories, one file (local or s3://)."""
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": MODEL_FORMAT, "state_dict": state, "config": cfg.to_dict(),
                "categories": categories.to_json()}, buf)
    storage.write_bytes(uri, buf.getvalue())


def load_model(uri: str, device: str | torch.device = "cpu"):
    """Read a ``model.pt`` artifact. Returns (model in eval mode, config, categories)."""
    from components.model.panoptic_fpn import PanopticFPN

    try:
        blob = torch.load(io.BytesIO(fetch(uri)), map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: model file not found (train one with `panoptic train`)") from None
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise ValueError(f"{uri}: not a {MODEL_FORMAT} model artifact")
    cfg = from_dict(blob["config"], uri)
    categories = CategoryMaps.from_json(blob["categories"])
    model = PanopticFPN.from_config(cfg, categories)
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval(), cfg, categories
