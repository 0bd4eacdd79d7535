"""The disk as it fails for real: a full file system and a read-only one (tmpfs mounts of their
own, so nothing else on the machine fills up). A full disk ends in one line naming the file it
could not write; a finished output on a disk made read-only re-runs to the same answer, writing
nothing (a write of what a file holds already is no write)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest

from components.synthetic.generator import SynthSettings, generate

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def tmpfs(path: str, size: str):
    os.makedirs(path, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode()[:200]}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)


def _panoptic(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "components", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("disk") / "coco")
    generate(root, SynthSettings(train=6, val=2, seed=3, min_side=96, max_side=160), progress=False)
    return root


def test_a_full_disk_is_one_line_naming_the_file(coco, tmp_path):
    with tmpfs(str(tmp_path / "full"), "256k") as full:
        with open(os.path.join(full, "filler"), "wb") as f:
            f.write(b"\0" * 250_000)
        sub = _panoptic("subset", "--source", coco, "--out", os.path.join(full, "sub"), "--size", "4")
        assert sub.returncode == 1 and "Traceback" not in sub.stderr
        line = sub.stderr.strip().splitlines()[-1]
        assert line.startswith(f"Error: {full}/sub/") and "No space left on device (the disk is full" in line
        ok = _panoptic("subset", "--source", coco, "--out", str(tmp_path / "sub"), "--size", "4")
        assert ok.returncode == 0, ok.stderr[-2000:]
        pre = _panoptic("preprocess", "--manifest", str(tmp_path / "sub"), "--out", os.path.join(full, "shards"),
                        "--quiet")
        assert pre.returncode == 1 and "Traceback" not in pre.stderr
        line = pre.stderr.strip().splitlines()[-1]
        assert line.startswith(f"Error: {full}/shards/") and "the disk is full" in line
        assert not os.path.exists(os.path.join(full, "shards", "_done"))


def test_a_finished_output_on_a_read_only_disk_reruns_to_the_same_answer(coco, tmp_path):
    with tmpfs(str(tmp_path / "ro"), "50m") as ro:
        first = [_panoptic("subset", "--source", coco, "--out", os.path.join(ro, "sub"), "--size", "4"),
                 _panoptic("preprocess", "--manifest", os.path.join(ro, "sub"), "--out", os.path.join(ro, "shards"),
                           "--quiet")]
        assert all(p.returncode == 0 for p in first), [p.stderr[-2000:] for p in first]
        before = {f: os.stat(os.path.join(d, f)).st_mtime_ns for d in (os.path.join(ro, "sub"), os.path.join(
            ro, "shards")) for f in os.listdir(d)}
        assert subprocess.run(["mount", "-o", "remount,ro", ro]).returncode == 0
        again = [_panoptic("subset", "--source", coco, "--out", os.path.join(ro, "sub"), "--size", "4"),
                 _panoptic("preprocess", "--manifest", os.path.join(ro, "sub"), "--out", os.path.join(ro, "shards"),
                           "--quiet")]
        assert all(p.returncode == 0 for p in again), [p.stderr[-2000:] for p in again]
        assert first[0].stdout.strip().splitlines()[-1] == again[0].stdout.strip().splitlines()[-1]   # its hash
        assert "1 already complete" in again[1].stdout + again[1].stderr
        after = {f: os.stat(os.path.join(d, f)).st_mtime_ns for d in (os.path.join(ro, "sub"), os.path.join(
            ro, "shards")) for f in os.listdir(d)}
        assert after == before
