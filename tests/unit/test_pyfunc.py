"""The served model: what it imports is what it declares; its output names the categories."""

import io
import json
import os
import subprocess
import sys
import types

import numpy as np
import pandas as pd
import torch
from PIL import Image

from components.model.artifact import save_model
from components.model.config import load_config
from components.model.panoptic_fpn import PanopticFPN
from components.register.pyfunc import SERVING_DISTRIBUTIONS, PanopticPyfunc, input_example, pip_requirements
from tests.unit.test_model import coco_like

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# a fresh interpreter loads the model and predicts the input example, noting every module our own
# code imports, then names the distributions they come from (what a serving environment installs;
# pip brings what those require)
IMPORTS = r"""
import builtins, importlib.metadata, json, os, sys, types
ours = os.path.join(os.getcwd(), "components") + os.sep
direct, real_import = set(), builtins.__import__
def noting(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and (globals or {}).get("__file__", "").startswith(ours):
        direct.add(name.split(".")[0])
    return real_import(name, globals, locals, fromlist, level)
builtins.__import__ = noting
from components.register.pyfunc import PanopticPyfunc, input_example
m = PanopticPyfunc()
m.load_context(types.SimpleNamespace(artifacts={"model": sys.argv[1]}))
m.predict(None, input_example())
owners = importlib.metadata.packages_distributions()
print(json.dumps({name: owners.get(name, []) for name in sorted(direct)}))
"""


