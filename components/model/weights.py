"""Initial weights for a model: fetch a checkpoint, read it safely, convert it, load it strictly.

``load_weights(model, spec)`` takes:

* ``detectron2://PATH``: a file of detectron2's model zoo by its own address
  (``detectron2://ImageNetPretrained/MSRA/R-50.pkl`` is
  ``https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/R-50.pkl``), cached;
* ``torchvision:NAME``: a torchvision checkpoint by name (``resnet50_imagenet``,
  ``resnet18_imagenet``, ``resnet101_imagenet``, ``swin_t_imagenet``, ``convnext_t_imagenet``,
  ``maskrcnn_resnet50_fpn_coco``), downloaded
  once into ``$PANOPTIC_CACHE`` (default ``~/.cache/panoptic``);
* an MLflow model URI (``models:/panoptic-fpn@champion``, ``models:/NAME/3``, ``runs:/ID/model``):
  fine-tuning from a registered model;
* an ``http(s)://`` URL (cached the same way), a local path or an ``s3://`` URI holding: one of
  our ``model.pt`` files, a detectron2 checkpoint (model zoo ``.pkl`` or a ``.pth`` it wrote),
  detectron2's Caffe2-format ImageNet ResNets (``R-50.pkl``, ``R-101.pkl``), a torchvision
  ImageNet ResNet or Mask R-CNN state dict.

Reading never runs code from the file: torch files load with ``weights_only=True`` and
pickles through ``safe_pickle`` (containers, numbers, strings and numeric arrays, built by
checked stand-ins, never by numpy's own constructors).

Loading is strict. Every tensor of the checkpoint lands in the model, or the load fails
naming each one that did not. The one exception is a category set of another size (fine-tuning
to a custom dataset): the class-dependent layers (box classifier and regressor, mask
predictor, semantic predictor) keep their fresh initialisation, and the log says which and
why; except that a checkpoint trained on COCO panoptic's 133 categories (the model zoo's) gives
a dataset whose categories are COCO's (by id) the rows of those categories
(``remap_coco_heads``). Parts of the model the checkpoint does not cover (the heads, for an
ImageNet backbone) start fresh, and the log lists them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import re
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from components.common import storage
from components.model import convert
from components.model.safe_pickle import UnsafePickle, loads_data

log = logging.getLogger(__name__)

TORCHVISION_URLS = {
    "resnet50_imagenet": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101_imagenet": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    "resnet18_imagenet": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "swin_t_imagenet": "https://download.pytorch.org/models/swin_t-704ceda3.pth",
    "convnext_t_imagenet": "https://download.pytorch.org/models/convnext_tiny-983f1562.pth",
    "maskrcnn_resnet50_fpn_coco": "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth",
}

DETECTRON2_PREFIX = "https://dl.fbaipublicfiles.com/detectron2/"   # detectron2/utils/file_io.py
# COCO panoptic's categories (ids), in the contiguous order detectron2's model zoo was trained with
COCO_THING_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31,
                  32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57,
                  58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87,
                  88, 89, 90)
COCO_STUFF_IDS = (92, 93, 95, 100, 107, 109, 112, 118, 119, 122, 125, 128, 130, 133, 138, 141, 144, 145, 147, 148,
                  149, 151, 154, 155, 156, 159, 161, 166, 168, 171, 175, 176, 177, 178, 180, 181, 184, 185, 186, 187,
                  188, 189, 190, 191, 192, 193, 194, 195, 196, 197, 198, 199, 200)

# Layers whose shape follows the number of categories: re-initialised, never loaded, when the
# checkpoint was trained on another category set.
CLASS_DEPENDENT = ("roi_heads.box_predictor.cls_score.", "roi_heads.box_predictor.bbox_pred.",
                   "roi_heads.mask_head.predictor.", "sem_seg_head.predictor.")

_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."  # torch.save's pre-zip format


class WeightsError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


class UnsafeCheckpointError(WeightsError):
    """A checkpoint that would need to run code (import or call something) to be read."""


def cache_dir() -> str:
    return os.environ.get("PANOPTIC_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "panoptic"))


def fetch(spec: str) -> bytes:
    """The bytes behind a weights spec (see module docstring), from the cache when there."""
    if spec.startswith(("models:/", "runs:/")):  # a registered model: its model.pt
        from components.common.tracking import download_model_file

        spec = download_model_file(spec)
    if spec.startswith("detectron2://"):
        spec = DETECTRON2_PREFIX + spec[len("detectron2://"):]
    if spec.startswith("torchvision:"):
        name = spec.split(":", 1)[1]
        if name not in TORCHVISION_URLS:
            raise WeightsError(f"unknown torchvision weights {name!r}; known: {', '.join(TORCHVISION_URLS)}")
        spec = TORCHVISION_URLS[name]
    if spec.startswith(("http://", "https://")):
        path = os.path.join(cache_dir(), hashlib.sha256(spec.encode()).hexdigest()[:16] + "-" + os.path.basename(spec))
        if not os.path.exists(path):
            os.makedirs(cache_dir(), exist_ok=True)
            try:
                with urllib.request.urlopen(spec, timeout=60) as r:
                    data = r.read()
            except OSError as e:
                raise OSError(f"cannot download {spec} ({e}); download it where you can and give its path or s3:// "
                              f"URI (--set train.init=PATH, or model.weights=PATH in a config), or put the file at "
                              f"{path}") from e
            storage.write_bytes(path, data)
        spec = path
    try:
        return storage.read_bytes(spec)
    except FileNotFoundError:
        raise FileNotFoundError(f"{spec}: weights file not found") from None


def refused_global(error: Exception) -> str:
    """The ``module.name`` a weights-only torch load refused, from its message (torch words it
    'GLOBAL module.name' across versions), else "objects"."""
    m = re.search(r"GLOBAL ([\w.]+)", str(error))
    return m.group(1) if m else "objects"


def read_checkpoint(data: bytes, name: str = "<weights>") -> dict:
    """A checkpoint's content as plain data. torch files (zip or legacy) load with
    ``weights_only=True``; other pickles (detectron2's ``.pkl``) through ``safe_pickle``, which
    builds only dicts, lists, tuples, strings, numbers and numeric arrays. Anything that would
    import or call something else, or is no plain data, is refused with
    ``UnsafeCheckpointError``; nothing runs."""
    if data[:4] == b"PK\x03\x04" or data.startswith(_TORCH_LEGACY_MAGIC):
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"{name}: refused: this torch file needs {refused_global(e)} to load, which could run code. Load "
                f"only files of tensors and plain data; if you trust it, re-save its state_dict with torch.save"
            ) from None
        except Exception as e:
            raise WeightsError(f"{name}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    else:
        try:
            state = loads_data(data)
        except UnsafePickle as e:
            raise UnsafeCheckpointError(
                f"{name}: refused: this pickle needs {e} to load, which could run code or is no plain data; a "
                f"checkpoint holds only arrays, numbers and strings") from None
        except Exception as e:
            raise WeightsError(f"{name}: neither a torch checkpoint nor a pickle of arrays "
                               f"({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{name}: a checkpoint is a mapping of names to tensors, this file holds a "
                           f"{type(state).__name__}")
    return state


@dataclass
class LoadReport:
    """What a load did: every checkpoint tensor is in exactly one of ``loaded``, ``reinitialized``
    or ``dropped``; ``fresh`` lists the model's tensors the checkpoint did not cover."""
    kind: str
    loaded: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)


