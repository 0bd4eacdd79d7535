"""Preprocessing throughput vs a plain copy of the same source bytes; reader throughput.

    .venv/bin/python benchmarks/preprocess.py [--images 400] [--workers 2]

Prints images/s of `preprocess` (decode-checked, quarantine gate, Parquet shards) and of a
plain copy of the same JPEG+PNG files, measured side by side in one run, and their ratio
(goal >= 0.5). Then the streaming reader's images/s with 0, 1 and 2 DataLoader workers
(decode + detectron2-style resize + targets, tiny-config sizes and COCO sizes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch.utils.data import DataLoader  # noqa: E402

from components.common.coco_panoptic import load_split  # noqa: E402
from components.preprocess.core import PreprocessConfig, preprocess  # noqa: E402
from components.preprocess.reader import ShardDataset, collate  # noqa: E402
from components.preprocess.targets import AugConfig  # noqa: E402
from components.select_subset.core import SubsetConfig, load_manifest, select_subset  # noqa: E402
from components.synthetic.generator import SynthConfig, generate  # noqa: E402


def plain_copy(root: str, manifest: dict, dst: str) -> None:
    data = load_split(root, "train2017")
    images = {im["id"]: im for im in data.images}
    os.makedirs(dst, exist_ok=True)
    for i in manifest["image_ids"]:
        for src in (data.image_uri(images[i]), data.png_uri(data.annotations[i])):
            with open(src, "rb") as f, open(os.path.join(dst, os.path.basename(src)), "wb") as g:
                g.write(f.read())


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", help="reuse/keep the dataset in this folder")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-pre-")
    root = args.keep or os.path.join(tmp, "coco")
    if not os.path.exists(os.path.join(root, "annotations", "panoptic_train2017.json")):
        print(f"generating {args.images} COCO-sized synthetic images (400-640 px) ...", flush=True)
        generate(root, SynthConfig(train=args.images, val=0, seed=0, min_side=400, max_side=640), progress=False)
    m_uri = select_subset(SubsetConfig(), root, "train2017", os.path.join(tmp, "subset")).manifest_uri
    manifest = load_manifest(m_uri)
    n = manifest["num_images"]
    mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs) / 2**20

    # warm the page cache so both sides read from memory
    plain_copy(root, manifest, os.path.join(tmp, "warm"))
    # a copy takes well under a second: the median of 3 steadies it
    t_copy = sorted(timed(lambda: plain_copy(root, manifest, os.path.join(tmp, f"copy{k}"))) for k in range(3))[1]
    t_pre = timed(lambda: preprocess(PreprocessConfig(shard_images=100, workers=args.workers), m_uri,
                                     os.path.join(tmp, "shards"), progress=False))
    t_pre1 = timed(lambda: preprocess(PreprocessConfig(shard_images=100, workers=0), m_uri,
                                      os.path.join(tmp, "shards1"), progress=False))
    print(f"\nsource: {n} images, {mb:.0f} MiB (JPEG + PNG), cpu cores: {os.cpu_count()}")
    print(f"{'step':40s} {'seconds':>8s} {'images/s':>9s} {'vs copy':>8s}")
    print(f"{'plain copy of the same bytes (median of 3)':40s} {t_copy:8.2f} {n / t_copy:9.1f} {1.0:8.2f}")
    print(f"{f'preprocess, {args.workers} processes':40s} {t_pre:8.2f} {n / t_pre:9.1f} {t_copy / t_pre:8.2f}")
    print(f"{'preprocess, in-process':40s} {t_pre1:8.2f} {n / t_pre1:9.1f} {t_copy / t_pre1:8.2f}")

    cats = load_split(root, "train2017").categories
    print(f"\n{'reader (decode + resize + targets)':40s} {'workers':>8s} {'images/s':>9s} {'per worker':>10s}")
    for label, aug in (("tiny sizes (short 224-288, max 512)", AugConfig((224, 256, 288), 512, 256, 512)),
                       ("COCO sizes (short 640-800, max 1333)", AugConfig())):
        for workers in (0, 1, 2):
            ds = ShardDataset(os.path.join(tmp, "shards"), cats, aug, train=True, seed=0)
            loader = DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate)
            t0 = time.perf_counter()
            count = sum(len(b) for b in loader)
            dt = time.perf_counter() - t0
            print(f"{label:40s} {workers:8d} {count / dt:9.1f} {count / dt / max(workers, 1):10.1f}")
    if not args.keep:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
