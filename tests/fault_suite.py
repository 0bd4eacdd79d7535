"""The fault suite: seeded, bounded mutations of every file a user hands us, through every command
that reads them. Each case must end in a named error (a clean exit with a message, no
traceback) or a quarantine line / a skipped line, and no image may go missing:
``images in = rows written + quarantined``.

``run_suite`` returns the counts by command and outcome, and the failures (empty when all is
well). ``python -m tests.fault_suite`` prints the table (the figures in the closing notes).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections import Counter, defaultdict

import numpy as np
from click.testing import CliRunner
from PIL import Image

from components.cli import main as panoptic

# -- the mutations ---------------------------------------------------------------------------

JSON_KINDS = ("truncated_json", "not_utf8", "images_not_a_list", "height_a_string", "width_huge", "id_a_string",
              "missing_annotations_key", "missing_file_name", "segments_not_a_list", "segment_id_huge",
              "duplicate_image", "duplicate_annotation", "area_huge", "bbox_infinite", "category_id_a_float",
              "escaping_image_name", "escaping_to_a_real_image", "absolute_image_name", "escaping_png_name",
              "empty_file_name", "nul_in_name", "uri_as_name")
ESCAPING = ("escaping_image_name", "escaping_to_a_real_image", "absolute_image_name", "escaping_png_name",
            "empty_file_name", "nul_in_name", "uri_as_name")
OUTSIDE = "outside.jpg"  # a decodable image next to the dataset folder: reading it would write a row
FILE_KINDS = ("truncated", "zero_bytes", "text", "png_as_jpeg", "palette_png", "sixteen_bit_png", "rgba_png",
              "wrong_size", "bit_flips", "gray_jpeg")
SHARD_KINDS = ("truncated", "bit_flips", "zeroed_tail", "not_parquet")


def mutate_json(doc: dict, kind: str, rng: random.Random) -> dict | bytes:
    """The annotation document broken one way (bytes when the break is below JSON)."""
    doc = json.loads(json.dumps(doc))
    im = rng.choice(doc["images"])
    ann = next(a for a in doc["annotations"] if a["image_id"] == im["id"])
    seg = rng.choice(ann["segments_info"])
    if kind == "truncated_json":
        raw = json.dumps(doc).encode()
        return raw[: rng.randrange(1, len(raw) - 1)]
    if kind == "not_utf8":
        return json.dumps(doc).encode()[:50] + b"\xff\xfe\xfa" + json.dumps(doc).encode()[50:]
    if kind == "images_not_a_list":
        doc["images"] = {"0": im}
    elif kind == "height_a_string":
        im["height"] = "tall"
    elif kind == "width_huge":
        im["width"] = 10 ** rng.randrange(6, 40)
    elif kind == "id_a_string":
        im["id"] = str(im["id"])
    elif kind == "missing_annotations_key":
        del doc["annotations"]
    elif kind == "missing_file_name":
        del rng.choice([im, ann])["file_name"]
    elif kind == "segments_not_a_list":
        ann["segments_info"] = "none"
    elif kind == "segment_id_huge":
        seg["id"] = 2 ** rng.randrange(25, 70)
    elif kind == "duplicate_image":
        doc["images"].append(dict(im))
    elif kind == "duplicate_annotation":
        doc["annotations"].append(dict(ann))
    elif kind == "area_huge":
        seg["area"] = 1e300
    elif kind == "bbox_infinite":
        seg["bbox"] = [0, 0, float("inf"), 3]
    elif kind == "category_id_a_float":
        seg["category_id"] = seg["category_id"] + 0.5
    elif kind == "escaping_image_name":
        im["file_name"] = "../" * rng.randrange(2, 12) + "etc/passwd"
    elif kind == "escaping_to_a_real_image":
        im["file_name"] = f"../../{OUTSIDE}"
    elif kind == "absolute_image_name":
        im["file_name"] = "/etc/passwd"
    elif kind == "escaping_png_name":
        ann["file_name"] = "../../" + ann["file_name"]
    elif kind == "empty_file_name":
        im["file_name"] = ""
    elif kind == "nul_in_name":
        im["file_name"] = im["file_name"] + "\x00.jpg"
    elif kind == "uri_as_name":
        im["file_name"] = "s3://someone-elses-bucket/private.jpg"
    else:
        raise ValueError(kind)
    return doc


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG") if mode else Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def mutate_file(data: bytes, kind: str, rng: random.Random) -> bytes:
    """An image or panoptic PNG's bytes broken (or turned into an unusual but valid file) one way."""
    import io

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"))
    if kind == "truncated":
        return data[: rng.randrange(1, len(data) - 1)]
    if kind == "zero_bytes":
        return b""
    if kind == "text":
        return b"this is not an image\n" * rng.randrange(1, 50)
    if kind == "png_as_jpeg":
        return _png(arr)
    if kind == "palette_png":
        buf = io.BytesIO()
        Image.fromarray(arr).convert("P", palette=Image.ADAPTIVE, colors=16).save(buf, format="PNG")
        return buf.getvalue()
    if kind == "sixteen_bit_png":
        return _png((arr[..., 0].astype(np.uint16) * 257))
    if kind == "rgba_png":
        return _png(np.dstack([arr, np.full(arr.shape[:2], 255, np.uint8)]))
    if kind == "wrong_size":
        return _png(arr[: max(1, arr.shape[0] - rng.randrange(1, 9))])
    if kind == "bit_flips":
        out = bytearray(data)
        for _ in range(rng.randrange(1, 6)):
            pos = rng.randrange(len(out))
            out[pos] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == "gray_jpeg":
        buf = io.BytesIO()
        Image.fromarray(arr).convert("L").save(buf, format="JPEG")
        return buf.getvalue()
    raise ValueError(kind)