def identify(state: dict) -> tuple[str, dict]:
    """(kind, the tensors) of a checkpoint's content."""
    if isinstance(state.get("format"), str) and state["format"].startswith("panoptic-fpn/"):
        return state["format"], state["state_dict"]
    if "blobs" in state and isinstance(state["blobs"], dict):   # Detectron (Caffe2) pickles
        state = state["blobs"]
    elif isinstance(state.get("model"), dict):                  # detectron2 checkpoints
        state = state["model"]
    keys = list(state)
    if any(k.startswith(("backbone.bottom_up.", "proposal_generator.")) for k in keys):
        return "detectron2", state
    if "conv1_w" in state or any(k.startswith("res2_0_branch") for k in keys):
        return "caffe2-resnet", state
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        return "torchvision-resnet", state
    if any(k.startswith("backbone.body.") for k in keys):
        return "torchvision-maskrcnn", state
    if "features.0.0.weight" in state and any(k.startswith(("head.", "classifier.")) for k in keys):
        return "torchvision-features", state     # Swin, ConvNeXt ImageNet classifiers
    return "unknown", state


def to_our_names(kind: str, state: dict) -> tuple[dict, dict]:
    if kind == "detectron2":
        return convert.from_detectron2(state)
    if kind == "caffe2-resnet":
        return convert.from_caffe2_resnet(state)
    if kind == "torchvision-resnet":
        return convert.from_torchvision_resnet(state)
    if kind == "torchvision-maskrcnn":
        return convert.from_torchvision_heads(state)
    if kind == "torchvision-features":
        return convert.from_torchvision_features(state)
    return {k: convert.as_tensor(v) for k, v in state.items()}, {}


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str, kind: str,
                      dropped: dict | None = None) -> LoadReport:
    """Copy ``state`` into ``model``; fail naming every tensor that does not fit (see module doc)."""
    own = model.state_dict()
    report = LoadReport(kind, dropped=dict(dropped or {}))
    unmatched = []
    for key, value in state.items():
        if key in ("pixel_mean", "pixel_std"):  # normalisation the checkpoint was trained with
            ours = getattr(model, key, None)
            if ours is not None and not torch.allclose(ours.flatten().cpu(), value.flatten().float(), atol=1e-3):
                raise WeightsError(f"{name}: trained with {key} {value.flatten().tolist()}, the config has "
                                   f"{ours.flatten().tolist()}; set model.{key} to the checkpoint's values")
            report.dropped[key] = "checked against the config (normalisation constants are not parameters)"
        elif key not in own:
            unmatched.append(f"{key} (no such tensor in the model)")
        elif own[key].shape != value.shape:
            if key.startswith(CLASS_DEPENDENT):
                report.reinitialized.append(key)
            else:
                unmatched.append(f"{key} (shape {tuple(value.shape)}, the model's {tuple(own[key].shape)})")
        else:
            report.loaded.append(key)
    if unmatched:
        raise WeightsError(f"{name} ({kind}): {len(unmatched)} tensor(s) of the checkpoint do not fit the model "
                           f"and nothing was loaded:\n  " + "\n  ".join(unmatched) +
                           "\nIs it a checkpoint of this architecture (model.backbone, fpn_channels, head sizes)?")
    if not report.loaded:
        raise WeightsError(f"{name}: no tensor of the checkpoint matched the model")
    with torch.no_grad():
        for key in report.loaded:
            own[key].copy_(state[key].to(own[key].dtype))
    used = set(report.loaded) | set(report.reinitialized)
    report.fresh = [k for k in own if k not in used]
    return report


