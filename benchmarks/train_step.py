"""Median train-step time of Panoptic FPN: r50_1x (and tiny) on CPU, and on a GPU when present.

    .venv/bin/python benchmarks/train_step.py [--steps 6] [--threads 2]

CPU: batch 2 at 512x512, ``--threads`` threads. GPU (if torch sees one): batch 8 at COCO size
(800x1216 after resize), fp32 and bf16 AMP, channels_last. Prints images/s and peak memory
side by side. Inputs are synthetic images with a few instances each; the step is forward +
backward + SGD, as in the trainer.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from components.common.coco_panoptic import Category, CategoryMaps  # noqa: E402
from components.model.config import load_config  # noqa: E402
from components.model.panoptic_fpn import PanopticFPN  # noqa: E402
from components.train.trainer import build_optimizer  # noqa: E402


def coco_categories() -> CategoryMaps:
    return CategoryMaps(tuple(Category(i + 1, f"t{i}", True) for i in range(80)) +
                        tuple(Category(100 + i, f"s{i}", False) for i in range(53)))


def make_batch(n: int, h: int, w: int, cats: CategoryMaps, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    batch = []
    for _ in range(n):
        k = 6
        masks = torch.zeros((k, h, w), dtype=torch.uint8)
        boxes = []
        for j in range(k):
            y0, x0 = int(rng.integers(0, h - 100)), int(rng.integers(0, w - 100))
            y1, x1 = y0 + int(rng.integers(40, 100)), x0 + int(rng.integers(40, 100))
            masks[j, y0:y1, x0:x1] = 1
            boxes.append([x0, y0, x1, y1])
        sem = torch.from_numpy(rng.integers(1, cats.num_sem_classes, (h, w)).astype(np.uint8))
        sem[masks.bool().any(0)] = 0
        batch.append({"image": torch.from_numpy(rng.integers(0, 255, (3, h, w), dtype=np.uint8)),
                      "boxes": torch.tensor(boxes, dtype=torch.float32),
                      "labels": torch.from_numpy(rng.integers(0, cats.num_things, k)), "masks": masks, "sem_seg": sem})
    return batch


def bench(config: str, device: str, batch: list[dict], steps: int, amp: str = "off", channels_last: bool = False):
    cats = coco_categories() if config.startswith("r50") else CategoryMaps(
        tuple(Category(i + 1, f"t{i}", True) for i in range(6)) + tuple(Category(100 + i, f"s{i}", False) for i in range(5)))
    cfg = load_config(config, {"solver": {"amp": amp, "channels_last": channels_last}})
    torch.manual_seed(0)
    model = PanopticFPN.from_config(cfg, cats).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg)
    use_amp = amp != "off" and device == "cuda"
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 2):
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16 if amp == "bf16" else torch.float16, enabled=use_amp):
            losses = model(batch)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # warm-up steps excluded
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    peak = (torch.cuda.max_memory_allocated() / 2**30) if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return med, len(batch) / med, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gpu-batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, cpu threads {args.threads}")
    print(f"{'config':8s} {'device':6s} {'batch':>5s} {'size':>9s} {'amp':>5s} {'ch_last':>7s} "
          f"{'median s':>9s} {'img/s':>7s} {'peak GiB':>9s}")
    rows = [("r50_1x", "cpu", 2, (512, 512), "off", False), ("tiny", "cpu", 2, (512, 512), "off", False)]
    if torch.cuda.is_available():
        b = args.gpu_batch
        rows += [("r50_1x", "cuda", b, (800, 1216), "off", False), ("r50_1x", "cuda", b, (800, 1216), "bf16", False),
                 ("r50_1x", "cuda", b, (800, 1216), "bf16", True)]
    for config, device, n, (h, w), amp, cl in rows:
        cats = coco_categories() if config.startswith("r50") else None
        batch = make_batch(n, h, w, cats or coco_categories())
        if config == "tiny":
            for s in batch:  # tiny has 6 things / 5 stuff classes
                s["labels"] = s["labels"] % 6
                s["sem_seg"] = torch.where(s["sem_seg"] > 5, torch.tensor(3, dtype=torch.uint8), s["sem_seg"])
        med, ips, peak = bench(config, device, batch, args.steps if device == "cuda" else min(args.steps, 4), amp, cl)
        label = "max RSS" if device == "cpu" else "alloc"
        print(f"{config:8s} {device:6s} {n:5d} {h}x{w:<5d} {amp:>5s} {str(cl):>7s} {med:9.3f} {ips:7.2f} "
              f"{peak:9.2f} ({label})")


if __name__ == "__main__":
    main()
