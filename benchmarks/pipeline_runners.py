"""The whole DAG as a user runs it, in our images (KFP's DockerRunner) beside this venv
(SubprocessRunner): `panoptic pipeline run-local --runner docker` vs `--runner subprocess`.

    .venv/bin/python benchmarks/pipeline_runners.py [--data data/synth] [--rounds 1] [--iterations N]

Each round runs both commands as fresh processes, round-robin, each on its own pipeline root and
MLflow store (so each trains: no "nothing new"), with run-local's default flags unless
``--iterations`` shortens the training; then the second, "nothing new" run of each. Wall time
from start to exit. The images are the ones `make images` (or `make test-images`) tagged:
``IMAGE_REGISTRY`` / ``IMAGE_TAG`` (default: the test images, panoptic-test/...:ci). Skips, saying
why, when no Docker engine answers or the images are missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PANOPTIC = os.path.join(os.path.dirname(sys.executable), "panoptic")


def _images_ready(env: dict) -> str | None:
    """Why the docker side cannot run, or None."""
    for target in ("cpu", "cuda"):
        image = f"{env['IMAGE_REGISTRY']}/panoptic-{target}:{env['IMAGE_TAG']}"
        r = subprocess.run(["docker", "image", "inspect", image], capture_output=True, text=True)
        if r.returncode != 0:
            return f"image {image} is missing (make test-images, or make images with IMAGE_REGISTRY/IMAGE_TAG)"
    return None


def _run(runner: str, data: str, root: str, env: dict, iterations: int | None) -> float:
    cmd = [PANOPTIC, "pipeline", "run-local", "--runner", runner, "--data", data, "--root", root]
    if iterations:
        cmd += ["--iterations", str(iterations)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=os.path.dirname(root))
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(ROOT, "data", "synth"), help="a COCO panoptic root (made if missing)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--iterations", type=int, default=None, help="train iterations (default: run-local's)")
    args = p.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.setdefault("IMAGE_REGISTRY", "panoptic-test")
    env.setdefault("IMAGE_TAG", "ci")
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        print("skipped: no Docker engine answers (containers/engine.sh starts one)")
        return
    why = _images_ready(env)
    if why:
        print(f"skipped: {why}")
        return
    if not os.path.exists(os.path.join(args.data, "annotations", "panoptic_val2017.json")):
        subprocess.run([PANOPTIC, "data", "synth", "--out", args.data, "--train", "200", "--val", "50"], check=True)
    data = os.path.abspath(args.data)
    times: dict[str, list[float]] = {k: [] for k in ("subprocess", "docker", "subprocess again", "docker again")}
    for _ in range(args.rounds):
        for runner in ("subprocess", "docker"):
            work = tempfile.mkdtemp(prefix=f"bench-{runner}-")
            root = os.path.join(work, "root")
            times[runner].append(_run(runner, data, root, env | {"MLFLOW_TRACKING_URI":
                                                                 f"sqlite:///{work}/mlflow.db"}, args.iterations))
            times[f"{runner} again"].append(_run(runner, data, root, env | {"MLFLOW_TRACKING_URI":
                                                                            f"sqlite:///{work}/mlflow.db"},
                                                 args.iterations))
            shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    its = args.iterations or "run-local's default"
    print(f"run-local on {data} (train iterations: {its}; median of {args.rounds}):")
    print(f"{'runner':28s}{'first run (trains)':>22s}{'again (nothing new)':>22s}")
    for runner in ("subprocess", "docker"):
        print(f"{runner:28s}{med[runner]:20.1f} s{med[runner + ' again']:20.1f} s")
    print(f"docker / subprocess: {med['docker'] / med['subprocess']:.2f}x (first), "
          f"{med['docker again'] / med['subprocess again']:.2f}x (nothing new)")


if __name__ == "__main__":
    main()
