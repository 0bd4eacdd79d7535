"""The CPU-side ceilings: images per second per CPU core that the work around the model can feed
a GPU, beside the rate the GPU needs (issue 31).

    .venv/bin/python benchmarks/ceilings.py [--train-images 64] [--val-images 24] [--workers 1,2]

- **Train loader**: the trainer's own ``ShardDataset`` + ``DataLoader`` (batch 2) at r50_1x's input
  sizes (short side 640-800, max 1333, flip), without augmentation and with LSJ (1024) +
  copy-paste (p 0.5), on COCO-sized synthetic images (480-640 px a side, JPEG). What it costs:
  reading the Parquet rows, JPEG and PNG decoding, resize, augmentation, target building.
- **Evaluate**: the evaluate stage end to end, as ``panoptic evaluate`` runs it (its loader's decode
  and resize, the model's post-processing: box scaling, mask pasting, semantic upsampling,
  panoptic fusion; PNG encoding; PQ accumulation; the files), with the network itself replaced
  by a replay of its real outputs, recorded once from an R50 Panoptic FPN (detectron2's seeded
  weights of the parity tests: dozens of confident detections) on the same images. So the
  post-processing sees realistic proposals and masks, and the model costs nothing.

"per core" is images per CPU-second (this process and its DataLoader workers, from rusage), so
it does not depend on how busy the machine is; wall img/s is printed beside it for each worker
count, and the slope projects what 14-16 cores give. Goals (issue 31, the H100's measured
rates with 2x headroom): train loader >= 8 img/s per core (53 img/s on 14 cores), evaluate >= 11
img/s per core (82 img/s on 15 cores).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

GOALS = {"train loader": 8.0, "evaluate": 11.0}
CACHE = os.path.join(os.environ.get("PANOPTIC_CACHE", os.path.expanduser("~/.cache/panoptic")), "bench-ceilings")


def coco_categories():
    """COCO panoptic's 133 categories by id (the layout of the model zoo's weights); the synthetic
    set's ids are among them."""
    from components.common.coco_panoptic import Category, CategoryMaps
    from components.model.weights import COCO_STUFF_IDS, COCO_THING_IDS

    return CategoryMaps(tuple(Category(i, f"c{i}", True, (i, 0, 0), "thing") for i in COCO_THING_IDS) +
                        tuple(Category(i, f"c{i}", False, (0, i, 0), "stuff") for i in COCO_STUFF_IDS))


def cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def data(train: int, val: int) -> tuple[str, str]:
    """COCO-sized synthetic shards (made once, cached): (train shards, val shards)."""
    from components.preprocess.core import PreprocessSettings, preprocess
    from components.select_subset.core import SplitSettings, select_subset
    from components.synthetic.generator import SynthSettings, generate

    root = os.path.join(CACHE, f"synth-{train}-{val}")
    out = {}
    for split in ("train2017", "val2017"):
        shards = os.path.join(root, "shards", split)
        if not os.path.exists(os.path.join(shards, "index.json")):
            if not os.path.exists(os.path.join(root, "annotations", "panoptic_val2017.json")):
                generate(root, SynthSettings(train=train, val=val, seed=3, min_side=480, max_side=640, max_things=7),
                         progress=False)
            m = select_subset(SplitSettings(), root, split, os.path.join(root, "subset", split)).manifest_uri
            preprocess(PreprocessSettings(shard_images=16, workers=0), m, shards, progress=False)
        out[split] = shards
    return out["train2017"], out["val2017"]