def mutate_shard(data: bytes, kind: str, rng: random.Random) -> bytes:
    if kind == "truncated":
        return data[: rng.randrange(0, len(data) - 1)]
    if kind == "bit_flips":
        out = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            pos = rng.randrange(len(out))
            out[pos] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == "zeroed_tail":
        n = rng.randrange(1, 200)
        return data[:-n] + b"\0" * n
    if kind == "not_parquet":
        return b"PAR1" + os.urandom(len(data) - 8) + b"PAR1"
    raise ValueError(kind)


# -- running commands ------------------------------------------------------------------------

class Recorder:
    """Counts outcomes per command; keeps the cases that failed the suite's rules."""

    def __init__(self):
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.failures: list[str] = []

    def run(self, command: str, case: str, args: list[str], ok_codes=(0,), env=None):
        result = CliRunner().invoke(panoptic, args, env=env)
        text = result.output + (getattr(result, "stderr", "") or "")
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            kind = "traceback"
            self.failures.append(f"{command} [{case}]: traceback {type(result.exception).__name__}: "
                                 f"{str(result.exception)[:300]}")
        elif "Traceback (most recent call last)" in text:
            kind = "traceback"
            self.failures.append(f"{command} [{case}]: a traceback in the output")
        elif result.exit_code in ok_codes:
            kind = "ok"
        else:
            kind = "named error" if ("Error: " in text or "skipped " in text or "problems by kind" in text) \
                else "unnamed failure"
            if kind == "unnamed failure":
                self.failures.append(f"{command} [{case}]: exit {result.exit_code} without a message: {text[-300:]}")
        self.counts[command][kind] += 1
        return result, kind

    def count(self, command: str, kind: str, n: int = 1):
        self.counts[command][kind] += n


def _check_preprocess_counts(rec: Recorder, case: str, result, out: str, manifest_images: int):
    """images in = rows + quarantined, from the CLI line, index.json and quarantine.jsonl alike."""
    m = re.search(r"images in (\d+) = rows written (\d+) \+ quarantined (\d+)", result.output)
    if not m:
        return
    n_in, rows, quarantined = map(int, m.groups())
    index = json.load(open(os.path.join(out, "index.json")))
    lines = open(os.path.join(out, "quarantine.jsonl")).read().splitlines()
    if not (n_in == rows + quarantined == manifest_images == index["images_in"] and index["rows_written"] == rows
            and index["quarantined"] == len(lines) == quarantined):
        rec.failures.append(f"preprocess [{case}]: counts do not add up: in {n_in}, rows {rows} "
                            f"(index {index['rows_written']}), quarantined {quarantined} ({len(lines)} lines), "
                            f"manifest {manifest_images}")
    rec.count("preprocess", "quarantine line" if quarantined else "all rows written")


