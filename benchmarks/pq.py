"""PQ on files, timed as a user runs it: the whole command, default flags, beside the alternatives.

    .venv/bin/python benchmarks/pq.py [--images 1500] [--unique 250] [--rounds 5]

Generates COCO-sized ground truth (sides 400-640 px, synthetic scenes) and a prediction set
derived from it ("mixed": shifted, relabelled, missed and spurious segments); ``--unique``
scenes are rendered and their files repeated under new image ids up to ``--images`` (every
image is still decoded and scored on its own). Then, round-robin, ``--rounds`` times each:

* ``panoptic pq --gt-json ... --pred-json ... --gt-dir ... --pred-dir ...`` (our CLI)
* ``python -m panopticapi.evaluation --gt_json_file ... ...`` (COCO's reference; every core)
* ``coco panoptic eval --gt ... --pred ... --gt-folder ... --pred-folder ...`` (hotcoco's CLI)

each as a fresh process, wall time from start to exit (imports, JSON, decoding, scoring,
printing). Prints the medians and speed-ups, and checks that the three agree on PQ.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BIN = os.path.dirname(sys.executable)


def commands(p: dict) -> dict[str, list[str]]:
    return {
        "panopticapi (python -m panopticapi.evaluation)": [
            sys.executable, "-m", "panopticapi.evaluation", "--gt_json_file", p["GT_JSON"], "--pred_json_file",
            p["PRED_JSON"], "--gt_folder", p["GT_DIR"], "--pred_folder", p["PRED_DIR"]],
        "hotcoco (coco panoptic eval)": [
            os.path.join(BIN, "coco"), "panoptic", "eval", "--gt", p["GT_JSON"], "--pred", p["PRED_JSON"],
            "--gt-folder", p["GT_DIR"], "--pred-folder", p["PRED_DIR"]],
        "panoptic pq": [
            os.path.join(BIN, "panoptic"), "pq", "--gt-json", p["GT_JSON"], "--pred-json", p["PRED_JSON"],
            "--gt-dir", p["GT_DIR"], "--pred-dir", p["PRED_DIR"]],
    }


def make_inputs(tmp: str, n_images: int, n_unique: int) -> dict:
    from components.synthetic.generator import SynthSettings, generate
    from tests.predictions import write_predictions

    root = os.path.join(tmp, "coco")
    generate(root, SynthSettings(train=0, val=n_unique, seed=0, min_side=400, max_side=640), progress=False)
    write_predictions(root, "val2017", os.path.join(tmp, "p"), "mixed", seed=0)
    gt = json.load(open(os.path.join(root, "annotations", "panoptic_val2017.json")))
    pred = json.load(open(os.path.join(tmp, "p", "pred.json")))
    gt_dir, pred_dir = os.path.join(tmp, "gt"), os.path.join(tmp, "pred")
    os.makedirs(gt_dir)
    os.makedirs(pred_dir)
    gt_anns, pred_anns, images = [], [], []
    by_id = {a["image_id"]: a for a in pred["annotations"]}
    for k in range(n_images):
        src = gt["annotations"][k % n_unique]
        name = f"{k:012d}.png"
        shutil.copyfile(os.path.join(root, "annotations", "panoptic_val2017", src["file_name"]),
                        os.path.join(gt_dir, name))
        shutil.copyfile(os.path.join(tmp, "p", "pred", src["file_name"]), os.path.join(pred_dir, name))
        gt_anns.append({**src, "image_id": k, "file_name": name})
        pred_anns.append({**by_id[src["image_id"]], "image_id": k, "file_name": name})
        images.append({"id": k, "file_name": name})
    paths = {"GT_JSON": os.path.join(tmp, "gt.json"), "PRED_JSON": os.path.join(tmp, "pred.json"),
             "GT_DIR": gt_dir, "PRED_DIR": pred_dir}
    json.dump({"images": images, "annotations": gt_anns, "categories": gt["categories"]}, open(paths["GT_JSON"], "w"))
    json.dump({"annotations": pred_anns, "categories": gt["categories"]}, open(paths["PRED_JSON"], "w"))
    return paths


def agree(p: dict) -> float:
    """Largest difference in any PQ/SQ/RQ between our CLI's --json, hotcoco's and panopticapi's."""
    import contextlib
    import io

    from hotcoco.panoptic import pq_compute as hotcoco_pq
    from panopticapi.evaluation import pq_compute as reference

    ours = json.loads(subprocess.run(commands(p)["panoptic pq"] + ["--json"], capture_output=True, text=True,
                                     check=True).stdout)
    with contextlib.redirect_stdout(io.StringIO()):
        ref = reference(p["GT_JSON"], p["PRED_JSON"], p["GT_DIR"], p["PRED_DIR"])
        hot = hotcoco_pq(p["GT_JSON"], p["PRED_JSON"], p["GT_DIR"], p["PRED_DIR"])
    return max(abs(x[g][m] - ref[g][m]) for x in (ours, hot) for g in ("All", "Things", "Stuff")
               for m in ("pq", "sq", "rq"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--unique", type=int, default=250)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if shutil.which("coco", path=BIN) is None:
        print("pq: skipped, hotcoco's `coco` command is not installed beside this Python")
        return 0
    tmp = tempfile.mkdtemp(prefix="bench-pq-")
    try:
        t0 = time.perf_counter()
        paths = make_inputs(tmp, args.images, args.unique)
        print(f"inputs: {args.images} images ({args.unique} unique scenes, 400-640 px), made in "
              f"{time.perf_counter() - t0:.0f}s; {os.cpu_count()} cores; every command with its default flags")
        cmds = commands(paths)
        for cmd in cmds.values():  # warm the page cache and the interpreters' bytecode
            subprocess.run(cmd, capture_output=True, check=True)
        times: dict[str, list[float]] = {name: [] for name in cmds}
        for _ in range(args.rounds):
            for name, cmd in cmds.items():
                t0 = time.perf_counter()
                subprocess.run(cmd, capture_output=True, check=True)
                times[name].append(time.perf_counter() - t0)
        ref = statistics.median(times["panopticapi (python -m panopticapi.evaluation)"])
        hot = statistics.median(times["hotcoco (coco panoptic eval)"])
        print(f"{'command':48s} {'median s':>9s} {'img/s':>8s} {'vs panopticapi':>15s} {'vs hotcoco':>11s}  all runs")
        for name, ts in times.items():
            m = statistics.median(ts)
            print(f"{name:48s} {m:9.2f} {args.images / m:8.0f} {ref / m:14.2f}x {hot / m:10.2f}x  "
                  + " ".join(f"{t:.2f}" for t in ts))
        print(f"largest PQ/SQ/RQ difference from panopticapi (ours, hotcoco): {agree(paths):.2e}")
    finally:
        shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
