"""A registered version serves where MLflow serves: a fresh virtualenv made from nothing but the
model's logged requirements loads it (our package travels as the model's code) and
``mlflow models serve`` answers a POST of a real photo with a panoptic PNG and named segments."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from tests.servers import free_port, stop, wait_http
from tests.unit.test_pyfunc import _tiny_model

pytestmark = [pytest.mark.slow]

PHOTO = os.path.join(os.path.dirname(__import__("matplotlib").__file__), "mpl-data", "sample_data",
                     "grace_hopper.jpg")   # a real photograph (512 x 600), shipped with matplotlib
LOAD = r"""
import base64, json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame({"image": [open(sys.argv[2], "rb").read()]}))
import components
print(json.dumps({"components": components.__file__, "segments": json.loads(out["segments_info"][0]),
                  "png": base64.b64encode(out["panoptic_png"][0]).decode()}))
"""


def _ids(png: bytes) -> np.ndarray:
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def _check(png: bytes, segments: list, cats) -> None:
    ids = _ids(png)
    assert ids.shape == Image.open(PHOTO).size[::-1]
    assert set(np.unique(ids)) - {0} <= {s["id"] for s in segments}
    for s in segments:
        assert s["category_name"] == cats.by_id[s["category_id"]].name


def test_a_registered_version_serves_from_its_logged_requirements(tmp_path):
    import mlflow

    from components.register.pyfunc import log_pyfunc

    cats = _tiny_model(tmp_path / "model.pt")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    exp = mlflow.create_experiment("serving", artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=exp):
        logged = log_pyfunc(str(tmp_path / "model.pt"), name="tiny-serving")
    version = mlflow.register_model(logged.model_uri, "serving-test").version
    uri = f"models:/serving-test/{version}"
    requirements = mlflow.pyfunc.get_model_dependencies(uri)
    pins = open(requirements).read().split()
    assert {p.split("==")[0] for p in pins} >= {"mlflow", "torch", "torchvision", "numpy", "pillow", "pandas"}

    # a fresh environment from the logged requirements alone (pip's cache reused)
    venv = tmp_path / "venv"
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "-r", requirements],
                   check=True, timeout=3000)
    print(f"serving venv from {len(pins)} logged requirements in {time.time() - t0:.0f} s")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(MLFLOW_TRACKING_URI=store, PATH=f"{venv / 'bin'}:{env['PATH']}")

    out = subprocess.run([str(venv / "bin" / "python"), "-c", LOAD, uri, PHOTO], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert not got["components"].startswith(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    _check(base64.b64decode(got["png"]), got["segments"], cats)

    port = free_port()
    server = subprocess.Popen([str(venv / "bin" / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "w"))
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", server, timeout=300)
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [
            [base64.b64encode(open(PHOTO, "rb").read()).decode()]]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            [prediction] = json.loads(response.read())["predictions"]
    finally:
        stop(server)
    _check(base64.b64decode(prediction["panoptic_png"]), json.loads(prediction["segments_info"]), cats)
