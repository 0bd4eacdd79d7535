"""Pictures of panoptic segmentations: segment colours blended over the image (evaluate's report,
predict's overlays)."""

from __future__ import annotations

import numpy as np

from components.common.coco_panoptic import segment_index_map


def segment_colors(segments: list[dict], categories: dict[int, dict], seed: int = 0) -> list[tuple[int, int, int]]:
    """A colour per segment: its category's colour, jittered per instance so neighbours differ."""
    rng = np.random.default_rng(seed)
    out = []
    for s in segments:
        base = np.asarray(categories.get(s["category_id"], {}).get("color", (200, 200, 200)), float)
        jitter = rng.integers(-40, 41, 3) if categories.get(s["category_id"], {}).get("isthing") else 0
        out.append(tuple(int(v) for v in np.clip(base + jitter, 0, 255)))
    return out


def overlay(image: np.ndarray, ids: np.ndarray, segments: list[dict], categories: dict[int, dict],
            alpha: float = 0.55) -> np.ndarray:
    """Blend segment colours over an (H, W, 3) image; boundaries dark; VOID left as is."""
    index = segment_index_map(ids, [s["id"] for s in segments])
    colors = np.array(segment_colors(segments, categories) + [(0, 0, 0)], np.float32)
    painted = colors[index]  # index -1 -> the last row
    out = image.astype(np.float32)
    labelled = index >= 0
    out[labelled] = (1 - alpha) * out[labelled] + alpha * painted[labelled]
    edge = np.zeros(ids.shape, bool)
    edge[:-1] |= ids[:-1] != ids[1:]
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    out[edge] *= 0.25
    return np.clip(out, 0, 255).astype(np.uint8)
