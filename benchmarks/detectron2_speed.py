"""Our Panoptic FPN beside detectron2's, same weights, same inputs, one process, CPU.

    PYTHONPATH=. /path/to/detectron2-venv/bin/python benchmarks/detectron2_speed.py [--rounds 5] [--threads 2]

Needs detectron2 importable (build it as ``tests/fixtures/detectron2/README.md`` says); without
it the script says so and exits 0, so ``make bench`` passes on machines without it.

* inference: each fixture photo at detectron2's test size (short side 800), eval mode, no grad,
  from the resized uint8 image to the panoptic output at the photo's size; ms per image.
* train step: batch 2 at 512x512 with 6 instances each, forward + backward + SGD step (lr 0, so
  every round does the same work), ms per step.
Both models hold the seeded golden-test weights (``tests/detectron2_weights.py``), so they make
the same detections and do the same amount of work. Rounds alternate between the two models;
the medians are printed with the ratio ours / detectron2 (below 1.0: ours is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    try:
        import detectron2  # noqa: F401
    except ImportError:
        print("detectron2_speed: skipped, detectron2 is not importable (tests/fixtures/detectron2/README.md builds it)")
        return 0
    from detectron2.structures import BitMasks, Boxes, Instances
    from detectron2.utils.events import EventStorage

    from benchmarks.train_step import coco_categories, make_batch
    from tests import detectron2_parity as P
    from tests.detectron2_weights import write_model_zoo_pkl
    from tests.fixtures.detectron2.regenerate import build, ours

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        weights = write_model_zoo_pkl(os.path.join(tmp, "r50.pkl"), 50)
        cfg, theirs = build("panoptic_fpn_R_50_1x", weights)
        mine = ours(50, weights)

    photos = [P.load_photo(p) for p in P.PHOTOS]
    resized = [P.resize_for_test(p) for p in photos]
    ours_in = [{"image": torch.from_numpy(np.ascontiguousarray(r.transpose(2, 0, 1))), "height": p.shape[0],
                "width": p.shape[1]} for r, p in zip(resized, photos)]
    theirs_in = [{**s, "image": s["image"].flip(0).contiguous()} for s in ours_in]

    batch = make_batch(2, 512, 512, coco_categories())
    theirs_batch = [{"image": s["image"].flip(0).contiguous(), "sem_seg": s["sem_seg"].long(),
                     "instances": Instances((512, 512), gt_boxes=Boxes(s["boxes"]), gt_classes=s["labels"],
                                            gt_masks=BitMasks(s["masks"].bool()))} for s in batch]

    def infer(model, inputs):
        model.eval()
        with torch.no_grad():
            for s in inputs:
                model([s])

    def step(model, inputs, opt):
        model.train()
        with EventStorage():
            losses = model(inputs)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    opts = {name: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.0, momentum=0.9)
            for name, m in (("ours", mine), ("detectron2", theirs))}
    infer(mine, ours_in[:1]), infer(theirs, theirs_in[:1])                 # warm-up
    step(mine, batch, opts["ours"]), step(theirs, theirs_batch, opts["detectron2"])
    times = {k: [] for k in ("infer ours", "infer detectron2", "train ours", "train detectron2")}
    for _ in range(args.rounds):
        times["infer ours"].append(_time(lambda: infer(mine, ours_in)) / len(ours_in))
        times["infer detectron2"].append(_time(lambda: infer(theirs, theirs_in)) / len(theirs_in))
        times["train ours"].append(_time(lambda: step(mine, batch, opts["ours"])))
        times["train detectron2"].append(_time(lambda: step(theirs, theirs_batch, opts["detectron2"])))
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"CPU, {args.threads} threads, torch {torch.__version__}, median of {args.rounds} alternating rounds")
    print(f"{'':34s}{'ours ms':>10s}{'detectron2 ms':>15s}{'ours / d2':>11s}")
    for what, label in (("infer", f"inference / image ({len(photos)} photos, 800 px)"),
                        ("train", "train step (batch 2, 512x512)")):
        o, d = med[f"{what} ours"], med[f"{what} detectron2"]
        print(f"{label:34s}{o:10.1f}{d:15.1f}{o / d:11.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
