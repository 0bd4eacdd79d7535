"""Does copy-paste help in cluttered scenes? The tiny config trained on a cluttered synthetic set
(up to ``--max-things`` overlapping instances per image) with and without copy-paste, the same
iterations, seed and data; PQ/SQ/RQ (things, stuff) of both on the same validation split,
side by side.

    .venv/bin/python benchmarks/copy_paste.py [--iterations 300] [--max-things 16] [--prob 0.5]

CPU only, about 3 minutes per arm on 2 cores at the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from components.evaluate.core import EvaluateSettings, evaluate  # noqa: E402
from components.model.config import load_config  # noqa: E402
from components.synthetic.generator import SynthSettings, generate  # noqa: E402
from components.train.trainer import train  # noqa: E402
from tests.training import MICRO, make_shards  # noqa: E402


def run(arm: str, prob: float, iterations: int, data: tuple[str, str], out: str, seed: int) -> dict:
    over = json.loads(json.dumps(MICRO))
    over["input"].update({"min_size_train": [128, 160], "max_size_train": 224, "min_size_test": 160,
                          "max_size_test": 224, "flip_prob": 0.5, "copy_paste_prob": prob})
    over["solver"].update({"ims_per_batch": 4, "reference_batch": 4, "base_lr": 0.02, "max_iter": iterations,
                           "warmup_iters": iterations // 8, "checkpoint_period": 100000,
                           "steps": [int(iterations * 0.75), int(iterations * 0.94)]})
    over["log_period"] = 20
    over["seed"] = seed
    t0 = time.perf_counter()
    result = train(load_config("tiny", over), data[0], os.path.join(out, arm), progress=False)
    m = evaluate(result.model_uri, data[1], os.path.join(out, arm + "-eval"), EvaluateSettings(report_samples=0),
                 progress=False).metrics
    m["train_s"] = time.perf_counter() - t0
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--max-things", type=int, default=16, help="instances per synthetic image: up to this many")
    ap.add_argument("--prob", type=float, default=0.5, help="input.copy_paste_prob of the copy-paste arm")
    ap.add_argument("--train-images", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "coco")
        generate(root, SynthSettings(train=args.train_images, val=32, seed=21, min_side=128, max_side=224,
                                   max_things=args.max_things), progress=False)
        data = (make_shards(root, os.path.join(tmp, "train")), make_shards(root, os.path.join(tmp, "val"), "val2017"))
        results = {arm: run(arm, p, args.iterations, data, tmp, args.seed)
                   for arm, p in (("plain", 0.0), ("copy-paste", args.prob))}
    print(f"cluttered synthetic set: {args.train_images} train / 32 val images, up to {args.max_things} instances "
          f"each; tiny config, {args.iterations} iterations, batch 4, seed {args.seed}")
    keys = ("PQ", "SQ", "RQ", "PQ_th", "RQ_th", "PQ_st", "RQ_st")
    print(f"{'arm':22s}" + "".join(f"{k:>8s}" for k in keys) + f"{'train s':>9s}")
    for arm, m in results.items():
        label = arm if arm == "plain" else f"{arm} (p={args.prob})"
        print(f"{label:22s}" + "".join(f"{100 * m[k]:8.2f}" for k in keys) + f"{m['train_s']:9.0f}")
    d = {k: 100 * (results["copy-paste"][k] - results["plain"][k]) for k in keys}
    print(f"{'difference':22s}" + "".join(f"{d[k]:+8.2f}" for k in keys))


if __name__ == "__main__":
    main()