def _groups(keys: list[str]) -> str:
    counts: dict[str, int] = OrderedDict()
    for k in keys:
        group = ".".join(k.split(".")[:2])
        counts[group] = counts.get(group, 0) + 1
    return ", ".join(f"{g} ({n})" for g, n in counts.items())


def remap_coco_heads(state: dict[str, torch.Tensor], categories) -> tuple[dict[str, torch.Tensor], str]:
    """A state trained on COCO panoptic's 133 categories with its class-dependent rows picked for
    ``categories`` (a ``CategoryMaps``), when every one of them is a COCO category of the same kind
    (by id): the box classifier (and its background row), the class-specific box regressor and
    mask predictor, the semantic predictor (its "things" channel, then the stuff). Returns (state,
    what was done); the state is unchanged when the checkpoint is not COCO's or a category is not."""
    cls = state.get("roi_heads.box_predictor.cls_score.weight")
    sem = state.get("sem_seg_head.predictor.weight")
    if cls is None or sem is None or cls.shape[0] != len(COCO_THING_IDS) + 1 or \
            sem.shape[0] != len(COCO_STUFF_IDS) + 1:
        return state, ""
    foreign = [c for c in categories.thing_ids if c not in COCO_THING_IDS] + \
        [c for c in categories.stuff_ids if c not in COCO_STUFF_IDS]
    if foreign:
        return state, f"not COCO categories (ids {foreign[:8]}): the class-dependent layers start fresh"
    things = torch.tensor([COCO_THING_IDS.index(c) for c in categories.thing_ids], dtype=torch.long)
    stuff = torch.tensor([0] + [1 + COCO_STUFF_IDS.index(c) for c in categories.stuff_ids], dtype=torch.long)
    background = torch.tensor([len(COCO_THING_IDS)], dtype=torch.long)
    boxes = (things[:, None] * 4 + torch.arange(4)).flatten()
    rows = {"roi_heads.box_predictor.cls_score.": torch.cat([things, background]),
            "roi_heads.box_predictor.bbox_pred.": boxes, "roi_heads.mask_head.predictor.": things,
            "sem_seg_head.predictor.": stuff}
    out = dict(state)
    for key, value in state.items():
        for prefix, index in rows.items():
            if key.startswith(prefix):
                out[key] = value.index_select(0, index).clone()
    return out, (f"COCO's class-dependent rows picked for this data's {categories.num_things} thing and "
                 f"{categories.num_stuff} stuff categories (by COCO id)")