def _tiny_model(path, seed=0):
    """An untrained tiny model whose weights are drawn from ``seed`` (not from whatever the tests
    before left in the global RNG: about one draw in three labels nothing on the input example,
    seed 0 labels two segments), the global RNG left as it was."""
    cats = coco_like(3, 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PanopticFPN.from_config(load_config("tiny"), cats).eval()
    save_model(model, load_config("tiny"), cats, str(path))
    return cats


def test_what_load_and_predict_import_is_what_the_model_declares(tmp_path):
    _tiny_model(tmp_path / "model.pt")
    out = subprocess.run([sys.executable, "-c", IMPORTS, str(tmp_path / "model.pt")], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, check=True)
    modules = json.loads(out.stdout.strip().splitlines()[-1])
    unowned = {name for name, dists in modules.items() if not dists}
    assert unowned <= set(sys.stdlib_module_names) | {"components"}, modules
    imported = {d.lower() for dists in modules.values() for d in dists}
    ours = {"mlflow", "mlflow-skinny", "mlflow-tracing", "panoptic-pipeline"}   # MLflow adds its own pin
    undeclared = imported - set(SERVING_DISTRIBUTIONS) - ours
    assert not undeclared, f"load and predict import {undeclared}: add them to SERVING_DISTRIBUTIONS"
    assert {"torch", "torchvision", "numpy", "pillow", "pandas"} <= imported
    pins = dict(p.split("==") for p in pip_requirements())
    assert {"torch", "torchvision", "numpy", "pillow", "pandas"} <= set(pins)
    assert all(v and "+" not in v for v in pins.values())   # pinned, without a local build label


def test_the_output_names_each_segments_category(tmp_path):
    cats = _tiny_model(tmp_path / "model.pt")
    m = PanopticPyfunc()
    m.load_context(types.SimpleNamespace(artifacts={"model": str(tmp_path / "model.pt")}))
    out = m.predict(None, input_example())
    assert list(out.columns) == ["panoptic_png", "segments_info"]
    segments = json.loads(out["segments_info"][0])
    assert segments, "an untrained tiny model still labels the image (stuff at least)"
    for s in segments:
        c = cats.by_id[s["category_id"]]
        assert s["category_name"] == c.name and s["isthing"] is bool(c.isthing)
    ids = np.asarray(Image.open(io.BytesIO(out["panoptic_png"][0])).convert("RGB")).astype(np.int64)
    ids = ids[..., 0] + 256 * ids[..., 1] + 65536 * ids[..., 2]
    assert ids.shape == (48, 64) and set(np.unique(ids)) - {0} <= {s["id"] for s in segments}


def test_the_input_example_is_one_small_jpeg():
    ex = input_example()
    assert isinstance(ex, pd.DataFrame) and list(ex.columns) == ["image"] and len(ex) == 1
    data = ex["image"][0]
    assert data[:3] == b"\xff\xd8\xff" and len(data) < 4000


def test_a_registry_lookup_without_a_store_names_the_uri_and_creates_nothing(tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(input_example()["image"][0])
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, "-m", "components", "predict", str(photo), "--model",
                          "models:/panoptic-fpn@champion", "--out", "o"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 1
    assert "no MLflow store at sqlite:///mlflow.db" in out.stderr and str(tmp_path / "mlflow.db") in out.stderr
    assert "MLFLOW_TRACKING_URI" in out.stderr and "Traceback" not in out.stderr
    assert sorted(os.listdir(tmp_path)) == ["photo.jpg"]


def test_predict_of_inputs_with_the_same_name_overwrites_nothing(tmp_path):
    """a.jpg, dir/a.jpg and dir/a.png: three predictions, three sets of files (a, a-2, a-3), said;
    an s3:// address without a bucket is refused before anything is read."""
    _tiny_model(tmp_path / "model.pt")
    jpeg = input_example()["image"][0]
    (tmp_path / "in" / "dir").mkdir(parents=True)
    (tmp_path / "in" / "a.jpg").write_bytes(jpeg)
    (tmp_path / "in" / "dir" / "a.jpg").write_bytes(jpeg)
    from PIL import Image

    Image.open(tmp_path / "in" / "a.jpg").save(tmp_path / "in" / "dir" / "a.png")
    out = subprocess.run([sys.executable, "-m", "components", "predict", str(tmp_path / "in" / "a.jpg"),
                          str(tmp_path / "in" / "dir"), "--model", str(tmp_path / "model.pt"), "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    names = sorted(os.listdir(tmp_path / "out"))
    assert names == sorted(f"{s}{x}" for s in ("a", "a-2", "a-3") for x in (".png", "_overlay.png", ".json"))
    assert "written as a-2.*" in out.stderr and "wrote 3 predictions" in out.stdout
    sources = {json.load(open(tmp_path / "out" / f"{s}.json"))["file_name"] for s in ("a", "a-2", "a-3")}
    assert sources == {"a.jpg", "a.png"}
    out = subprocess.run([sys.executable, "-m", "components", "predict", str(tmp_path / "in" / "a.jpg"), "--model",
                          str(tmp_path / "model.pt"), "--out", "s3://"], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert out.returncode == 2 and "not an s3:// address with a bucket" in out.stderr
    assert not os.path.exists(tmp_path / "s3:")


def test_a_file_name_that_is_not_utf8_is_skipped_naming_it_and_the_batch_goes_on(tmp_path):
    """One folder entry named with a byte that is no UTF-8 (0xff): that file is skipped with a
    line naming its bytes; the others are predicted; the exit code says something was skipped."""
    _tiny_model(tmp_path / "model.pt")
    jpeg = input_example()["image"][0]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "good.jpg").write_bytes(jpeg)
    with open(os.path.join(os.fsencode(tmp_path / "in"), b"bad\xff.jpg"), "wb") as f:
        f.write(jpeg)
    out = subprocess.run([sys.executable, "-m", "components", "predict", str(tmp_path / "in"), "--model",
                          str(tmp_path / "model.pt"), "--out", str(tmp_path / "out")], capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"skipped {tmp_path / 'in'}/bad\\xff.jpg: its name is not UTF-8 text; rename it" in out.stderr
    assert "wrote 1 predictions" in out.stdout and "skipped 1" in out.stdout
    assert sorted(os.listdir(tmp_path / "out")) == ["good.json", "good.png", "good_overlay.png"]
