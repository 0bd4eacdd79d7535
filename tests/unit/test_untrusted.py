"""Files from elsewhere never run code, and file names never leave the dataset folder."""

from __future__ import annotations

import io
import json
import os
import pickle

import pytest
import torch
from click.testing import CliRunner

from components.cli import main as panoptic
from components.common import storage
from components.common.coco_panoptic import UnsafeFileName, image_uri
from components.model.weights import UnsafeCheckpointError, read_checkpoint


class Evil:
    """Unpickling this calls os.system: the classic code-execution pickle."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_pickle_is_refused_by_predict_and_runs_nothing(tmp_path, synth_root):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": {"backbone.bottom_up.stem.conv1.weight": Evil(str(marker))}}))
    image = os.path.join(synth_root, "val2017", sorted(os.listdir(os.path.join(synth_root, "val2017")))[0])
    r = CliRunner().invoke(panoptic, ["predict", image, "--model", str(evil), "--out", str(tmp_path / "out")])
    assert r.exit_code == 1 and not marker.exists()
    assert r.exception is None or isinstance(r.exception, SystemExit)  # no traceback
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "evil.pkl: refused: this pickle needs posix.system to load" in lines[0]


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_crafted_torch_file_is_refused_by_the_weights_loader(tmp_path, fmt):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"model": {"x": Evil(str(marker))}}, buf, _use_new_zipfile_serialization=fmt == "zip")
    with pytest.raises(UnsafeCheckpointError, match=r"evil.pth: refused: this torch file needs posix.system"):
        read_checkpoint(buf.getvalue(), "evil.pth")
    assert not marker.exists()


def test_crafted_weights_fail_train_with_one_line(tmp_path, synth_root):
    from tests.training import make_shards

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": Evil(str(marker))}, str(evil))
    shards = make_shards(synth_root, str(tmp_path / "s"))
    r = CliRunner().invoke(panoptic, ["train", "--shards", shards, "--output", str(tmp_path / "run"), "--config",
                                      "tiny", "--set", f"model.weights={evil}", "--no-mlflow", "--quiet"])
    assert r.exit_code == 1 and not marker.exists() and "refused" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_a_model_zoo_pickle_of_arrays_still_loads(tmp_path):
    import numpy as np

    data = pickle.dumps({"model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, "__author__": "x"}, protocol=2)
    state = read_checkpoint(data, "ok.pkl")
    assert state["model"]["w"].shape == (2, 3)


def test_a_billion_laughs_pickle_is_refused_at_once_and_shared_arrays_still_load(tmp_path, synth_root):
    """Ten references to a list of ten references ... nine deep: a few hundred bytes that unroll to
    10^9 numbers wherever the tree becomes an array. The reader counts what it would materialise
    (a shared container once per reference) and refuses it in one line, before any array exists."""
    import time

    import numpy as np

    laughs = [0.0] * 10
    for _ in range(8):
        laughs = [laughs] * 10
    data = pickle.dumps({"model": {"backbone.bottom_up.stem.conv1.weight": laughs}}, protocol=2)
    assert len(data) < 400
    t0 = time.perf_counter()
    with pytest.raises(UnsafeCheckpointError, match=r"laughs.pkl: refused: .*shared references that unroll to more "
                                                     r"than 10,000,000 entries"):
        read_checkpoint(data, "laughs.pkl")
    assert time.perf_counter() - t0 < 1.0
    from tests.training import make_shards

    path = tmp_path / "laughs.pkl"
    path.write_bytes(data)   # as a user meets it: train from it, one line, nothing else
    shards = make_shards(synth_root, str(tmp_path / "s"))
    r = CliRunner().invoke(panoptic, ["train", "--shards", shards, "--output", str(tmp_path / "run"), "--config",
                                      "tiny", "--set", f"model.weights={path}", "--no-mlflow", "--quiet"])
    assert r.exit_code == 1 and "shared references that unroll" in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    # a checkpoint whose keys share one array is ordinary: it loads
    shared = np.arange(6, dtype=np.float32)
    state = read_checkpoint(pickle.dumps({"a": shared, "b": shared, "c": [shared] * 3}), "shared.pkl")
    assert np.array_equal(state["b"], shared) and len(state["c"]) == 3


@pytest.mark.parametrize("name", ["../../../../../../../../../../etc/passwd", "/etc/passwd", "", "a\x00b.jpg",
                                  "sub/../../x.jpg", "s3://other-bucket/x.jpg", "..\\x.jpg"])
def test_file_names_that_leave_the_dataset_are_refused(name):
    with pytest.raises(UnsafeFileName, match="file name leaves the dataset folder"):
        image_uri("/data/coco", "train2017", name)
    assert image_uri("/data/coco", "train2017", "sub/000001.jpg") == "/data/coco/train2017/sub/000001.jpg"


def test_escaping_file_name_is_reported_by_validate_and_quarantined_unopened(synth_copy, tmp_path):
    """The file it points at is a good image: were it opened, it would become a row."""
    import shutil

    from components.common.manifests import load_manifest
    from components.preprocess.core import PreprocessSettings, preprocess
    from components.select_subset.core import SplitSettings, select_subset

    path = os.path.join(synth_copy, "annotations", "panoptic_train2017.json")
    doc = json.load(open(path))
    victim = doc["images"][0]
    shutil.copy(os.path.join(synth_copy, "train2017", victim["file_name"]), os.path.join(synth_copy, "..", "x.jpg"))
    victim["file_name"] = "../../x.jpg"
    json.dump(doc, open(path, "w"))
    r = CliRunner().invoke(panoptic, ["data", "validate", synth_copy, "--split", "train2017", "--quiet"])
    assert r.exit_code == 1 and "file_name_outside_dataset" in r.output and "'../../x.jpg'" in r.output
    m = select_subset(SplitSettings(), synth_copy, "train2017", str(tmp_path / "sub")).manifest_uri
    res = preprocess(PreprocessSettings(workers=0, max_bad_fraction=0.5), m, str(tmp_path / "shards"), progress=False)
    q = [json.loads(line) for line in open(tmp_path / "shards" / "quarantine.jsonl")]
    assert [e["image_id"] for e in q] == [victim["id"]]
    assert q[0]["reasons"][0]["kind"] == "file_name_outside_dataset"
    assert res.images_in == len(load_manifest(m)["image_ids"]) == res.rows_written + res.quarantined


class _Reduce:
    def __init__(self, func, args, state):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return self.func, self.args, self.state


def test_a_dtype_that_claims_object_references_is_refused_not_dereferenced(tmp_path, synth_root):
    """numpy's own constructors would build an object array from these bytes and dereference them
    (SIGSEGV with numpy's allow-listed globals); the reader refuses them in one line."""
    import numpy as np
    from numpy._core.multiarray import _reconstruct

    dtype = _Reduce(np.dtype, ("f8", False, True), (3, "<", None, None, None, -1, -1, 0x3F))
    array = _Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (2,), dtype, False, b"\x41" * 16))
    f = tmp_path / "crafted.pkl"
    f.write_bytes(pickle.dumps({"model": {"w": array}}, protocol=2))
    assert len(f.read_bytes()) < 400
    image = os.path.join(synth_root, "val2017", sorted(os.listdir(os.path.join(synth_root, "val2017")))[0])
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "components", "predict", image, "--model", str(f), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, (r.returncode, r.stderr[-500:])   # not -11 (SIGSEGV)
    assert "object references" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickles_of_arrays_load_exactly_at_every_protocol(protocol):
    import numpy as np

    from components.model.safe_pickle import loads_data

    state = {"model": {"a": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "b": np.ones((3,), ">i8"),
                       "c": np.asfortranarray(np.eye(3)), "d": np.zeros((0, 4), np.uint8), "e": np.float64(2.5)},
             "__author__": "x", "matching_heuristics": True}
    out = loads_data(pickle.dumps(state, protocol=protocol))
    for k in ("a", "b", "c", "d"):
        assert out["model"][k].dtype == state["model"][k].dtype and (out["model"][k] == state["model"][k]).all()
    assert out["model"]["e"] == 2.5 and out["__author__"] == "x" and out["matching_heuristics"] is True


