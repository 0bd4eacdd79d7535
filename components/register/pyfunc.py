"""The MLflow pyfunc wrapper: input an image, output the panoptic ids (PNG) and segments_info.

A registered version serves wherever MLflow serves (``mlflow models serve``, a Seldon/KServe
MLflow server, ``mlflow.pyfunc.load_model`` in a notebook): it carries our package as code, the
requirements of what loading and predicting import (pinned to the versions that logged it), a
signature and an input example."""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import re

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", "image")]),
    outputs=Schema([ColSpec("binary", "panoptic_png"), ColSpec("string", "segments_info")]),
)
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # components/
# The distributions that load_context and predict import (beside mlflow, which MLflow adds
# itself): tests/unit/test_pyfunc.py runs both in a fresh interpreter and checks that every
# third-party module they import comes from one of these.
SERVING_DISTRIBUTIONS = ("torch", "torchvision", "numpy", "pillow", "pandas", "pyarrow", "pyyaml", "pyspng")


def pip_requirements() -> list[str]:
    """``SERVING_DISTRIBUTIONS`` pinned to the installed versions (a local label such as
    ``+cu128`` dropped: the index serves the version, the label names the build)."""
    pins = []
    for dist in SERVING_DISTRIBUTIONS:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue   # pyspng is optional (PIL decodes PNGs without it)
        pins.append(f"{dist}=={re.sub(r'[+].*$', '', version)}")
    return pins


class PanopticPyfunc(mlflow.pyfunc.PythonModel):
    """DataFrame with column ``image`` (encoded JPEG/PNG bytes) -> ``panoptic_png`` (COCO
    panoptic PNG bytes: id = R + 256 G + 256^2 B) and ``segments_info`` (a JSON list of COCO
    segments: id, category_id, category_name, isthing, area, bbox, iscrowd).

    Our own tools (predict, evaluate, warm starts) read only the ``model.pt`` inside a registered
    model, never this class's pickle: a model from a registry runs no code when we load it."""

    def load_context(self, context):
        from components.model.artifact import load_model

        self.model, self.cfg, self.categories = load_model(context.artifacts["model"], "cpu")

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from components.common.coco_panoptic import decode_image, encode_png
        from components.model.inference import predict_image

        names = self.categories.by_id
        pngs, infos = [], []
        for k, data in enumerate(model_input["image"]):
            ids, info = predict_image(self.model, self.cfg, decode_image(bytes(data), f"row {k}"))
            for s in info:
                category = names[s["category_id"]]
                s["category_name"], s["isthing"] = category.name, bool(category.isthing)
            pngs.append(encode_png(ids))
            infos.append(json.dumps(info))
        return pd.DataFrame({"panoptic_png": pngs, "segments_info": infos})


def input_example() -> pd.DataFrame:
    """One small JPEG (64 x 48, a gradient): shows the input's shape in MLflow's UI and lets
    ``mlflow models serve`` users copy a request."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:48, 0:64]
    rgb = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=85)
    return pd.DataFrame({"image": [buf.getvalue()]})


def log_pyfunc(model_path: str, *, name: str = "model", params: dict | None = None, tags: dict | None = None):
    """Log a model.pt as a pyfunc in the active run (with our package as code): a LoggedModel
    called ``name`` carrying ``params`` and ``tags``."""
    return mlflow.pyfunc.log_model(name=name, python_model=PanopticPyfunc(), artifacts={"model": model_path},
                                   signature=SIGNATURE, input_example=input_example(), code_paths=[PACKAGE_DIR],
                                   pip_requirements=pip_requirements(), params=params, tags=tags)
