"""Which device a process computes on."""

from __future__ import annotations

import os

import torch


def pick_device(requested: str | None) -> torch.device:
    """``auto``/None: this process's GPU (``LOCAL_RANK``) if there is one, else the CPU. A bare
    ``cuda`` gets the index too (``torch.cuda.set_device`` refuses a device without one)."""
    if requested and requested != "auto":
        dev = torch.device(requested)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
