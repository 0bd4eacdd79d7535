"""Charts rendered headless to PNG bytes (matplotlib loads only when a chart is drawn)."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig, tight: bool = True) -> bytes:
    """Lay out ``fig`` (``tight``: matplotlib's tight layout; else as placed), render it to PNG
    bytes (no software tag, so the bytes are reproducible) and close it."""
    if tight:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    pyplot().close(fig)
    return buf.getvalue()


def png_data_uri(arr: np.ndarray | bytes) -> str:
    if isinstance(arr, (bytes, bytearray)):
        data = bytes(arr)
    else:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG", optimize=True)
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def thumbnail(arr: np.ndarray, max_side: int = 360) -> np.ndarray:
    h, w = arr.shape[:2]
    s = min(1.0, max_side / max(h, w))
    if s >= 1.0:
        return arr
    return np.asarray(Image.fromarray(arr).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR))