def train_loader(shards: str, workers: int, batches: int, aug: dict) -> dict:
    from torch.utils.data import DataLoader

    from components.common.coco_panoptic import CategoryMaps
    from components.data.reader import ShardDataset, collate
    from components.data.records import load_index
    from components.model.config import load_config

    cfg = load_config("r50_1x", {f"input.{k}": v for k, v in aug.items()})
    cats = CategoryMaps.from_json(load_index(shards)["categories"])
    dataset = ShardDataset(shards, cats, cfg.input, train=True, infinite=True, seed=0,
                           shuffle_buffer=cfg.data.shuffle_buffer, rank=0, world_size=1)
    loader = DataLoader(dataset, batch_size=2, num_workers=workers, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))
    c0, t0 = cpu_seconds(), time.perf_counter()
    it = iter(loader)
    next(it)   # the workers' start and the first batch: said apart
    first = time.perf_counter() - t0
    c1, t1 = cpu_seconds(), time.perf_counter()
    n = 0
    for _ in range(batches):
        n += len(next(it))
    wall = time.perf_counter() - t1
    del it   # the workers exit: their CPU time reaches RUSAGE_CHILDREN
    time.sleep(0.2)
    cpu = cpu_seconds() - c1
    return {"images": n, "wall_s": wall, "cpu_s": cpu, "first_s": first, "startup_cpu_s": c1 - c0}


def record_outputs(val_shards: str, path: str):
    """The R50 model's raw outputs (detections before post-processing, semantic logits) on each val
    image, recorded once by wrapping ``postprocess`` during a real forward pass (CPU, minutes)."""
    from components.data.reader import ShardDataset
    from components.model.config import load_config
    from components.model.panoptic_fpn import PanopticFPN
    from components.model.weights import load_weights
    from tests.detectron2_weights import write_model_zoo_pkl

    cfg = load_config("r50_1x")
    cats = coco_categories()
    model = PanopticFPN.from_config(cfg, cats).eval()
    with tempfile.TemporaryDirectory() as tmp:
        load_weights(model, write_model_zoo_pkl(os.path.join(tmp, "r50.pkl")))
    recorded, final, real = {}, {}, model.postprocess

    def keep(det, sem_logits, image_size, sample):
        recorded[int(sample["image_id"])] = ({k: v.clone() for k, v in det.items()}, sem_logits.clone(), image_size)
        out = real(det, sem_logits, image_size, sample)
        final[int(sample["image_id"])] = out["panoptic_seg"]
        return out

    model.postprocess = keep
    with torch.inference_mode():
        for sample in ShardDataset(val_shards, cats, cfg.input, train=False, with_gt=True, rank=0, world_size=1):
            model([sample])
    torch.save({"outputs": recorded, "panoptic": final, "state": model.state_dict()}, path)


class Replay(torch.nn.Module):
    """A network that costs nothing: the model's post-processing over recorded network outputs
    (``post_here``: as on a CPU-only machine), or the recorded result of that post-processing (as
    on a GPU, where it runs on the device beside the network)."""

    def __init__(self, model, saved: dict, post_here: bool):
        super().__init__()
        self.model, self.saved, self.post_here = model, saved, post_here

    def forward(self, batch):
        if self.post_here:
            return [self.model.postprocess(*self.saved["outputs"][int(s["image_id"])], s) for s in batch]
        return [{"panoptic_seg": self.saved["panoptic"][int(s["image_id"])]} for s in batch]


def evaluate_ceiling(val_shards: str, workers: int, recording: str, post_here: bool = False, report: int = 0,
                     max_images: int | None = None) -> dict:
    import components.evaluate.core as core
    from components.evaluate.settings import EvaluateSettings
    from components.model.config import load_config
    from components.model.panoptic_fpn import PanopticFPN

    cfg, cats = load_config("r50_1x"), coco_categories()
    saved = torch.load(recording, weights_only=True)
    model = PanopticFPN.from_config(cfg, cats).eval()
    model.load_state_dict(saved["state"])
    replay = Replay(model, saved, post_here)
    real = core.load_model_and_digest
    core.load_model_and_digest = lambda uri, device: (replay, cfg, cats, "replay")
    try:
        with tempfile.TemporaryDirectory() as out:
            c0, t0 = cpu_seconds(), time.perf_counter()
            settings = EvaluateSettings(num_workers=workers, device="cpu", report_samples=report, max_images=max_images)
            m = core.evaluate("replay", val_shards, out, settings, progress=False).metrics
            wall = time.perf_counter() - t0
            time.sleep(0.2)
            cpu = cpu_seconds() - c0
    finally:
        core.load_model_and_digest = real
    return {"images": m["images"], "wall_s": wall, "cpu_s": cpu, "PQ": m["PQ"]}


