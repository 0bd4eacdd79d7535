"""The cost of evaluation during training (issue 32): ``panoptic train`` as a user runs it, with
and without ``--val-shards`` + ``solver.eval_period``, in one run, and the fraction projected to
the cluster configs' period.

    .venv/bin/python benchmarks/eval_during_training.py [--iterations 60] [--period 20] [--val-images 16]

Both commands are the whole CLI (imports, reading the shards, checkpoints, model.pt) with the
`tiny` config on the synthetic COCO-format set (default sizes, 192-512 px a side), on CPU. Measured:
the wall time of each, their difference over the plain run (the tiny-scale fraction), and each
evaluation's own seconds from train_metrics.json. Projection: an evaluation costs ``images /
ranks`` inference passes per rank, a training iteration ``ims_per_batch / ranks`` forward +
backward passes per rank; with this run's measured ratio of one image's inference to one image's
training step, r50_1x (eval_period 5000, 90,000 iterations at batch 16) on 16 GPUs with COCO's
5,000 validation images costs 18 evaluations x 312.5 images per rank against 90,000 training
images per rank. The ratio of inference to training per image is assumed to carry from the tiny
CPU model to R50 on a GPU (a training step is a forward and a backward: 2-3x an inference on
both), which is the projection's uncertainty.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GOAL = 0.10   # issue 32: evaluation during training <= 10 % of the run at the cluster configs' period
CLUSTER = {"config": "r50_1x", "eval_period": 5000, "max_iter": 90000, "ims_per_batch": 16, "ranks": 16,
           "val_images": 5000}


def shards(tmp: str, val_images: int) -> tuple[str, str]:
    from components.preprocess.core import PreprocessSettings, preprocess
    from components.select_subset.core import SplitSettings, select_subset
    from components.synthetic.generator import SynthSettings, generate

    root = os.path.join(tmp, "coco")
    generate(root, SynthSettings(train=32, val=val_images, seed=5), progress=False)
    out = []
    for split in ("train2017", "val2017"):
        m = select_subset(SplitSettings(), root, split, os.path.join(tmp, "subset", split)).manifest_uri
        preprocess(PreprocessSettings(shard_images=16, workers=0), m, os.path.join(tmp, "shards", split),
                   progress=False)
        out.append(os.path.join(tmp, "shards", split))
    return out[0], out[1]


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--period", type=int, default=20)
    ap.add_argument("--val-images", type=int, default=16)
    args = ap.parse_args()
    panoptic = os.path.join(os.path.dirname(sys.executable), "panoptic")
    with tempfile.TemporaryDirectory() as tmp:
        train, val = shards(tmp, args.val_images)
        base = [panoptic, "train", "--shards", train, "--config", "tiny", "--quiet", "--no-mlflow", "--device", "cpu",
                "--set", f"solver.max_iter={args.iterations}"]
        plain = run(base + ["--output", os.path.join(tmp, "plain")])
        scored = run(base + ["--output", os.path.join(tmp, "scored"), "--val-shards", val,
                             "--set", f"solver.eval_period={args.period}"])
        doc = json.load(open(os.path.join(tmp, "scored", "train_metrics.json")))
    evals = doc["evals"]
    eval_s = sum(e["val/eval_s"] for e in evals)
    images = sum(e["val/images"] for e in evals)
    from components.model.config import load_config

    batch = load_config("tiny").solver.ims_per_batch
    train_s = plain   # the plain command: its whole wall time, imports and files included
    per_train_image = train_s / (args.iterations * batch)
    per_eval_image = eval_s / images
    ratio = per_eval_image / per_train_image
    c = CLUSTER
    evals_c = c["max_iter"] // c["eval_period"]   # 90000 is a multiple of 5000: the end is the 18th
    eval_images_per_rank = evals_c * c["val_images"] / c["ranks"]
    train_images_per_rank = c["max_iter"] * c["ims_per_batch"] / c["ranks"]
    projected = eval_images_per_rank * ratio / train_images_per_rank
    print(f"panoptic train, tiny config, CPU, {args.iterations} iterations at batch {batch}, {os.cpu_count()} cores")
    print(f"{'':34s}{'wall s':>9s}")
    print(f"{'without evaluation':34s}{plain:9.1f}")
    print(f"{f'with --val-shards, eval_period {args.period}':34s}{scored:9.1f}"
          f"   ({len(evals)} evaluations of {evals[0]['val/images']} images, {eval_s:.1f} s of them)")
    print(f"tiny-scale cost: {100 * (scored - plain) / plain:.1f} % of the plain run "
          f"({args.iterations // args.period} evaluations per {args.iterations} iterations)")
    print(f"per image: inference {1000 * per_eval_image:.0f} ms (PQ included), training step "
          f"{1000 * per_train_image:.0f} ms (whole command over images trained): ratio {ratio:.2f}")
    print(f"projected, {c['config']} on {c['ranks']} GPUs: {evals_c} evaluations x "
          f"{c['val_images'] / c['ranks']:.1f} images per rank ({eval_images_per_rank:.0f} in all) against "
          f"{train_images_per_rank:.0f} training images per rank: "
          f"{100 * projected:.2f} % of the run (goal <= {100 * GOAL:.0f} %: "
          f"{'met' if projected <= GOAL else 'MISSED'})")


if __name__ == "__main__":
    main()