def run_suite(base_root: str, model_uri: str, work: str, seed: int = 0, json_cases: int = 2, file_cases: int = 2,
              shard_cases: int = 3) -> Recorder:
    """Every mutation kind, ``*_cases`` seeded draws each, through the commands that read it."""
    rng = random.Random(seed)
    rec = Recorder()
    split = "val2017"
    def json_path(root):
        return os.path.join(root, "annotations", f"panoptic_{split}.json")

    base_doc = json.load(open(json_path(base_root)))
    os.makedirs(work, exist_ok=True)
    first = base_doc["images"][0]["file_name"]
    shutil.copy(os.path.join(base_root, split, first), os.path.join(work, OUTSIDE))

    def fresh(name: str) -> str:
        root = os.path.join(work, name)
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(base_root, root)
        return root

    def preprocess_case(root: str, case: str):
        sub, out = os.path.join(root, "_subset"), os.path.join(root, "_shards")
        r, kind = rec.run("subset", case, ["subset", "--source", root, "--split", split, "--out", sub])
        if kind != "ok":
            rec.run("preprocess", case, ["preprocess", "--manifest", sub, "--out", out, "--workers", "0", "--quiet"])
            return
        n = len(json.load(open(os.path.join(sub, "manifest.json")))["image_ids"])
        r, kind = rec.run("preprocess", case, ["preprocess", "--manifest", sub, "--out", out, "--workers", "0",
                                               "--quiet", "--max-bad-fraction", "1.0"])
        if kind == "ok":
            _check_preprocess_counts(rec, case, r, out, n)
            if case.split(":")[1].split("#")[0] in ESCAPING:  # quarantined as such, never opened
                reasons = [q["kind"] for line in open(os.path.join(out, "quarantine.jsonl"))
                           for q in json.loads(line)["reasons"]]
                if "file_name_outside_dataset" not in reasons:
                    rec.failures.append(f"preprocess [{case}]: not quarantined as file_name_outside_dataset: {reasons}")

    # annotation JSON
    for kind in JSON_KINDS:
        for k in range(json_cases):
            case = f"json:{kind}#{k}"
            root = fresh("json")
            doc = mutate_json(base_doc, kind, rng)
            with open(json_path(root), "wb") as f:
                f.write(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
            rec.run("data validate", case, ["data", "validate", root, "--split", split, "--quiet"])
            preprocess_case(root, case)

    # images and panoptic PNGs (one sample each)
    for target in ("image", "png"):
        for kind in FILE_KINDS:
            for k in range(file_cases):
                case = f"{target}:{kind}#{k}"
                root = fresh("file")
                im = rng.choice(base_doc["images"])
                ann = next(a for a in base_doc["annotations"] if a["image_id"] == im["id"])
                path = os.path.join(root, split, im["file_name"]) if target == "image" else \
                    os.path.join(root, "annotations", f"panoptic_{split}", ann["file_name"])
                data = mutate_file(open(path, "rb").read(), kind, rng)
                with open(path, "wb") as f:
                    f.write(data)
                rec.run("data validate", case, ["data", "validate", root, "--split", split, "--quiet"], ok_codes=(0,))
                preprocess_case(root, case)
                if target == "image":  # predict takes user images
                    rec.run("predict", case, ["predict", path, "--model", model_uri, "--out",
                                              os.path.join(root, "_pred")])
                else:  # pq takes predictions: this PNG as a prediction of its own ground truth
                    pred_json = os.path.join(root, "_pred.json")
                    pred_dir = os.path.join(root, "annotations", f"panoptic_{split}")
                    json.dump({"annotations": base_doc["annotations"]}, open(pred_json, "w"))
                    rec.run("pq", case, ["pq", "--gt-json", json_path(base_root), "--gt-dir",
                                         os.path.join(base_root, "annotations", f"panoptic_{split}"),
                                         "--pred-json", pred_json, "--pred-dir", pred_dir, "--json"])

    # prediction JSON (pq)
    for kind in ("truncated_json", "not_utf8", "missing_annotations_key", "segments_not_a_list", "segment_id_huge",
                 "duplicate_annotation", "category_id_a_float", "escaping_png_name"):
        for k in range(json_cases):
            case = f"pred-json:{kind}#{k}"
            root = os.path.join(work, "predjson")
            os.makedirs(root, exist_ok=True)
            doc = mutate_json(base_doc, kind, rng)
            pred_json = os.path.join(root, "pred.json")
            with open(pred_json, "wb") as f:
                f.write(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
            rec.run("pq", case, ["pq", "--gt-json", json_path(base_root), "--gt-dir",
                                 os.path.join(base_root, "annotations", f"panoptic_{split}"), "--pred-json", pred_json,
                                 "--pred-dir", os.path.join(base_root, "annotations", f"panoptic_{split}"), "--json"])

    # shards: through the reader (evaluate) and a re-run of preprocess (which must repair them)
    root = fresh("shards")
    sub, out = os.path.join(root, "_subset"), os.path.join(root, "_shards")
    rec.run("subset", "shards:base", ["subset", "--source", root, "--split", split, "--out", sub])
    rec.run("preprocess", "shards:base", ["preprocess", "--manifest", sub, "--out", out, "--workers", "0", "--quiet",
                                          "--shard-images", "2"])
    shard_files = sorted(f for f in os.listdir(out) if f.endswith(".parquet"))
    pristine = {f: open(os.path.join(out, f), "rb").read() for f in shard_files}
    for kind in SHARD_KINDS:
        for k in range(shard_cases):
            case = f"shard:{kind}#{k}"
            name = rng.choice(shard_files)
            with open(os.path.join(out, name), "wb") as f:
                f.write(mutate_shard(pristine[name], kind, rng))
            rec.run("evaluate", case, ["evaluate", "--model", model_uri, "--shards", out, "--out",
                                       os.path.join(root, "_eval"), "--quiet", "--workers", "0",
                                       "--report-samples", "0"])
            r, _ = rec.run("preprocess", case + " (re-run)", ["preprocess", "--manifest", sub, "--out", out,
                                                             "--workers", "0", "--quiet", "--shard-images", "2"])
            if open(os.path.join(out, name), "rb").read() != pristine[name]:
                rec.failures.append(f"preprocess [{case}]: a re-run did not restore the damaged shard")
    return rec


def render(rec: Recorder) -> str:
    kinds = sorted({k for c in rec.counts.values() for k in c})
    lines = [f"{'command':16s}{'cases':>7s}" + "".join(f"{k:>18s}" for k in kinds)]
    for cmd, c in sorted(rec.counts.items()):
        lines.append(f"{cmd:16s}{sum(v for k, v in c.items() if k not in ('quarantine line', 'all rows written')):7d}"
                     + "".join(f"{c.get(k, 0):18d}" for k in kinds))
    lines.append(f"failures: {len(rec.failures)}")
    lines += [f"  {f}" for f in rec.failures]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m tests.fault_suite WORKDIR
    import sys
    import tempfile

    from components.synthetic.generator import SynthSettings, generate
    from tests.training import make_shards, micro_config

    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="faults-")
    base = os.path.join(work, "base")
    if not os.path.exists(base):
        generate(base, SynthSettings(train=4, val=6, seed=11, min_side=96, max_side=160), progress=False)
    from components.train.trainer import train

    model = train(micro_config(solver={"max_iter": 1}), make_shards(base, os.path.join(work, "t")),
                  os.path.join(work, "m"), progress=False).model_uri
    print(render(run_suite(base, model, os.path.join(work, "cases"))))
