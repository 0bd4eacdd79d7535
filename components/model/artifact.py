"""Our model artifact, ``model.pt``: weights + config + categories in one torch file.

It holds tensors and plain data only (the config as a dict of numbers, strings and lists), so
it loads with ``torch.load(weights_only=True)``. Format v2 has detectron2's head layout; no
other format is read.
"""

from __future__ import annotations

import io
import logging

import torch

from components.common import storage
from components.common.coco_panoptic import CategoryMaps
from components.model.config import Config, from_dict
from components.model.weights import WeightsError, fetch, read_checkpoint

log = logging.getLogger(__name__)

MODEL_FORMAT = "panoptic-fpn/v2"
READABLE_FORMATS = (MODEL_FORMAT,)


def _plain(value):
    """Tuples -> lists, recursively: the config as JSON-like data."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_model(model: torch.nn.Module, cfg: Config, categories: CategoryMaps, uri: str) -> None:
    """Write the model artifact (local or s3://), atomically."""
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": MODEL_FORMAT, "state_dict": state, "config": _plain(cfg.to_dict()),
                "categories": categories.to_json()}, buf)
    storage.write_bytes(uri, buf.getvalue())


def load_model(uri: str, device: str | torch.device = "cpu"):
    """Read a ``model.pt`` artifact. Returns (model in eval mode, config, categories).

    Everything in it is checked before use: its format, a config this code reads, categories,
    tensors that fit the model exactly (every one present, none extra) and are finite; a file
    that fails any of it is a ``WeightsError`` naming the file and what is wrong."""
    return load_model_and_digest(uri, device)[:3]


def load_model_and_digest(uri: str, device: str | torch.device = "cpu"):
    """``load_model`` and the sha256 of the bytes it read: (model, config, categories, digest)."""
    import hashlib

    from components.model.panoptic_fpn import PanopticFPN

    try:
        data = fetch(uri)
    except FileNotFoundError:
        if uri.startswith(("models:/", "runs:/")):
            raise   # the registry's message names the store it looked in
        raise FileNotFoundError(f"{uri}: model file not found (train one with `panoptic train`)") from None
    digest = hashlib.sha256(data).hexdigest()
    blob = read_checkpoint(data, uri)
    if blob.get("format") not in READABLE_FORMATS:
        raise WeightsError(f"{uri}: not a Panoptic FPN model artifact (format {str(blob.get('format'))[:60]!r}; "
                           f"this version reads {', '.join(READABLE_FORMATS)})")
    for key, kind in (("config", dict), ("categories", list), ("state_dict", dict)):
        if not isinstance(blob.get(key), kind):
            raise WeightsError(f"{uri}: a model artifact without its {key} (a {kind.__name__}); re-export it with "
                               f"`panoptic train`")
    bad = [k for k, v in blob["state_dict"].items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{uri}: state_dict entries that are not tensors: {', '.join(map(str, bad[:8]))}")
    cfg = from_dict(blob["config"], uri)
    try:
        categories = CategoryMaps.from_json(blob["categories"])
        model = PanopticFPN.from_config(cfg, categories)
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{uri}: its config or categories do not make a model ({type(e).__name__}: "
                           f"{str(e)[:300]})") from None
    missing = sorted(set(model.state_dict()) - set(blob["state_dict"]))
    extra = sorted(set(blob["state_dict"]) - set(model.state_dict()))
    if missing or extra:
        raise WeightsError(f"{uri}: its tensors do not fit its config: missing {', '.join(missing[:6]) or '-'}; "
                           f"unexpected {', '.join(extra[:6]) or '-'}")
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise WeightsError(f"{uri}: its tensors do not fit its config ({str(e).splitlines()[0][:300]} ...)") from None
    check_finite(model, uri)
    return model.to(device).eval(), cfg, categories, digest


def check_finite(model: torch.nn.Module, name: str) -> None:
    """Refuse a model with NaN or infinite weights: it would predict nothing, silently."""
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightsError(f"{name}: {len(bad)} tensor(s) hold NaN or infinite values ({', '.join(bad[:6])}"
                           f"{' ...' if len(bad) > 6 else ''}): the training diverged; use an earlier checkpoint")
