"""The MLflow pyfunc wrapper: input an image, output the panoptic ids (PNG) and segments_info."""

from __future__ import annotations

import io
import json
import os

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", "image")]),
    outputs=Schema([ColSpec("binary", "panoptic_png"), ColSpec("string", "segments_info")]),
)
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # components/


def predict_image(model, cfg, image_rgb: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """Run the model on one (H, W, 3) uint8 RGB image: test-time resize, inference, fusion.
    Returns the (H, W) uint32 segment-id map and COCO segments_info."""
    import torch
    from PIL import Image

    from components.evaluate.core import prediction_to_coco
    from components.preprocess.targets import output_shape

    h, w = image_rgb.shape[:2]
    nh, nw = output_shape(h, w, cfg.input.min_size_test, cfg.input.max_size_test)
    resized = np.asarray(Image.fromarray(image_rgb).resize((nw, nh), Image.BILINEAR)) if (nh, nw) != (h, w) else image_rgb
    sample = {"image": torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))), "height": h, "width": w}
    with torch.inference_mode():
        out = model([sample])[0]
    return prediction_to_coco(*out["panoptic_seg"])


class PanopticPyfunc(mlflow.pyfunc.PythonModel):
    """DataFrame with column ``image`` (encoded JPEG/PNG bytes) -> ``panoptic_png`` (COCO
    panoptic PNG bytes) and ``segments_info`` (JSON list, COCO category ids)."""

    def load_context(self, context):
        from components.model.weights import load_model

        self.model, self.cfg, self.categories = load_model(context.artifacts["model"], "cpu")

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from components.common.coco_panoptic import decode_image, encode_png

        pngs, infos = [], []
        for k, data in enumerate(model_input["image"]):
            ids, info = predict_image(self.model, self.cfg, decode_image(bytes(data), f"row {k}"))
            pngs.append(encode_png(ids))
            infos.append(json.dumps(info))
        return pd.DataFrame({"panoptic_png": pngs, "segments_info": infos})


def log_pyfunc(model_path: str, registered_model_name: str | None = None):
    """Log a model.pt as a pyfunc in the active run (with our package as code)."""
    return mlflow.pyfunc.log_model(name="model", python_model=PanopticPyfunc(), artifacts={"model": model_path},
                                   signature=SIGNATURE, code_paths=[PACKAGE_DIR],
                                   registered_model_name=registered_model_name, pip_requirements=[])


def load_panoptic_model(uri: str):
    """(model, cfg, categories) from a model.pt path/URI or an MLflow URI (``models:/name@alias``,
    ``runs:/...``)."""
    if uri.startswith(("models:/", "runs:/")):
        pyfunc = mlflow.pyfunc.load_model(uri)
        inner = pyfunc.unwrap_python_model()
        return inner.model, inner.cfg, inner.categories
    from components.model.weights import load_model

    return load_model(uri, "cpu")


__all__ = ["PanopticPyfunc", "log_pyfunc", "load_panoptic_model", "predict_image", "SIGNATURE", "io"]
