"""How long the champion-vs-challenger report takes for a large validation set, as a user runs it.

``panoptic runs diff 1 2`` (its default flags) is timed from start to exit in a fresh process:
imports, the registry, both registered evaluations (metrics.json, per_image.csv), the shards'
image ids, the 8 images shown (decoded, drawn, the two models' predictions made again because
a registered evaluation keeps no PNGs), the HTML. Beside it, the same report at a tenth of the
images, so the cost that grows with the set shows apart from the fixed one.

    .venv/bin/python benchmarks/gate_report.py --images 5000

The validation set: the synthetic val split's images repeated under new ids (each row a full
record in the shards); the two "evaluations" score every image with our PQ accumulator against
ground truth passed through two different spoilers, as ``panoptic evaluate`` writes them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def repeat_shards(src: str, dst: str, images: int, per_shard: int = 500) -> str:
    """Shards of ``images`` rows: ``src``'s rows over and over, each copy under a new id."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from components.data.records import COMPRESSION, SCHEMA, load_index, shard_image_ids
    from components.register.gate_report import read_samples

    index = load_index(src)
    rows = list(read_samples(src, set(shard_image_ids(src))).values())
    os.makedirs(dst, exist_ok=True)
    shards, made = [], 0
    while made < images:
        batch = []
        for k in range(min(per_shard, images - made)):
            row = dict(rows[(made + k) % len(rows)])
            row["image_id"] = 10_000_000 + made + k
            row["file_name"] = f"{row['image_id']:012d}.jpg"
            batch.append(row)
        name = f"val-{len(shards):05d}.parquet"
        pq.write_table(pa.Table.from_pylist(batch, schema=SCHEMA), os.path.join(dst, name),
                       compression=COMPRESSION)
        data = open(os.path.join(dst, name), "rb").read()
        shards.append({"file": name, "rows": len(batch), "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()})
        made += len(batch)
    doc = {**index, "shards": shards, "source_manifest_hash": hashlib.sha256(f"repeat{images}".encode()).hexdigest()}
    json.dump(doc, open(os.path.join(dst, "index.json"), "w"))
    return dst


def registry(tmp: str, shards: str, model: str) -> str:
    """A sqlite store with versions 1 and 2 of panoptic-fpn, each with a register run holding its
    evaluation (metrics.json and per_image.csv) as ``panoptic register`` logs it."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from components.register.core import EVAL_ARTIFACT
    from components.register.pyfunc import log_pyfunc
    from tests.unit.test_gate_report import fake_evaluation

    uri = f"sqlite:///{tmp}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("bench", artifact_location=os.path.join(tmp, "mlruns"))
    client = MlflowClient(uri)
    cats = sorted(int(c["id"]) for c in json.load(open(os.path.join(shards, "index.json")))["categories"])
    spoilers = [lambda i, s: None if i % 7 == 0 else s,   # v1 misses every 7th image
                lambda i, s: {**s, "category_id": cats[0]} if i % 5 == 0 else s]   # v2 mislabels every 5th
    for spoil in spoilers:
        folder = tempfile.mkdtemp(dir=tmp)
        t0 = time.perf_counter()
        fake_evaluation(shards, folder, spoil)
        print(f"  (an evaluation of {len(os.listdir(os.path.join(folder, 'predictions', 'panoptic_val')))} images "
              f"written in {time.perf_counter() - t0:.0f} s)", flush=True)
        with mlflow.start_run(experiment_id=exp) as run:
            mlflow.log_artifact(os.path.join(folder, "metrics.json"), EVAL_ARTIFACT)
            mlflow.log_artifact(os.path.join(folder, "per_image.csv"), EVAL_ARTIFACT)
            logged = log_pyfunc(model)
        mv = mlflow.register_model(logged.model_uri, "panoptic-fpn")
        client.set_model_version_tag("panoptic-fpn", mv.version, "register_run_id", run.info.run_id)
    return uri


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    dt = time.perf_counter() - t0
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return dt


def main() -> None:
    from components.synthetic.generator import SynthSettings, generate
    from tests.training import make_shards
    from tests.unit.test_pyfunc import _tiny_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    panoptic = os.path.join(os.path.dirname(sys.executable), "panoptic")
    tmp = tempfile.mkdtemp(prefix="gate-bench-")
    try:
        generate(os.path.join(tmp, "coco"), SynthSettings(train=1, val=50, seed=0), progress=False)
        base = make_shards(os.path.join(tmp, "coco"), os.path.join(tmp, "base"), split="val2017")
        _tiny_model(os.path.join(tmp, "model.pt"))
        rows = []
        for n in (args.images // 10, args.images):
            work = os.path.join(tmp, f"n{n}")
            shards = repeat_shards(base, os.path.join(work, "shards"), n)
            uri = registry(work, shards, os.path.join(tmp, "model.pt"))
            env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
            cmd = [panoptic, "runs", "diff", "1", "2", "--out", os.path.join(work, "gate.html")]
            times = sorted(timed(cmd, env) for _ in range(args.rounds))
            size = os.path.getsize(os.path.join(work, "gate.html"))
            rows.append((n, times[len(times) // 2], size))
        print(f"\n`panoptic runs diff 1 2` (default flags), fresh process, median of {args.rounds}")
        print("| validation images | median s | report size |\n|---|---|---|")
        for n, t, size in rows:
            print(f"| {n:,} | {t:.2f} | {size / 1e6:.2f} MB |")
        (n1, t1, _), (n2, t2, _) = rows
        print(f"\n{n2:,} images cost {t2 - t1:+.2f} s more than {n1:,} ({t2 / t1:.2f}x the time for {n2 / n1:.0f}x "
              f"the images)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
