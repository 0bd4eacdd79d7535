"""Charts rendered headless to PNG bytes (matplotlib loads only when a chart is drawn)."""

from __future__ import annotations

import io


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
