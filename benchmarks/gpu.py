"""Panoptic FPN (r50_1x) on one GPU, in one command: training and inference speed, the data
loader's headroom, and `panoptic evaluate` end to end.

    python3 benchmarks/gpu.py [--train 256] [--val 1000] [--iters 120] [--work /tmp/gpu-bench]

On synthetic COCO-format data made here (sides 480-640 px; training augments to short side
640-800 like detectron2, evaluation resizes to 800):
  1. data: `data synth` (all cores), `subset`, `preprocess` for train and val;
  2. loader alone: images/s of the training DataLoader with 4, 8 and 12 workers;
  3. train step: batch 8 at 800x1216, fp32 / bf16 / bf16 + channels_last (benchmarks/train_step.py);
  4. `train()` itself for --iters at each precision, 10 loader workers: images/s per log period;
  5. inference latency at 800x1216, batch 1 and 8, fp32 and bf16;
  6. `evaluate()` of the bf16 model on the val shards: images/s end to end and of inference.
No ImageNet weights are reachable offline: step 4 trains from scratch with LR 0.002 and gradient
clipping (detectron2's LR diverges with FrozenBN over a random backbone); its speed is what the
figures are for, not its accuracy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import train_step  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from components.common.coco_panoptic import CategoryMaps  # noqa: E402
from components.data.reader import ShardDataset, collate  # noqa: E402
from components.data.records import load_index  # noqa: E402
from components.evaluate.core import EvaluateSettings, evaluate  # noqa: E402
from components.model.config import (
    InputConfig,  # noqa: E402
    load_config,  # noqa: E402
)
from components.preprocess.core import PreprocessSettings, preprocess  # noqa: E402
from components.select_subset.core import SplitSettings, select_subset  # noqa: E402
from components.synthetic.generator import SynthSettings, generate  # noqa: E402
from components.train.trainer import train  # noqa: E402


def row(*cells) -> None:
    print(" | ".join(str(c) for c in cells), flush=True)


def make_data(work: str, n_train: int, n_val: int) -> tuple[str, str]:
    root = os.path.join(work, "coco")
    t0 = time.perf_counter()
    generate(root, SynthSettings(train=n_train, val=n_val, seed=0, min_side=480, max_side=640), progress=False,
             workers=os.cpu_count() or 1)
    t_synth = time.perf_counter() - t0
    shards = {}
    t0 = time.perf_counter()
    for split in ("train2017", "val2017"):
        m = select_subset(SplitSettings(), root, split, os.path.join(work, f"subset-{split}")).manifest_uri
        shards[split] = os.path.join(work, f"shards-{split}")
        preprocess(PreprocessSettings(shard_images=100, workers=min(8, os.cpu_count() or 1)), m, shards[split],
                   progress=False)
    row("data", f"{n_train} + {n_val} images", f"synth {t_synth:.1f} s",
        f"subset + preprocess {time.perf_counter() - t0:.1f} s")
    return shards["train2017"], shards["val2017"]


def loader_speed(shards: str, workers: int, batches: int = 100) -> float:
    """Steady images/s of the training loader (endless pass over the shards, batch 8), after the
    first batch (worker start-up)."""
    cats = CategoryMaps.from_json(load_index(shards)["categories"])
    loader = DataLoader(ShardDataset(shards, cats, InputConfig(), train=True, infinite=True, seed=0), batch_size=8,
                        num_workers=workers, collate_fn=collate)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    n = sum(len(next(it)) for _ in range(batches))
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=256, help="synthetic train images")
    ap.add_argument("--val", type=int, default=1000, help="synthetic val images (evaluated end to end)")
    ap.add_argument("--iters", type=int, default=120, help="iterations of each train() run")
    ap.add_argument("--work", default="/tmp/gpu-bench", help="scratch folder (deleted first)")
    ap.add_argument("--skip", default="", help="comma list of parts to leave out: loader, step, inference")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if not torch.cuda.is_available():
        print("no GPU here: skipped (this benchmark measures CUDA training and inference)")
        return
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{os.cpu_count()} CPU cores\n", flush=True)
    train_shards, val_shards = make_data(args.work, args.train, args.val)

    for w in () if "loader" in skip else (4, 8, 12):
        row("loader alone", f"{w} workers", f"{loader_speed(train_shards, w):.1f} img/s")

    batch = train_step.make_batch(8, 800, 1216, train_step.coco_categories())
    for amp, cl in () if "step" in skip else (("off", False), ("bf16", False), ("bf16", True)):
        med, ips, peak = train_step.bench("r50_1x", "cuda", batch, 6, amp, cl)
        row("train step r50_1x b8 800x1216", f"amp {amp}", f"channels_last {cl}", f"{med:.3f} s/step",
            f"{ips:.1f} img/s", f"peak {peak:.1f} GiB")

    model_uri = ""
    for amp in ("off", "bf16"):
        cfg = load_config("r50_1x", {"solver": {"ims_per_batch": 8, "base_lr": 0.002, "clip_grad_norm": 1.0,
                                                "amp": amp, "max_iter": args.iters,
                                                "checkpoint_period": args.iters},
                                     "data": {"num_workers": 10}, "log_period": 20})
        out = os.path.join(args.work, f"train-{amp}")
        t0 = time.perf_counter()
        result = train(cfg, train_shards, out, device="cuda", progress=False)  # a bare "cuda" failed before
        wall = time.perf_counter() - t0
        speeds = [round(h["images_per_s"], 1) for h in result.history]
        row(f"train() r50_1x b8, amp {amp}", f"{args.iters} its in {wall:.0f} s",
            f"img/s per 20 its {speeds}", f"last {speeds[-1]} img/s")
        model_uri = result.model_uri

    for n in () if "inference" in skip else (1, 8):
        sample = [{"image": s["image"], "height": 800, "width": 1216}
                  for s in train_step.make_batch(n, 800, 1216, train_step.coco_categories(), seed=1)]
        for amp in ("off", "bf16"):
            ms, _ = train_step.bench_inference("cuda", sample, 12, amp)
            row("inference r50_1x 800x1216", f"batch {n}", f"amp {amp}", f"{ms:.2f} ms/image")

    for post in (0, 4):  # 0: PQ and PNG writing in the loop, after each batch (the first version)
        t0 = time.perf_counter()
        res = evaluate(model_uri, val_shards, os.path.join(args.work, f"eval-{post}"),
                       EvaluateSettings(batch_size=8, num_workers=8, post_workers=post), progress=False)
        wall = time.perf_counter() - t0
        m = res.metrics
        t = m["timing"]
        row(f"evaluate, post-processing threads {post}", f"{m['images']} images in {wall:.1f} s",
            f"{m['images'] / wall:.1f} img/s end to end", f"pass {t['loop_s']:.1f} s",
            f"inference {t['inference_s']:.1f} s ({t['images_per_s_inference']:.1f} img/s)",
            f"PQ {t['pq_s']:.1f} s, writing {t['write_s']:.1f} s (summed over threads)", f"PQ {100 * m['PQ']:.2f}")


if __name__ == "__main__":
    main()