def marginal(val_shards: str, workers: int, recording: str, post_here: bool = False) -> dict:
    """The whole evaluation, and what each image adds beyond the run's fixed costs (the loader's
    start, the index, the tables and files written once): the full set minus its first half, so
    the per-core rate is the one a 5,000-image evaluation runs at."""
    full = evaluate_ceiling(val_shards, workers, recording, post_here)
    half = evaluate_ceiling(val_shards, workers, recording, post_here, max_images=full["images"] // 2)
    return {**full, "images": full["images"] - half["images"], "wall_s": full["wall_s"] - half["wall_s"],
            "cpu_s": full["cpu_s"] - half["cpu_s"], "whole": full}


def show(name: str, rows: list[tuple[int, dict]]) -> float:
    goal = GOALS[name.split(" (")[0]]
    per_core = []
    for workers, r in rows:
        rate, core_rate = r["images"] / r["wall_s"], r["images"] / max(r["cpu_s"], 1e-9)
        per_core.append(core_rate)
        extra = f", first batch {r['first_s']:.1f} s" if "first_s" in r else ""
        if "whole" in r:
            w = r["whole"]
            extra = (f"; the whole run of {w['images']}: {w['images'] / w['wall_s']:.2f} img/s wall, "
                     f"{w['images'] / w['cpu_s']:.2f} per core")
        print(f"  {name:38s} workers {workers}: {rate:6.2f} img/s wall, {core_rate:6.2f} img/s per core "
              f"({r['images']} images, {r['cpu_s']:.1f} CPU-s{extra})")
    best = max(per_core)
    print(f"  {name:38s} ceiling {best:.2f} img/s per core, goal {goal:.0f}: "
          f"{'meets it' if best >= goal else f'{best / goal:.2f}x of it'}; x14 cores = {14 * best:.0f} img/s")
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-images", type=int, default=64)
    ap.add_argument("--val-images", type=int, default=24)
    ap.add_argument("--batches", type=int, default=24, help="train batches (of 2) timed per worker count")
    ap.add_argument("--workers", default="1,2", help="DataLoader workers to time, comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(1)   # the loader's and post-processing's own work, one core a process
    workers = [int(w) for w in args.workers.split(",")]
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}; r50_1x input sizes; images 480-640 px")
    train_shards, val_shards = data(args.train_images, args.val_images)
    print("train loader (the trainer's ShardDataset + DataLoader, batch 2):")
    for label, aug in (("train loader (no augmentation)", {}),
                       ("train loader (LSJ 1024 + copy-paste 0.5)", {"lsj_size": 1024, "copy_paste_prob": 0.5})):
        show(label, [(w, train_loader(train_shards, w, args.batches, aug)) for w in workers])
    recording = os.path.join(CACHE, f"r50-outputs-v2-{args.train_images}-{args.val_images}.pt")
    if not os.path.exists(recording):
        print("recording the R50 model's outputs on the val images (once) ...", flush=True)
        record_outputs(val_shards, recording)
    print("evaluate (panoptic evaluate end to end, the network replayed; the report's fixed cost apart):")
    show("evaluate (post-processing on the device)", [(w, marginal(val_shards, w, recording)) for w in workers])
    show("evaluate (post-processing on the CPU)", [(w, marginal(val_shards, w, recording, post_here=True))
                                                   for w in workers])
    with_report = evaluate_ceiling(val_shards, workers[-1], recording, report=8)
    plain = evaluate_ceiling(val_shards, workers[-1], recording)
    print(f"  the report (8 samples): {with_report['cpu_s'] - plain['cpu_s']:.1f} CPU-s once per evaluation")


if __name__ == "__main__":
    main()