def load_weights(model: torch.nn.Module, spec: str, categories=None) -> LoadReport:
    """Initialise ``model`` from a weights spec (see module docstring); returns the report and
    logs what was loaded, re-initialised, dropped and left fresh. ``categories``: the data's
    ``CategoryMaps``, for a COCO checkpoint's heads (``remap_coco_heads``)."""
    kind, raw = identify(read_checkpoint(fetch(spec), spec))
    try:
        state, dropped = to_our_names(kind, raw)
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:   # entries of the wrong kind
        raise WeightsError(f"{spec} ({kind}): entries that are not tensors of the expected layout "
                           f"({type(e).__name__}: {str(e)[:200]})") from None
    own = model.state_dict()
    if categories is not None and kind == "detectron2" and any(
            k in own and own[k].shape != v.shape for k, v in state.items() if k.startswith(CLASS_DEPENDENT)):
        state, remapped = remap_coco_heads(state, categories)
        if remapped:
            log.info("weights %s: %s", spec, remapped)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{spec} ({kind}): entries that are not arrays: {', '.join(map(str, bad[:6]))}")
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise WeightsError(f"{spec}: {len(nonfinite)} tensor(s) hold NaN or infinite values "
                           f"({', '.join(nonfinite[:6])}): not usable as initial weights")
    report = load_state_strict(model, state, spec, kind, dropped)
    log.info("weights %s (%s): loaded %d tensors", spec, kind, len(report.loaded))
    if report.reinitialized:
        log.warning("weights %s: the checkpoint was trained on another category set; re-initialized the "
                    "class-dependent layers: %s", spec, ", ".join(report.reinitialized))
    if report.dropped:
        reasons: dict[str, list[str]] = {}
        for k, why in report.dropped.items():
            reasons.setdefault(why, []).append(k)
        for why, keys in reasons.items():
            shown = ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "")
            log.info("weights %s: not loaded (%s): %s", spec, why, shown)
    if report.fresh:
        log.info("weights %s: not in the checkpoint, initialized fresh: %s", spec, _groups(report.fresh))
    return report
