"""Time `panoptic evaluate` spends on PQ beyond inference itself (goal <= 5%).

    .venv/bin/python benchmarks/evaluate.py [--model runs/local/.../model.pt --shards .../val_shards]

Defaults to the newest model and val shards of a local pipeline run (`make run`). Prints
inference time, PQ accumulation time (from in-memory predictions), file writing time, and
the PQ share of inference time, from the stage's own timers.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from components.evaluate.core import EvaluateSettings, evaluate  # noqa: E402


def newest(pattern: str) -> str | None:
    found = sorted(glob.glob(pattern, recursive=True), key=os.path.getmtime)
    return found[-1] if found else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=newest("runs/local/**/train/model/model.pt"))
    ap.add_argument("--shards", default=newest("runs/local/**/preprocess/val_shards"))
    ap.add_argument("--batch-size", type=int, default=2)
    args = ap.parse_args()
    if not args.model or not args.shards:
        sys.exit("no model/shards given and no local pipeline run found: run `make run` first")
    with tempfile.TemporaryDirectory() as out:
        m = evaluate(args.model, args.shards, out, EvaluateSettings(batch_size=args.batch_size), progress=False).metrics
    t = m["timing"]
    print(f"model {args.model}\nshards {args.shards}\n{m['images']} images on {t['device']}, PQ {100 * m['PQ']:.2f}")
    print(f"{'inference':24s} {t['inference_s']:8.2f} s  ({t['images_per_s_inference']:.2f} img/s)")
    print(f"{'PQ accumulation':24s} {t['pq_s']:8.2f} s  = {100 * t['pq_overhead_vs_inference']:.2f}% of inference")
    share = 100 * t["write_s"] / t["inference_s"]
    print(f"{'writing predictions':24s} {t['write_s']:8.2f} s  = {share:.2f}% of inference")


if __name__ == "__main__":
    main()
