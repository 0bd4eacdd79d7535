"""Preprocessing throughput vs a plain copy of the same source bytes; reader throughput.

    .venv/bin/python benchmarks/preprocess.py [--images 400] [--keep DIR] [--workers 2]

Prints images/s of `preprocess` (every sample through the quality gate, Parquet shards,
sha256, index) and of a plain copy of the same JPEG+PNG files to the same folder, measured side
by side in one run, and their ratio (goal >= 0.5), twice: with the source files in the page
cache, and with them dropped from it before each run (read from the disk, as a pipeline stage
reading a dataset once does). Then the streaming reader's images/s with 0, 1 and 2 DataLoader workers
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

from components.common.coco_panoptic import load_split  # noqa: E402
from components.common.manifests import load_manifest  # noqa: E402
from components.preprocess.core import PreprocessSettings, preprocess  # noqa: E402
from components.select_subset.core import SplitSettings, select_subset  # noqa: E402
from components.synthetic.generator import SynthSettings, generate  # noqa: E402


def source_files(root: str, manifest: dict) -> list[str]:
    data = load_split(root, "train2017")
    images = {im["id"]: im for im in data.images}
    return [u for i in manifest["image_ids"] for u in (data.image_uri(images[i]), data.png_uri(data.annotations[i]))]


def plain_copy(files: list[str], dst: str) -> None:
    """What `cp` does: read each file, write it under ``dst`` (one thread)."""
    os.makedirs(dst, exist_ok=True)
    for src in files:
        with open(src, "rb") as f, open(os.path.join(dst, os.path.basename(src)), "wb") as g:
            g.write(f.read())


def evict(files: list[str]) -> bool:
    """Drop the files' pages from the page cache (Linux), so the next read comes from the disk."""
    if not hasattr(os, "posix_fadvise"):
        return False
    os.sync()  # only clean pages can be dropped
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def medians(steps: dict, prepare, repeats: int) -> dict:
    """Run every step once per round, round-robin (so a drift in the machine's state hits all of
    them alike), ``prepare()`` before each run; the median seconds of each step."""
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            prepare()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400, help="synthetic images to generate (when not kept)")
    ap.add_argument("--workers", type=int, default=2, help="shard writers for the parallel preprocess row")
    ap.add_argument("--repeats", type=int, default=3, help="runs per row; the median is printed")
    ap.add_argument("--keep", help="reuse/keep the dataset in this folder")
    ap.add_argument("--no-reader", action="store_true", help="skip the reader measurements")
    ap.add_argument("--out-dir", help="where both sides write (default: a temporary folder)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-pre-", dir=args.out_dir)
    root = args.keep or os.path.join(tmp, "coco")
    if not os.path.exists(os.path.join(root, "annotations", "panoptic_train2017.json")):
        print(f"generating {args.images} COCO-sized synthetic images (400-640 px) ...", flush=True)
        generate(root, SynthSettings(train=args.images, val=0, seed=0, min_side=400, max_side=640), progress=False)
    m_uri = select_subset(SplitSettings(), root, "train2017", os.path.join(tmp, "subset")).manifest_uri
    manifest = load_manifest(m_uri)
    n = manifest["num_images"]
    files = source_files(root, manifest)
    mb = sum(os.path.getsize(f) for f in files) / 2**20
    runs = iter(range(10**6))
    out = os.path.join(tmp, "out")

    def fresh_out():
        # a new folder per run: deleting the last run's files first would make the disk busy
        # with their discards (an ext4 `discard` mount) during the timed run
        nonlocal out
        out = os.path.join(tmp, f"out-{next(runs)}")

    def run_preprocess(workers):
        return lambda: preprocess(PreprocessSettings(shard_images=250, workers=workers), m_uri, out, progress=False)

    print(f"\nsource: {n} images, {mb:.0f} MiB (JPEG + PNG); cpu cores: {os.cpu_count()}; "
          f"both sides write to {tmp}; median of {args.repeats} round-robin rounds")
    print(f"{'source in':12s} {'step':32s} {'seconds':>8s} {'images/s':>9s} {'vs copy':>8s}")
    for scenario in ("page cache", "disk (cold)"):
        if scenario == "page cache":
            plain_copy(files, os.path.join(tmp, "warm-up"))  # reads every file once
            shutil.rmtree(os.path.join(tmp, "warm-up"))

            def prepare():
                fresh_out()
                os.sync()  # each run starts with nothing left to write back from the last
        else:
            if not evict(files):
                print(f"{scenario:12s} (cannot drop pages from the cache on this OS: skipped)")
                continue

            def prepare():
                fresh_out()
                evict(files)  # syncs, then drops the source files' pages
        steps = {"plain copy of the same files": lambda: plain_copy(files, out)}
        for workers in sorted({1, args.workers}):
            steps[f"preprocess, {workers} writer{'s' if workers > 1 else ''}"] = run_preprocess(workers)
        result = medians(steps, prepare, args.repeats)
        t_copy = result["plain copy of the same files"]
        for label, t in result.items():
            print(f"{scenario:12s} {label:32s} {t:8.2f} {n / t:9.1f} {t_copy / t:8.2f}")
    fresh_out()
    run_preprocess(args.workers)()
    shards = out

    if args.no_reader:
        shutil.rmtree(tmp)
        return
    # torch only here: the preprocess writers are spawned processes, which import this module
    from torch.utils.data import DataLoader

    from components.data.reader import ShardDataset, collate
    from components.model.config import InputConfig

    cats = load_split(root, "train2017").categories
    print(f"\n{'reader (decode + resize + targets)':40s} {'workers':>8s} {'images/s':>9s} {'per worker':>10s}")
    for label, aug in (("tiny sizes (short 224-288, max 512)", InputConfig((224, 256, 288), 512, 256, 512)),
                       ("COCO sizes (short 640-800, max 1333)", InputConfig())):
        for workers in (0, 1, 2):
            ds = ShardDataset(shards, cats, aug, train=True, seed=0)
            loader = DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate)
            t0 = time.perf_counter()
            count = sum(len(b) for b in loader)
            dt = time.perf_counter() - t0
            print(f"{label:40s} {workers:8d} {count / dt:9.1f} {count / dt / max(workers, 1):10.1f}")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
