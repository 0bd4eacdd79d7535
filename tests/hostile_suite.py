"""The fault suite's second round: files made by an attacker or an unlucky operator, and faults of
the machine, through the commands that meet them (the first round, tests/fault_suite.py,
mutates well-formed files; this one crafts what no well-formed file is).

Classes, each a seeded generator of cases (``kinds`` x ``draws``, parameters drawn per case):

* ``pickle``: weights files that would crash, run code or exhaust memory: object and
  structured dtypes, a numeric dtype whose state claims object references (the 166-byte
  SIGSEGV), globals that call things, shapes larger than their bytes, deep nesting, cycles,
  truncation, entries of the wrong kind, NaN weights. Through ``predict --model`` and
  ``train --set model.weights=``.
* ``model-pt``: our model.pt made wrong: no config, a config that is no mapping, an unknown
  backbone, a missing, extra, misshapen or non-finite tensor, another format, truncation.
  Through ``predict`` and ``evaluate``.
* ``path``: reads that would leave their folder or never end: a sample file that is a symlink
  out of the dataset (or inside it: fine), a FIFO, a folder; an annotation file that is a FIFO;
  a shard index naming files elsewhere. Through ``data validate``, ``preprocess``, ``evaluate``.
* ``bomb``: resource bombs and odd shapes: a PNG or JPEG whose header declares gigapixels, an
  image thinner than a resize can keep, JSON nested thousands deep, an image with more segments
  than any. Through ``data validate``, ``preprocess``, ``predict``.
* ``gate``: evaluations and settings that would promote what must not be: PQ NaN, 999, negative,
  a string, a NaN per-class PQ, zero images, NaN or out-of-range margin and tolerance, the
  evaluation of another model, a partial evaluation against a full one, a model name with a
  quote. Through ``register``; the registry's champion and versions must not change.
* ``ckpt``: training state: the latest checkpoint truncated or garbage (resume from the one
  before, warning), every checkpoint broken, ``last_checkpoint`` naming a file elsewhere, a
  resume with another LR or backbone (refused, naming the keys; or applied with the flag).
  Through ``train``.
* ``limits``: more thing instances in an image than ``input.max_instances`` (trained on the
  largest, said), a cap of 0, a predict batch with a file whose name is no UTF-8 (skipped, named).
* ``flags``: numbers and addresses as typed: ``--size 1e400``/``inf``/``-3``/``0``, s3 addresses
  without a bucket or with ``..``, checkpoint periods below 1, sizes and channels of 0 or less
  or beyond any image, ``--workers -3`` (each a named error); predict inputs of one name in
  three folders (three predictions, none overwritten).
  Through ``train`` and ``predict``.
* ``server``: the MLflow server gone, or answering 500: ``register`` ends in one line, in
  bounded time, and promotes nothing.
* ``io``: a full disk, a read-only mount, no permission, a used-up quota (the errno injected at
  the write, as the kernel would return it). Through ``subset``, ``preprocess``, ``evaluate``,
  ``predict``, ``data synth``.

Every case runs in a worker process (``run_isolated``) so that a crash is seen as a crash (a
signal), not as the end of the suite. Outcomes: ``ok``, ``warned`` (ok, and it said why),
``named error``, ``quarantine line``, ``skipped line``; failures: ``traceback``, ``crash``,
``hang``, ``unnamed failure``, ``wrong outcome``, ``silent loss``, ``wrong promotion``.
``python -m tests.hostile_suite [WORKDIR]`` prints the table.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT = "val2017"
FAILURES = ("traceback", "crash", "hang", "unnamed failure", "wrong outcome", "silent loss", "wrong promotion")

# -- crafted pickles -----------------------------------------------------------------------------

_CORE = "numpy._core.multiarray"


class _Reduce:
    """An object that pickles as ``func(*args)`` followed by BUILD ``state``: what a crafter writes."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def _dtype(spec: str, flags: int = 0, fields=None):
    return _Reduce(np.dtype, (spec, False, True), (3, "<", None, None, fields, -1, -1, flags))


def _array(shape, dtype, data: bytes):
    from numpy._core.multiarray import _reconstruct

    return _Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, tuple(shape), dtype, False, data))


PICKLE_KINDS = ("object_dtype", "dtype_claims_references", "structured_dtype", "calls_os_system", "calls_eval",
                "shape_larger_than_bytes", "nested_deep", "holds_itself", "truncated", "not_a_mapping",
                "string_for_a_tensor", "nan_weights")
D2_KEY = "backbone.bottom_up.stem.conv1.weight"