def test_a_fifo_or_a_link_out_of_its_folder_is_refused_without_reading(tmp_path):
    import threading

    from components.common import storage

    fifo = tmp_path / "image.jpg"
    os.mkfifo(fifo)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("e", _raises(storage.read_bytes, str(fifo))), daemon=True)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive(), "reading a FIFO blocked"   # no writer ever comes
    assert isinstance(result["e"], storage.UnsafePath) and "a FIFO" in str(result["e"])
    (tmp_path / "split").mkdir()
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path / "secret.txt", tmp_path / "split" / "x.jpg")
    e = _raises(storage.read_bytes, str(tmp_path / "split" / "x.jpg"), within=str(tmp_path / "split"))
    assert isinstance(e, storage.UnsafePath) and e.kind == "leaves_folder"
    os.symlink("y.jpg", tmp_path / "split" / "z.jpg")   # a link inside the folder is read as its file
    (tmp_path / "split" / "y.jpg").write_bytes(b"jpeg")
    assert storage.read_bytes(str(tmp_path / "split" / "z.jpg"), within=str(tmp_path / "split")) == b"jpeg"


def _raises(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as e:
        return e
    return None


def test_evaluate_refuses_a_count_below_one_and_a_folder_another_run_writes(tmp_path):
    from components.common import storage
    from components.evaluate.core import EvaluateSettings

    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_images must be a whole number >= 1"):
            EvaluateSettings(max_images=bad)
    with storage.exclusive(str(tmp_path), ".evaluate.lock", "panoptic evaluate"):
        with pytest.raises(storage.FolderBusy, match="another panoptic evaluate .* is writing here"):
            with storage.exclusive(str(tmp_path), ".evaluate.lock", "panoptic evaluate"):
                pass
    (tmp_path / ".evaluate.lock").write_text('{"pid": 999999999, "host": "%s"}' % __import__("socket").gethostname())
    with storage.exclusive(str(tmp_path), ".evaluate.lock", "panoptic evaluate"):   # its holder is gone
        pass
    assert not (tmp_path / ".evaluate.lock").exists()


def test_a_json_record_with_a_repeated_key_is_refused_naming_it(tmp_path):
    p = tmp_path / "metrics.json"
    p.write_text('{"PQ": 0.1, "results": {"All": {"pq": 0.1}}, "PQ": 0.9}')
    with pytest.raises(ValueError, match=r"metrics.json: the metrics file names 'PQ' twice in one object"):
        storage.read_json(str(p), "metrics")
    p.write_text('{"a": {"x": 1}, "b": {"x": 2}}')   # the same key in two objects is no repeat
    assert storage.read_json(str(p), "metrics") == {"a": {"x": 1}, "b": {"x": 2}}
