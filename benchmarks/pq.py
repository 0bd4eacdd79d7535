"""`panoptic pq` vs panopticapi's pq_compute on the same inputs, processes and machine.

    .venv/bin/python benchmarks/pq.py [--images 2000] [--unique 250]

Generates COCO-sized GT (sides 400-640 px, synthetic scenes) and a prediction set derived
from it ("mixed": shifted, relabelled, missed and spurious segments). To keep generation
short, ``--unique`` scenes are rendered and their files repeated under new image ids up to
``--images``; every image is still decoded and scored on its own. Each variant runs in its
own process so that its peak memory (max RSS) is measured alone; imports are not timed, reading
the JSON files and scoring are. Prints seconds, images/s,
the speed-up, peak memory, and the share of our time spent decoding PNGs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Each runner: imports (not timed), then "#TIMED" and the timed work.
RUNNERS = {
    "ours": """
from components.evaluate.pq import pq_compute
#TIMED
r = pq_compute(GT_JSON, PRED_JSON, GT_DIR, PRED_DIR, workers=WORKERS)
""",
    "panopticapi": """
import contextlib, io, json, multiprocessing
from panopticapi import evaluation as ev
#TIMED
with open(GT_JSON) as f: gt = json.load(f)
with open(PRED_JSON) as f: pred = json.load(f)
cats = {c['id']: c for c in gt['categories']}
preds = {a['image_id']: a for a in pred['annotations']}
pairs = [(a, preds[a['image_id']]) for a in gt['annotations']]
with contextlib.redirect_stdout(io.StringIO()):
    if WORKERS == 1:
        stat = ev.pq_compute_single_core(0, pairs, GT_DIR, PRED_DIR, cats)
    else:
        multiprocessing.cpu_count = lambda: WORKERS   # its pool size is cpu_count()
        stat = ev.pq_compute_multi_core(pairs, GT_DIR, PRED_DIR, cats)
r = {n: stat.pq_average(cats, isthing=t)[0] for n, t in (("All", None), ("Things", True), ("Stuff", False))}
""",
    "decode_only": """
import json, os
from components.common.coco_panoptic import decode_png
#TIMED
with open(GT_JSON) as f: gt = json.load(f)
for a in gt['annotations']:
    for d in (GT_DIR, PRED_DIR):
        with open(os.path.join(d, a['file_name']), 'rb') as f: decode_png(f.read())
r = {"All": {"pq": float('nan')}}
""",
}


def run_variant(name: str, paths: dict, workers: int) -> tuple[float, float, float]:
    """(seconds, peak MiB over the process and its children, PQ)."""
    setup, timed = RUNNERS[name].split("#TIMED\n")
    code = "".join(f"{k} = {v!r}\n" for k, v in {**paths, "WORKERS": workers}.items()) + setup + \
        "t0 = time.perf_counter()\n" + timed
    code = ("import sys, time, json, resource\nsys.path.insert(0, %r)\n" % ROOT) + code + \
        "dt = time.perf_counter() - t0\n" + \
        "peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n" + \
        "print(json.dumps({'s': dt, 'peak_kb': peak, 'pq': r['All']['pq']}))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return res["s"], res["peak_kb"] / 1024, res["pq"]


def make_inputs(tmp: str, n_images: int, n_unique: int) -> dict:
    from components.synthetic.generator import SynthConfig, generate
    from tests.predictions import write_predictions

    root = os.path.join(tmp, "coco")
    generate(root, SynthConfig(train=0, val=n_unique, seed=0, min_side=400, max_side=640), progress=False)
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
        shutil.copyfile(os.path.join(root, "annotations", "panoptic_val2017", src["file_name"]), os.path.join(gt_dir, name))
        shutil.copyfile(os.path.join(tmp, "p", "pred", src["file_name"]), os.path.join(pred_dir, name))
        gt_anns.append({**src, "image_id": k, "file_name": name})
        pred_anns.append({**by_id[src["image_id"]], "image_id": k, "file_name": name})
        images.append({"id": k, "file_name": name})
    paths = {"GT_JSON": os.path.join(tmp, "gt.json"), "PRED_JSON": os.path.join(tmp, "pred.json"),
             "GT_DIR": gt_dir, "PRED_DIR": pred_dir}
    json.dump({"images": images, "annotations": gt_anns, "categories": gt["categories"]}, open(paths["GT_JSON"], "w"))
    json.dump({"annotations": pred_anns, "categories": gt["categories"]}, open(paths["PRED_JSON"], "w"))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--unique", type=int, default=250)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-pq-")
    try:
        t0 = time.perf_counter()
        paths = make_inputs(tmp, args.images, args.unique)
        print(f"inputs: {args.images} images ({args.unique} unique scenes, 400-640 px), made in "
              f"{time.perf_counter() - t0:.0f}s; cpu cores: {os.cpu_count()}")
        run_variant("decode_only", paths, 1)  # warm the page cache
        print(f"{'variant':28s} {'procs':>5s} {'seconds':>8s} {'img/s':>7s} {'speed-up':>8s} {'peak MiB':>9s} {'PQ':>10s}")
        for w in args.workers:
            t_ref, m_ref, pq_ref = run_variant("panopticapi", paths, w)
            t_ours, m_ours, pq_ours = run_variant("ours", paths, w)
            print(f"{'panopticapi pq_compute':28s} {w:5d} {t_ref:8.2f} {args.images / t_ref:7.1f} {1.0:8.2f} {m_ref:9.0f} {pq_ref:10.6f}")
            print(f"{'panoptic pq':28s} {w:5d} {t_ours:8.2f} {args.images / t_ours:7.1f} {t_ref / t_ours:8.2f} {m_ours:9.0f} {pq_ours:10.6f}")
            assert abs(pq_ref - pq_ours) < 1e-9, "PQ differs from panopticapi"
            if w == 1:
                t_dec, _, _ = run_variant("decode_only", paths, 1)
                print(f"{'  of which PNG decoding':28s} {1:5d} {t_dec:8.2f} {'':7s} {'':8s} {'':9s} "
                      f"{100 * t_dec / t_ours:9.0f}%")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