def crafted_pickle(kind: str, rng: random.Random) -> bytes:
    n = rng.randrange(2, 64)
    if kind == "object_dtype":
        obj = {"model": {D2_KEY: np.array([object()] * 0 + [1, "x"] * n, dtype=object)}}
    elif kind == "dtype_claims_references":   # f8 whose state claims object references: numpy would deref
        obj = {"model": {D2_KEY: _array((n,), _dtype("f8", flags=rng.choice([1, 0x3f, 0x2f])), b"\x41" * 8 * n)}}
    elif kind == "structured_dtype":
        obj = {"model": {D2_KEY: np.zeros(n, dtype=[("a", "f4"), ("b", "O")])}}
    elif kind == "calls_os_system":
        obj = {"model": {D2_KEY: _Reduce(os.system, (f"echo pwned > /tmp/pwned-{rng.randrange(10**6)}",))}}
    elif kind == "calls_eval":
        obj = {"model": _Reduce(eval, ("__import__('os').getpid()",))}
    elif kind == "shape_larger_than_bytes":
        obj = {"model": {D2_KEY: _array((10 ** rng.randrange(9, 15),), _dtype("f4"), b"\0" * 16)}}
    elif kind == "nested_deep":   # written as opcodes: pickle itself recurses too deep to write it
        depth = rng.randrange(40, 200_000)
        return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."
    elif kind == "holds_itself":
        obj = {"model": {}}
        obj["model"]["self"] = obj
    elif kind == "truncated":
        data = pickle.dumps({"model": {D2_KEY: np.zeros((8, 3, 7, 7), np.float32)}}, protocol=2)
        return data[: rng.randrange(10, len(data) - 1)]
    elif kind == "not_a_mapping":
        obj = [np.zeros(3, np.float32)] * n
    elif kind == "string_for_a_tensor":
        obj = {"model": {D2_KEY: "weights" * n, "proposal_generator.x": 3}}
    elif kind == "nan_weights":
        w = np.full((64, 3, 7, 7), np.nan if rng.random() < 0.5 else np.inf, np.float32)
        obj = {"model": {D2_KEY: w}}
    else:
        raise ValueError(kind)
    return pickle.dumps(obj, protocol=2)


# -- model.pt made wrong -------------------------------------------------------------------------

MODEL_KINDS = ("no_config", "config_not_a_mapping", "unknown_backbone", "missing_tensor", "extra_tensor",
               "misshapen_tensor", "nan_tensor", "inf_tensor", "other_format", "categories_broken", "truncated",
               "state_not_tensors")


def broken_model(kind: str, good: bytes, rng: random.Random) -> bytes:
    import torch

    if kind == "truncated":
        return good[: rng.randrange(100, len(good) - 1)]
    blob = torch.load(io.BytesIO(good), weights_only=True)
    sd = blob["state_dict"]
    key = rng.choice(sorted(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1))
    if kind == "no_config":
        del blob["config"]
    elif kind == "config_not_a_mapping":
        blob["config"] = ["tiny"]
    elif kind == "unknown_backbone":
        blob["config"]["model"]["backbone"] = rng.choice(["resnet9000", "../../evil", ""])
    elif kind == "missing_tensor":
        del sd[key]
    elif kind == "extra_tensor":
        sd[f"roi_heads.surprise_{rng.randrange(100)}.weight"] = torch.zeros(3)
    elif kind == "misshapen_tensor":
        sd[key] = torch.zeros(sd[key].numel() + rng.randrange(1, 9))
    elif kind in ("nan_tensor", "inf_tensor"):
        t = sd[key].clone()
        t.view(-1)[rng.randrange(t.numel())] = float("nan") if kind == "nan_tensor" else float("-inf")
        sd[key] = t
    elif kind == "other_format":
        blob["format"] = rng.choice(["panoptic-fpn/v9", "detectron2", 7])
    elif kind == "categories_broken":
        blob["categories"] = [{"id": "one"}]
    elif kind == "state_not_tensors":
        blob["state_dict"] = {key: [1, 2, 3]}
    buf = io.BytesIO()
    torch.save(blob, buf)
    return buf.getvalue()


# -- the dataset made hostile ----------------------------------------------------------------------

PATH_KINDS = ("image_links_out", "png_links_out", "image_links_inside", "image_is_a_fifo", "png_is_a_fifo",
              "image_is_a_folder", "json_is_a_fifo")
BOMB_KINDS = ("png_declares_gigapixels", "jpeg_declares_gigapixels", "json_declares_gigapixels", "thin_image",
              "json_nested_deep", "too_many_segments")
# what preprocess must quarantine each sample as (None: the command fails as a whole, named)
QUARANTINE_AS = {"image_links_out": "file_outside_dataset", "png_links_out": "file_outside_dataset",
                 "image_links_inside": None, "image_is_a_fifo": "not_a_regular_file",
                 "png_is_a_fifo": "not_a_regular_file", "image_is_a_folder": "not_a_regular_file",
                 "png_declares_gigapixels": "image_too_large", "jpeg_declares_gigapixels": "image_too_large",
                 "json_declares_gigapixels": "image_too_large", "thin_image": "degenerate_shape"}


