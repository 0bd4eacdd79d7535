"""The fault table (issue 34): each fault of the servers around us, played for a window by
tests/fault_proxy.py in front of the real server, what the call does and how long it takes; then
what the retries cost when nothing fails.

    .venv/bin/python benchmarks/faults.py [--rounds 3] [--images 24]

Object store: moto's S3 server; the call is ``storage.write_bytes`` of a 1 MB object (a shard),
the window opened just before it. MLflow: ``mlflow server`` on a sqlite store; the call is
register's own first write and read: take the registry lock (a create), list the registry,
release it (a delete), the window opened just before. "recovered" means the object reads back
equal / the lock was held and is gone; "failed" gives the error's first words. Defaults: the
retry budgets as a user has them (``PANOPTIC_STORE_ATTEMPTS`` 5, ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` 5).

No-fault cost: ``panoptic preprocess --out s3://...`` (the whole CLI, its default flags) on moto,
from this tree and from ``--baseline`` (a revision before the store retries, checked out to a
temporary worktree), alternated ``--rounds`` times; medians side by side.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FAULTS = [("status", 503, 2.0), ("status", 503, 10.0), ("status", 503, 60.0), ("drop", None, 6.0),
          ("stall", None, 10.0), ("cut", None, 1.0)]


def _outcome(call) -> tuple[str, float]:
    t = time.monotonic()
    try:
        call()
        return "recovered", time.monotonic() - t
    except Exception as e:   # the table reports it
        return f"failed: {' '.join(str(e).split())[:90]}", time.monotonic() - t


def store_faults(proxy) -> list[tuple]:
    from components.common import storage

    rows = []
    for kind, status, window in FAULTS:
        uri = f"s3://panoptic/table/{uuid.uuid4().hex}.bin"
        data = os.urandom(1 << 20)
        proxy.inject(kind, seconds=window, status=status or 503, delay_s=window)

        def call():
            storage.write_bytes(uri, data)
            assert storage.read_bytes(uri) == data
        outcome, took = _outcome(call)
        proxy.clear()
        rows.append(("object store: write 1 MB", f"{kind}{f' {status}' if status else ''}", window, outcome, took))
    return rows


def mlflow_faults(proxy) -> list[tuple]:
    from mlflow.tracking import MlflowClient

    from components.register.core import registry_lock

    rows = []
    for kind, status, window in FAULTS:
        name = f"m-{uuid.uuid4().hex[:8]}"
        proxy.inject(kind, seconds=window, status=status or 503, delay_s=window)

        def call():
            client = MlflowClient(proxy.url)
            with registry_lock(client, name):
                assert [m.name for m in client.search_registered_models(f"name = '{name}.lock'")] == [f"{name}.lock"]
            assert not client.search_registered_models(f"name = '{name}.lock'")
        outcome, took = _outcome(call)
        proxy.clear()
        rows.append(("MLflow: registry lock, list, release", f"{kind}{f' {status}' if status else ''}", window,
                     outcome, took))
    return rows


def no_fault_cost(baseline: str, rounds: int, images: int, tmp: str) -> tuple[list[float], list[float]]:
    from components.select_subset.core import SplitSettings, select_subset
    from components.synthetic.generator import SynthSettings, generate

    data = os.path.join(tmp, "coco")
    generate(data, SynthSettings(train=images, val=2, seed=0), progress=False)
    manifest = select_subset(SplitSettings(size=images, seed=0), data, "train2017", os.path.join(tmp, "subset")
                             ).manifest_uri
    old = os.path.join(tmp, "baseline")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", old, baseline], check=True,
                   capture_output=True)
    times: dict[str, list[float]] = {"this": [], "baseline": []}
    try:
        for r in range(rounds + 1):      # round 0 warms the caches: not counted
            for label, tree in (("this", ROOT), ("baseline", old)):
                cmd = [sys.executable, "-m", "components", "preprocess", "--manifest", manifest,
                       "--out", f"s3://panoptic/cost/{label}-{r}", "--quiet"]
                t = time.monotonic()
                subprocess.run(cmd, cwd=tree, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": tree})
                if r:
                    times[label].append(time.monotonic() - t)
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", old], capture_output=True)
    return times["this"], times["baseline"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--baseline", default="d57c467", help="a revision before the store retries")
    args = ap.parse_args()

    from tests.fault_proxy import FaultProxy
    from tests.servers import mlflow_server, moto_s3

    with tempfile.TemporaryDirectory() as tmp:
        with moto_s3("panoptic") as endpoint:
            with FaultProxy(endpoint) as proxy:
                os.environ["AWS_ENDPOINT_URL"] = proxy.url
                rows = store_faults(proxy)
                os.environ["AWS_ENDPOINT_URL"] = endpoint
            this, base = no_fault_cost(args.baseline, args.rounds, args.images, tmp)
        with mlflow_server(f"sqlite:///{tmp}/mlflow.db", os.path.join(tmp, "artifacts")) as url, \
                FaultProxy(url) as proxy:
            import components.common.tracking  # noqa: F401  (our retry settings and their log lines)

            rows += mlflow_faults(proxy)
    print(f"{'server: call':34} {'fault':11} {'window':>7}  {'time':>6}  outcome")
    for where, fault, window, outcome, took in rows:
        print(f"{where:34} {fault:11} {window:6.0f}s  {took:5.1f}s  {outcome}")
    ratio = statistics.median(this) / statistics.median(base)
    print(f"\nno fault: panoptic preprocess --out s3://... ({args.images} images, {args.rounds} rounds alternated): "
          f"this tree median {statistics.median(this):.2f} s {[round(t, 2) for t in this]}, {args.baseline} median "
          f"{statistics.median(base):.2f} s {[round(t, 2) for t in base]}: ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
