"""The MLflow pyfunc wrapper: input an image, output the panoptic ids (PNG) and segments_info."""

from __future__ import annotations

import json
import os

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", "image")]),
    outputs=Schema([ColSpec("binary", "panoptic_png"), ColSpec("string", "segments_info")]),
)
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # components/


class PanopticPyfunc(mlflow.pyfunc.PythonModel):
    """DataFrame with column ``image`` (encoded JPEG/PNG bytes) -> ``panoptic_png`` (COCO
    panoptic PNG bytes) and ``segments_info`` (JSON list, COCO category ids).

    Our own tools (predict, evaluate, warm starts) read only the ``model.pt`` inside a registered
    model, never this class's pickle: a model from a registry runs no code when we load it."""

    def load_context(self, context):
        from components.model.artifact import load_model

        self.model, self.cfg, self.categories = load_model(context.artifacts["model"], "cpu")

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from components.common.coco_panoptic import decode_image, encode_png
        from components.model.inference import predict_image

        pngs, infos = [], []
        for k, data in enumerate(model_input["image"]):
            ids, info = predict_image(self.model, self.cfg, decode_image(bytes(data), f"row {k}"))
            pngs.append(encode_png(ids))
            infos.append(json.dumps(info))
        return pd.DataFrame({"panoptic_png": pngs, "segments_info": infos})


def log_pyfunc(model_path: str):
    """Log a model.pt as a pyfunc in the active run (with our package as code)."""
    return mlflow.pyfunc.log_model(name="model", python_model=PanopticPyfunc(), artifacts={"model": model_path},
                                   signature=SIGNATURE, code_paths=[PACKAGE_DIR], pip_requirements=[])