def _json_path(root: str) -> str:
    return os.path.join(root, "annotations", f"panoptic_{SPLIT}.json")


def _pick(root: str, rng: random.Random):
    doc = json.load(open(_json_path(root)))
    im = rng.choice(doc["images"])
    ann = next(a for a in doc["annotations"] if a["image_id"] == im["id"])
    return doc, im, ann, os.path.join(root, SPLIT, im["file_name"]), \
        os.path.join(root, "annotations", f"panoptic_{SPLIT}", ann["file_name"])


def _png_header(h: int, w: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + \
        chunk(b"IEND", b"")


def _jpeg_with_size(data: bytes, h: int, w: int) -> bytes:
    out = bytearray(data)
    i = 2
    while i < len(out) - 9:
        if out[i] == 0xFF and out[i + 1] in (0xC0, 0xC1, 0xC2):
            out[i + 5:i + 7] = h.to_bytes(2, "big")
            out[i + 7:i + 9] = w.to_bytes(2, "big")
            return bytes(out)
        i += 2 + int.from_bytes(out[i + 2:i + 4], "big")
    raise ValueError("no SOF marker")


def hostile_dataset(root: str, kind: str, rng: random.Random, outside: str) -> None:
    """Make ``root`` (a private copy of a good dataset) hostile one way."""
    from PIL import Image

    doc, im, ann, image, png = _pick(root, rng)
    if kind in ("image_links_out", "png_links_out"):
        target = image if kind == "image_links_out" else png
        os.remove(target)
        os.symlink(rng.choice([outside, "/etc/hostname", "/proc/self/environ"]), target)
    elif kind == "image_links_inside":   # a link to a file inside the split: read as the file it is
        keep = os.path.join(root, SPLIT, "kept-" + os.path.basename(image))
        shutil.move(image, keep)
        os.symlink(os.path.basename(keep), image)
    elif kind in ("image_is_a_fifo", "png_is_a_fifo"):
        target = image if kind == "image_is_a_fifo" else png
        os.remove(target)
        os.mkfifo(target)
    elif kind == "image_is_a_folder":
        os.remove(image)
        os.makedirs(image)
    elif kind == "json_is_a_fifo":
        os.remove(_json_path(root))
        os.mkfifo(_json_path(root))
    elif kind == "png_declares_gigapixels":
        open(png, "wb").write(_png_header(rng.randrange(9000, 60000), rng.randrange(9000, 60000)))
    elif kind == "jpeg_declares_gigapixels":
        data = open(image, "rb").read()
        open(image, "wb").write(_jpeg_with_size(data, rng.randrange(9000, 65000), rng.randrange(9000, 65000)))
    elif kind == "json_declares_gigapixels":
        im["height"], im["width"] = rng.randrange(20000, 65535), rng.randrange(20000, 65535)
        json.dump(doc, open(_json_path(root), "w"))
    elif kind == "thin_image":
        h, w = (1, rng.randrange(200, 900)) if rng.random() < 0.5 else (rng.randrange(300, 900), 2)
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(image, format="JPEG")
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(png, format="PNG")
        im["height"], im["width"] = h, w
        ann["segments_info"] = []
        json.dump(doc, open(_json_path(root), "w"))
    elif kind == "json_nested_deep":
        depth = rng.randrange(1100, 60000)
        raw = json.dumps(doc)
        open(_json_path(root), "w").write(raw[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}")
    elif kind == "too_many_segments":
        ann["segments_info"] = [{"id": i + 1, "category_id": ann["segments_info"][0]["category_id"], "iscrowd": 0}
                                for i in range(rng.randrange(10_001, 30_000))]
        json.dump(doc, open(_json_path(root), "w"))
    else:
        raise ValueError(kind)


# -- running cases in workers --------------------------------------------------------------------

def _classify(exit_code: int, text: str, exception: str | None) -> str:
    if exception is not None or "Traceback (most recent call last)" in text:
        return "traceback"
    if exit_code == 0:
        return "ok"
    if "Error: " in text or "problems by kind" in text:   # data validate's report names each problem
        return "named error"
    if "skipped " in text:
        return "skipped line"
    return "unnamed failure"


def worker(cases_file: str, results_file: str) -> None:
    """Run each case in this process (``CliRunner``), writing a start line before and a result
    line after it: a case that crashes the process leaves its start line alone."""
    import signal

    from click.testing import CliRunner

    from components.cli import main as panoptic

    def hang(signum, frame):
        raise TimeoutError("the case did not finish in 120 s")

    signal.signal(signal.SIGALRM, hang)
    with open(results_file, "a") as out:
        for case in json.load(open(cases_file)):
            out.write(json.dumps({"id": case["id"], "started": True}) + "\n")
            out.flush()
            os.fsync(out.fileno())
            t0 = time.perf_counter()
            signal.alarm(120)
            try:
                r = CliRunner().invoke(panoptic, case["args"], env=case.get("env") or None)
                text = r.output + (getattr(r, "stderr", "") or "")
                exc = None if r.exception is None or isinstance(r.exception, SystemExit) else \
                    f"{type(r.exception).__name__}: {str(r.exception)[:300]}"
                if isinstance(r.exception, TimeoutError):
                    exc, text = None, text + "\nHANG"
                code = r.exit_code
            finally:
                signal.alarm(0)
            out.write(json.dumps({"id": case["id"], "exit_code": code, "text": text[-3000:], "exception": exc,
                                  "seconds": time.perf_counter() - t0}) + "\n")
            out.flush()


def run_isolated(cases: list[dict], work: str) -> dict[str, dict]:
    """Results by case id; a worker killed by a signal marks the case it was in as a crash and
    the rest go to a new worker."""
    os.makedirs(work, exist_ok=True)
    results: dict[str, dict] = {}
    todo = list(cases)
    while todo:
        cases_file = os.path.join(work, f"cases-{len(results)}.json")
        results_file = os.path.join(work, f"results-{len(results)}.jsonl")
        json.dump(todo, open(cases_file, "w"))
        proc = subprocess.run([sys.executable, "-m", "tests.hostile_suite", "--worker", cases_file, results_file],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
                              timeout=3600)
        started = None
        for line in open(results_file) if os.path.exists(results_file) else []:
            rec = json.loads(line)
            if rec.get("started"):
                started = rec["id"]
            else:
                results[rec["id"]] = rec
                started = None
        if started is not None:   # the worker died inside this case
            results[started] = {"id": started, "exit_code": proc.returncode, "crash": True,
                                "text": proc.stderr[-2000:], "exception": None}
        elif proc.returncode != 0 and len(results) < len(cases):
            raise RuntimeError(f"the suite's worker failed outside any case:\n{proc.stderr[-3000:]}")
        todo = [c for c in todo if c["id"] not in results]
    return results


# -- the suite -----------------------------------------------------------------------------------

class Suite:
    """Builds the cases of every class (seeded), runs them, checks what each must leave behind."""

    def __init__(self, base_root: str, model_uri: str, work: str, seed: int = 0, draws: int = 2):
        self.base, self.model, self.work, self.draws = base_root, model_uri, work, draws
        self.rng = random.Random(seed)
        self.cases: list[dict] = []
        self.checks: dict[str, callable] = {}
        os.makedirs(work, exist_ok=True)
        self.outside = os.path.join(work, "outside.jpg")   # a decodable image beside the dataset
        doc = json.load(open(_json_path(base_root)))
        shutil.copy(os.path.join(base_root, SPLIT, doc["images"][0]["file_name"]), self.outside)
        self.image = os.path.join(base_root, SPLIT, doc["images"][0]["file_name"])
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.failures: list[str] = []

    def add(self, cls: str, command: str, case: str, args: list[str], env=None, check=None, expect=None):
        cid = f"{cls}:{case}|{command}"
        self.cases.append({"id": cid, "cls": cls, "command": command, "args": args, "env": env or {},
                           "expect": expect})
        if check:
            self.checks[cid] = check

    def path(self, *parts) -> str:
        return os.path.join(self.work, *parts)

    def fresh(self, name: str) -> str:
        root = self.path(name)
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(self.base, root, symlinks=True)
        return root

    # the classes
    def pickles(self, shards: str):
        for kind in PICKLE_KINDS:
            for k in range(self.draws):
                f = self.path("pickles", f"{kind}-{k}.pkl")
                os.makedirs(os.path.dirname(f), exist_ok=True)
                open(f, "wb").write(crafted_pickle(kind, self.rng))
                self.add("pickle", "predict", f"{kind}#{k}", ["predict", self.image, "--model", f, "--out",
                                                              self.path("pickles", "out")], expect="named error")
                self.add("pickle", "train", f"{kind}#{k}",
                         ["train", "--shards", shards, "--output", self.path("pickles", f"run-{kind}-{k}"), "--config",
                          "tiny", "--set", f"model.weights={f}", "--no-mlflow", "--quiet"], expect="named error")

    def models(self, shards: str):
        good = open(self.model, "rb").read()
        for kind in MODEL_KINDS:
            for k in range(self.draws):
                f = self.path("models", f"{kind}-{k}", "model.pt")
                os.makedirs(os.path.dirname(f), exist_ok=True)
                open(f, "wb").write(broken_model(kind, good, self.rng))
                self.add("model-pt", "predict", f"{kind}#{k}", ["predict", self.image, "--model", f, "--out",
                                                                self.path("models", "out")], expect="named error")
                out = self.path("models", f"eval-{kind}-{k}")
                self.add("model-pt", "evaluate", f"{kind}#{k}",
                         ["evaluate", "--model", f, "--shards", shards, "--out", out, "--quiet", "--workers", "0",
                          "--report-samples", "0"], expect="named error")

    def datasets(self):
        for cls, kinds in (("path", PATH_KINDS), ("bomb", BOMB_KINDS)):
            for kind in kinds:
                for k in range(self.draws):
                    root = self.fresh(f"{cls}-{kind}-{k}")
                    hostile_dataset(root, kind, self.rng, self.outside)
                    case = f"{kind}#{k}"
                    whole = kind in ("json_is_a_fifo", "json_nested_deep", "too_many_segments")
                    ok = kind == "image_links_inside"
                    self.add(cls, "data validate", case, ["data", "validate", root, "--split", SPLIT, "--quiet"],
                             expect="ok" if ok else "named error")
                    sub, out = os.path.join(root, "_subset"), os.path.join(root, "_shards")
                    if whole:
                        self.add(cls, "subset", case, ["subset", "--source", root, "--split", SPLIT, "--out", sub],
                                 expect="named error")
                        continue
                    subprocess.run([sys.executable, "-m", "components.select_subset", "--source", root, "--split",
                                    SPLIT, "--out", sub], check=True, capture_output=True, cwd=ROOT)
                    n = len(json.load(open(os.path.join(sub, "manifest.json")))["image_ids"])
                    self.add(cls, "preprocess", case, ["preprocess", "--manifest", sub, "--out", out, "--workers", "0",
                                                       "--quiet", "--max-bad-fraction", "1.0"],
                             check=self._quarantined(out, n, QUARANTINE_AS.get(kind)), expect="ok")
                    if kind == "thin_image":
                        self.add(cls, "predict", case, ["predict", self._thin_image(root), "--model", self.model,
                                                        "--out", os.path.join(root, "_pred")], expect="skipped line")

    def _thin_image(self, root: str) -> str:
        doc = json.load(open(_json_path(root)))
        im = next(i for i in doc["images"] if min(i["height"], i["width"]) < 4)
        return os.path.join(root, SPLIT, im["file_name"])

    def _quarantined(self, out: str, manifest_images: int, kind: str | None):
        def check(result: dict) -> str | None:
            index = json.load(open(os.path.join(out, "index.json")))
            lines = [json.loads(x) for x in open(os.path.join(out, "quarantine.jsonl")).read().splitlines()]
            if not (index["images_in"] == manifest_images == index["rows_written"] + index["quarantined"]
                    and index["quarantined"] == len(lines)):
                return "silent loss"
            kinds = {r["kind"] for q in lines for r in q["reasons"]}
            if kind is None:
                return None if not lines else "wrong outcome"
            return None if kind in kinds else "wrong outcome"
        return check

    def indexes(self, shards: str):
        for kind in ("shard_elsewhere", "shard_absolute", "shard_not_a_name", "bytes_not_a_number"):
            folder = self.path(f"index-{kind}")
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(shards, folder)
            index = json.load(open(os.path.join(folder, "index.json")))
            s = index["shards"][0]
            s.update({"shard_elsewhere": {"file": "../train/shards/" + s["file"]},
                      "shard_absolute": {"file": os.path.abspath(os.path.join(shards, s["file"]))},
                      "shard_not_a_name": {"file": ".hidden.parquet/x"},
                      "bytes_not_a_number": {"bytes": "lots"}}[kind])
            json.dump(index, open(os.path.join(folder, "index.json"), "w"))
            self.add("path", "evaluate", kind, ["evaluate", "--model", self.model, "--shards", folder, "--out",
                                                self.path(f"eval-{kind}"), "--quiet", "--workers", "0"],
                     expect="named error")

    def gates(self, registry: str, evaluation: str, champion_version: str):
        env = {"MLFLOW_TRACKING_URI": registry}

        def unchanged(result: dict) -> str | None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(registry)
            ok = str(client.get_model_version_by_alias("panoptic-fpn", "champion").version) == champion_version
            return None if ok else "wrong promotion"

        metrics = json.load(open(os.path.join(evaluation, "metrics.json")))
        edits = {"pq_nan": ("PQ", "NaN"), "pq_999": ("PQ", "999"), "pq_negative": ("PQ", "-0.25"),
                 "pq_a_string": ("PQ", '"best"'), "sq_infinite": ("SQ", "Infinity"), "images_zero": ("images", "0")}
        for kind, (key, value) in edits.items():
            folder = self.path("gate", kind)
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(evaluation, folder)
            text = open(os.path.join(folder, "metrics.json")).read()
            text = text.replace(f'"{key}": {json.dumps(metrics[key])}', f'"{key}": {value}', 1)
            open(os.path.join(folder, "metrics.json"), "w").write(text)
            self.add("gate", "register", kind, ["register", "--model", self.model, "--eval-dir", folder], env=env,
                     check=unchanged, expect="named error")
        folder = self.path("gate", "per_class_nan")
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(evaluation, folder)
        m = json.loads(open(os.path.join(evaluation, "metrics.json")).read())
        next(iter(m["results"]["per_class"].values()))["pq"] = "nan"
        json.dump(m, open(os.path.join(folder, "metrics.json"), "w"))
        self.add("gate", "register", "per_class_nan", ["register", "--model", self.model, "--eval-dir", folder],
                 env=env, check=unchanged, expect="named error")
        for kind, flags in (("margin_nan", ["--margin", "nan"]), ("tolerance_nan", ["--tolerance", "nan"]),
                            ("tolerance_negative", ["--tolerance", "-1"]), ("margin_above_one", ["--margin", "2"]),
                            ("name_with_a_quote", ["--name", "it's"])):
            self.add("gate", "register", kind, ["register", "--model", self.model, "--eval-dir", evaluation, *flags],
                     env=env, check=unchanged, expect="named error")
        other = self.path("gate", "other-model.pt")
        shutil.copy(self.model, other)
        open(other, "ab").write(b"\0")   # another file: its digest is not the evaluation's
        self.add("gate", "register", "evaluation_of_another_model", ["register", "--model", other, "--eval-dir",
                                                                     evaluation], env=env, check=unchanged,
                 expect="named error")
        partial = self.path("gate", "partial")
        self.partial_eval = partial
        self.add("gate", "register", "partial_evaluation_vs_the_champion",
                 ["register", "--model", self.model, "--eval-dir", partial], env=env, check=unchanged,
                 expect="named error")

    def checkpoints(self, shards: str, run: str):
        from components.train.trainer import CHECKPOINT_DIR

        names = sorted(n for n in os.listdir(os.path.join(run, CHECKPOINT_DIR)) if n.endswith(".pth"))
        base = ["train", "--shards", shards, "--config", "tiny", "--no-mlflow", "--quiet"]
        micro = [f"--set={o}" for o in MICRO_SETS]
        for kind in ("latest_truncated", "latest_garbage", "all_broken", "last_checkpoint_elsewhere",
                     "lr_changed", "backbone_changed", "lr_changed_allowed"):
            folder = self.path("ckpt", kind)
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(run, folder)
            ck = os.path.join(folder, CHECKPOINT_DIR)
            sets = list(micro) + ["--set=solver.max_iter=4"]
            expect = "warned"
            if kind == "latest_truncated":
                data = open(os.path.join(ck, names[-1]), "rb").read()
                open(os.path.join(ck, names[-1]), "wb").write(data[: self.rng.randrange(10, len(data) // 2)])
            elif kind == "latest_garbage":
                open(os.path.join(ck, names[-1]), "wb").write(os.urandom(self.rng.randrange(10, 5000)))
            elif kind == "all_broken":
                for n in names:
                    open(os.path.join(ck, n), "wb").write(b"PK\x03\x04" + os.urandom(100))
                expect = "named error"
            elif kind == "last_checkpoint_elsewhere":
                open(os.path.join(ck, "last_checkpoint"), "w").write("../../" + os.path.basename(self.model))
            elif kind in ("lr_changed", "lr_changed_allowed"):
                # allowed, the resumed run trains at the new LR (it kept the old one before): a
                # plausible change, not one that makes the tiny model diverge
                sets.append("--set=solver.base_lr=0.5" if kind == "lr_changed" else "--set=solver.base_lr=0.03")
                expect = "named error" if kind == "lr_changed" else "warned"
            elif kind == "backbone_changed":
                sets.append("--set=model.backbone=resnet34")
                expect = "named error"
            flags = ["--allow-config-change"] if kind == "lr_changed_allowed" else []
            self.add("ckpt", "train", kind, base + ["--output", folder] + sets + flags, expect=expect)

    def limits(self, shards: str):
        """Caps a crowded image or an odd file name meets: training with more thing instances in an
        image than ``input.max_instances`` (the largest are kept, said), a cap out of range, and a
        predict batch holding a file whose name is no UTF-8."""
        base = ["train", "--shards", shards, "--config", "tiny", "--no-mlflow", "--quiet",
                *(f"--set={o}" for o in MICRO_SETS), "--set=solver.max_iter=1"]
        self.add("limits", "train", "more_instances_than_the_cap",
                 base + ["--output", self.path("limits", "capped"), "--set=input.max_instances=1"], expect="warned")
        self.add("limits", "train", "instance_cap_zero",
                 base + ["--output", self.path("limits", "cap0"), "--set=input.max_instances=0"], expect="named error")
        folder = self.path("limits", "names")
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        shutil.copy(self.image, os.path.join(folder, "good.jpg"))
        shutil.copy(self.image, os.path.join(os.fsencode(folder), b"not-utf8-\xff\xfe.jpg"))
        self.add("limits", "predict", "a_name_that_is_not_utf8",
                 ["predict", folder, "--model", self.model, "--out", self.path("limits", "pred")],
                 expect="skipped line")

    def flags(self, shards: str):
        """Numbers and addresses a user types: counts that are no finite positive number, periods
        below 1, sizes and channels of 0 or less or beyond any image, negative worker counts, s3
        addresses without a bucket or with '..' (each refused where it is parsed, naming the value),
        and predict inputs of one name in several folders (each written, under a name of its own)."""
        sub = ["subset", "--source", self.base, "--split", SPLIT, "--out"]
        for case, size in (("size_1e400", "1e400"), ("size_inf", "inf"), ("size_negative", "-3"), ("size_zero", "0")):
            self.add("flags", "subset", case, sub + [self.path("flags", case), "--size", size], expect="named error")
        for case, out in (("s3_without_bucket", "s3://"), ("s3_key_with_dotdot", "s3://bucket/a/../b")):
            self.add("flags", "subset", case, sub + [out, "--size", "2"], expect="named error")
        train = ["train", "--shards", shards, "--config", "tiny", "--no-mlflow", "--quiet", "--output",
                 self.path("flags", "train")]
        for case, value in (("checkpoint_period_zero", "solver.checkpoint_period=0"),
                            ("checkpoint_period_negative", "solver.checkpoint_period=-1"),
                            ("test_size_30000", "input.max_size_test=30000"),
                            ("train_size_zero", "input.min_size_train=[0]"),
                            ("channels_zero", "model.fpn_channels=0"), ("channels_negative", "model.fpn_channels=-8")):
            self.add("flags", "train", case, train + [f"--set={value}"], expect="named error")
        self.add("flags", "evaluate", "workers_negative", ["evaluate", "--model", self.model, "--shards", shards,
                                                           "--out", self.path("flags", "eval"), "--workers", "-3"],
                 expect="named error")
        folder = self.path("flags", "stems")
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(os.path.join(folder, "dir"))
        shutil.copy(self.image, os.path.join(folder, "a.jpg"))
        shutil.copy(self.image, os.path.join(folder, "dir", "a.jpg"))
        from PIL import Image

        Image.open(self.image).save(os.path.join(folder, "dir", "a.png"))
        out = self.path("flags", "stems-out")

        def three(result: dict) -> str | None:   # three inputs, three predictions: none overwritten
            return None if sorted(f for f in os.listdir(out) if f.endswith(".json")) == [
                "a-2.json", "a-3.json", "a.json"] else "silent loss"

        self.add("flags", "predict", "one_name_in_three_folders",
                 ["predict", os.path.join(folder, "a.jpg"), os.path.join(folder, "dir", "a.jpg"),
                  os.path.join(folder, "dir", "a.png"), "--model", self.model, "--out", out], check=three, expect="ok")

    def servers(self, evaluation: str):
        from tests.servers import free_port

        dead = f"http://127.0.0.1:{free_port()}"

        def bounded(result: dict) -> str | None:
            return None if result["seconds"] < 90 else "hang"

        self.add("server", "register", "mlflow_gone", ["register", "--model", self.model, "--eval-dir", evaluation],
                 env={"MLFLOW_TRACKING_URI": dead}, check=bounded, expect="named error")

    def disks(self, shards: str):
        for errno_name in ("ENOSPC", "EROFS", "EACCES", "EDQUOT"):
            env = {"PANOPTIC_OSERROR_AT": f"storage.write:{errno_name}"}
            root = self.fresh(f"io-{errno_name}")
            sub = os.path.join(root, "_subset")
            for command, args in (
                    ("subset", ["subset", "--source", root, "--split", SPLIT, "--out", sub]),
                    ("evaluate", ["evaluate", "--model", self.model, "--shards", shards, "--out",
                                  os.path.join(root, "_eval"), "--quiet", "--workers", "0"]),
                    ("predict", ["predict", self.image, "--model", self.model, "--out", os.path.join(root, "_pred")]),
                    ("data synth", ["data", "synth", "--out", os.path.join(root, "_synth"), "--train", "1", "--val",
                                    "1"])):
                self.add("io", command, errno_name, args, env=env, expect="named error")
            # preprocess: a manifest made without the fault, the shards written with it
            subprocess.run([sys.executable, "-m", "components.select_subset", "--source", root, "--split", SPLIT,
                            "--out", sub], check=True, capture_output=True, cwd=ROOT)
            self.add("io", "preprocess", errno_name, ["preprocess", "--manifest", sub, "--out",
                                                      os.path.join(root, "_shards"), "--workers", "0", "--quiet"],
                     env=env, expect="named error")

    # running
    def run(self) -> None:
        results = run_isolated(self.cases, self.path("_workers"))
        for case in self.cases:
            r = results[case["id"]]
            if r.get("crash"):
                outcome = "crash"
            elif "\nHANG" in r["text"]:
                outcome = "hang"
            else:
                outcome = _classify(r["exit_code"], r["text"], r["exception"])
                if outcome == "ok" and case["command"] == "preprocess" and "quarantined 0;" not in r["text"]:
                    outcome = "quarantine line"
                if outcome == "ok" and "WARNING" in r["text"] and case["expect"] == "warned":
                    outcome = "warned"
            check = self.checks.get(case["id"])
            failure = None
            if check and (outcome in ("ok", "quarantine line", "warned") or case["cls"] in ("gate", "server")):
                try:
                    failure = check(r)
                except Exception as e:   # what the case left behind is not what it must be
                    failure, r = "wrong outcome", {**r, "text": r["text"] + f"\ncheck: {type(e).__name__}: {e}"}
            wanted = {"ok": {"ok", "quarantine line"}, "warned": {"warned"}, "named error": {"named error"},
                      "skipped line": {"skipped line"}}.get(case["expect"], {outcome})
            if failure is None and outcome not in FAILURES and outcome not in wanted:
                failure = "wrong outcome"
            if failure:
                outcome = failure
            self.counts[f"{case['cls']} / {case['command']}"][outcome] += 1
            if outcome in FAILURES:
                self.failures.append(f"{case['id']}: {outcome} (wanted {case['expect']}): {r['text'][-400:]!r}")


MICRO_SETS = ["input.min_size_train=[96]", "input.max_size_train=128", "input.min_size_test=96",
              "input.max_size_test=128", "solver.ims_per_batch=2", "data.num_workers=0", "solver.checkpoint_period=1",
              "log_period=1"]


def build(work: str, seed: int = 0, draws: int = 2) -> Suite:
    """The base data (a small synthetic set), a model, its evaluation and a registry with it as
    champion, a training run with checkpoints; then every class's cases."""
    from components.evaluate.core import EvaluateSettings, evaluate
    from components.model.config import load_config, parse_overrides
    from components.synthetic.generator import SynthSettings, generate
    from components.train.trainer import train
    from tests.training import make_shards

    base = os.path.join(work, "base")
    if not os.path.exists(base):
        generate(base, SynthSettings(train=4, val=6, seed=11, min_side=96, max_side=160), progress=False)
    shards = make_shards(base, os.path.join(work, "train"))
    val = make_shards(base, os.path.join(work, "val"), split=SPLIT)
    cfg = load_config("tiny", parse_overrides(MICRO_SETS + ["solver.max_iter=2"]))
    run = os.path.join(work, "run")
    model = train(cfg, shards, run, progress=False).model_uri
    evaluation = os.path.join(work, "evaluation")
    evaluate(model, val, evaluation, EvaluateSettings(report_samples=0, num_workers=0), progress=False)
    registry = f"sqlite:///{os.path.join(work, 'registry.db')}"
    r = subprocess.run([sys.executable, "-m", "components.register", "--model", model, "--eval-dir", evaluation],
                       env={**os.environ, "MLFLOW_TRACKING_URI": registry}, capture_output=True, text=True, cwd=work)
    assert r.returncode == 0, r.stderr[-2000:]
    suite = Suite(base, model, os.path.join(work, "cases"), seed, draws)
    suite.pickles(shards)
    suite.models(val)
    suite.datasets()
    suite.indexes(val)
    suite.gates(registry, evaluation, "1")
    evaluate(model, val, suite.partial_eval, EvaluateSettings(report_samples=0, num_workers=0, max_images=1),
             progress=False)
    suite.checkpoints(shards, run)
    suite.limits(shards)
    suite.flags(val)
    suite.servers(evaluation)
    suite.disks(val)
    return suite


def render(suite: Suite) -> str:
    kinds = [k for k in ("ok", "warned", "named error", "quarantine line", "skipped line") + FAILURES
             if any(c.get(k) for c in suite.counts.values())]
    lines = [f"{'class / command':28s}{'cases':>6s}" + "".join(f"{k:>16s}" for k in kinds)]
    for name, c in sorted(suite.counts.items()):
        lines.append(f"{name:28s}{sum(c.values()):6d}" + "".join(f"{c.get(k, 0):16d}" for k in kinds))
    total = Counter()
    for c in suite.counts.values():
        total.update(c)
    lines.append(f"{'all':28s}{sum(total.values()):6d}" + "".join(f"{total.get(k, 0):16d}" for k in kinds))
    lines.append(f"failures: {len(suite.failures)}")
    lines += [f"  {f}" for f in suite.failures]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        import tempfile

        work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="hostile-")
        s = build(work)
        s.run()
        print(render(s))
