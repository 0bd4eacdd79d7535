"""Median train-step time of Panoptic FPN on each backbone: r50_1x beside r101_3x, swin_t_3x,
convnext_t_3x (and the CPU-sized tiny configs) on CPU, and on a GPU when present.

    .venv/bin/python benchmarks/train_step.py [--steps 6] [--threads 2] [--no-cpu] [--profile]

CPU: batch 2 at 512x512, ``--threads`` threads; "vs r50" is the step time over r50_1x's.
GPU (if torch sees one): batch 8 at COCO size (800x1216 after resize), fp32 and bf16 AMP,
channels_last (where the backbone says it helps); then inference (eval mode, panoptic
outputs at 800x1216) at batch 1 and 8, ms per image. Prints images/s and peak memory side by
side. ``--profile``: torch.profiler over bf16 training steps, the top operators by self time.
Inputs are synthetic images with a few instances each; the step is forward +
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
from components.model.backbones.resnet import FrozenBatchNorm2d  # noqa: E402
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
    cats = coco_categories() if not config.endswith("tiny") else CategoryMaps(
        tuple(Category(i + 1, f"t{i}", True) for i in range(6))
        + tuple(Category(100 + i, f"s{i}", False) for i in range(5)))
    # a tiny LR: the step costs the same, and random weights on noise images (FrozenBN with no
    # statistics) would otherwise diverge within a few steps and stop the run
    cfg = load_config(config, {"solver": {"amp": amp, "channels_last": channels_last, "base_lr": 1e-6}})
    torch.manual_seed(0)
    model = PanopticFPN.from_config(cfg, cats).to(device).train()
    for m in model.modules():   # random weights under FrozenBN's identity statistics overflow in
        if isinstance(m, FrozenBatchNorm2d):   # deep ResNets; halved scales keep the timing finite
            m.weight.mul_(0.5)
    if channels_last:
        model.use_channels_last()
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


def bench_inference(device: str, batch: list[dict], iters: int, amp: str) -> tuple[float, float]:
    cfg = load_config("r50_1x", {"solver": {"amp": amp}})
    torch.manual_seed(0)
    model = PanopticFPN.from_config(cfg, coco_categories()).to(device).eval()
    times = []
    with torch.inference_mode():
        for i in range(iters + 2):
            t0 = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=amp == "bf16"):
                model(batch)
            torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return med * 1000 / len(batch), torch.cuda.max_memory_allocated() / 2**30


def profile_steps(batch: list[dict], steps: int = 3) -> None:
    from torch.profiler import ProfilerActivity, profile

    cfg = load_config("r50_1x", {"solver": {"amp": "bf16"}})
    torch.manual_seed(0)
    model = PanopticFPN.from_config(cfg, coco_categories()).to("cuda").train()
    opt = build_optimizer(model, cfg)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = sum(model(batch).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages()
    print(f"\nprofile of {steps} bf16 steps (batch {len(batch)}), top operators by self CUDA time:")
    print(table.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
    print("top operators by self CPU time:")
    print(table.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    syncs = {e.key: e.count for e in table if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                       "aten::item", "aten::_local_scalar_dense", "aten::nonzero")}
    print(f"host syncs over {steps} steps: {syncs}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gpu-batch", type=int, default=8)
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU rows")
    ap.add_argument("--profile", action="store_true", help="profile bf16 training steps on the GPU")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, cpu threads {args.threads}")
    print(f"{'config':15s} {'device':6s} {'batch':>5s} {'size':>9s} {'amp':>5s} {'ch_last':>7s} "
          f"{'median s':>9s} {'img/s':>7s} {'vs r50':>7s} {'peak GiB':>9s}")
    full = ("r50_1x", "r101_3x", "swin_t_3x", "convnext_t_3x")
    rows = [] if args.no_cpu else [(c, "cpu", 2, (512, 512), "off", False)
                                   for c in full + ("tiny", "swin_t_tiny", "convnext_t_tiny")]
    if torch.cuda.is_available():
        b = args.gpu_batch
        rows += [("r50_1x", "cuda", b, (800, 1216), "off", False)]
        rows += [(c, "cuda", b, (800, 1216), "bf16", cl) for c in full for cl in (False, True)]
    r50 = {}
    for config, device, n, (h, w), amp, cl in rows:
        batch = make_batch(n, h, w, coco_categories())
        if config.endswith("tiny"):
            for s in batch:  # the tiny benchmark categories: 6 things / 5 stuff classes
                s["labels"] = s["labels"] % 6
                s["sem_seg"] = torch.where(s["sem_seg"] > 5, torch.tensor(3, dtype=torch.uint8), s["sem_seg"])
        med, ips, peak = bench(config, device, batch, args.steps if device == "cuda" else min(args.steps, 4), amp, cl)
        if config == "r50_1x":
            r50[(device, amp, cl)] = med
        ref = r50.get((device, amp, cl)) or r50.get((device, "off", False))
        label = "max RSS" if device == "cpu" else "alloc"
        print(f"{config:15s} {device:6s} {n:5d} {h}x{w:<5d} {amp:>5s} {str(cl):>7s} {med:9.3f} {ips:7.2f} "
              f"{med / ref if ref else float('nan'):6.2f}x {peak:9.2f} ({label})")
    if torch.cuda.is_available():
        print(f"\n{'inference r50_1x':18s} {'batch':>5s} {'amp':>5s} {'ms/image':>9s} {'peak GiB':>9s}")
        for n in (1, args.gpu_batch):
            batch = [{"image": s["image"], "height": 800, "width": 1216}
                     for s in make_batch(n, 800, 1216, coco_categories(), seed=1)]
            for amp in ("off", "bf16"):
                ms, peak = bench_inference("cuda", batch, args.steps * 2, amp)
                print(f"{'':18s} {n:5d} {amp:>5s} {ms:9.2f} {peak:9.2f}")
        if args.profile:
            profile_steps(make_batch(args.gpu_batch, 800, 1216, coco_categories()))


if __name__ == "__main__":
    main()
