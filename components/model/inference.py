"""One image through the model, as every caller needs it: test-time resize, inference, the
panoptic output as COCO data. Used by evaluate, predict and the MLflow pyfunc."""

from __future__ import annotations

import numpy as np
import torch

from components.common.coco_panoptic import bbox_of
from components.data.transforms import output_shape, resize_image


def prediction_to_coco(panoptic: torch.Tensor, segments: list[dict]) -> tuple[np.ndarray, list[dict]]:
    """The model's (ids, segments) -> (ids (H, W) uint32, COCO segments_info with area and bbox
    measured on the id map)."""
    ids = panoptic.cpu().numpy().astype(np.uint32)
    info = []
    for s in segments:
        mask = ids == s["id"]
        info.append({"id": int(s["id"]), "category_id": int(s["category_id"]), "iscrowd": 0,
                     "area": int(mask.sum()), "bbox": bbox_of(mask), "isthing": int(bool(s["isthing"])),
                     **({"score": round(float(s["score"]), 5)} if "score" in s else {})})
    return ids, info


def predict_image(model, cfg, image_rgb: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """One (H, W, 3) uint8 RGB image: the config's test-time resize, inference, fusion.
    Returns the (H, W) uint32 segment-id map at the image's size and COCO segments_info."""
    h, w = image_rgb.shape[:2]
    resized = resize_image(image_rgb, *output_shape(h, w, cfg.input.min_size_test, cfg.input.max_size_test))
    sample = {"image": torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))), "height": h, "width": w}
    with torch.inference_mode():
        out = model([sample])[0]
    return prediction_to_coco(*out["panoptic_seg"])
