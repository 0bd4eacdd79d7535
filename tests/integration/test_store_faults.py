"""The object store failing for a while (issue 34): moto's S3 server behind tests/fault_proxy.py,
which answers 503, drops, stalls or cuts requests for a window. Inside the retry budget the result
is the clean run's, byte for byte; past it, one line naming the store and the object, nothing
half-written, and the re-run converges."""

import logging
import os
import subprocess
import sys

import pytest

from components.common import storage
from components.preprocess.core import PreprocessSettings, preprocess
from components.select_subset.core import SplitSettings, select_subset
from components.synthetic.generator import SynthSettings, generate
from tests.fault_proxy import FaultProxy
from tests.servers import moto_s3

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def store():
    """moto with a synthetic set and its subset on it; the proxy in front; AWS_ENDPOINT_URL on the proxy."""
    with moto_s3("panoptic") as endpoint, FaultProxy(endpoint) as proxy:
        generate("s3://panoptic/coco", SynthSettings(train=6, val=2, seed=3, min_side=96, max_side=160),
                 progress=False)
        manifest = select_subset(SplitSettings(size=6, seed=0), "s3://panoptic/coco", "train2017",
                                 "s3://panoptic/subset").manifest_uri
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        storage._s3.cache_clear()
        try:
            yield proxy, manifest
        finally:
            os.environ["AWS_ENDPOINT_URL"] = endpoint
            storage._s3.cache_clear()


def _shards(prefix):
    return {name: storage.read_bytes(storage.join(prefix, name)) for name in storage.listdir(prefix)
            if name.endswith(".parquet")}


@pytest.fixture(scope="module")
def clean(store):
    proxy, manifest = store
    faulted = len(proxy.hits)
    preprocess(PreprocessSettings(shard_images=2, workers=0), manifest, "s3://panoptic/clean", progress=False)
    shards = _shards("s3://panoptic/clean")
    assert len(shards) == 3 and len(proxy.hits) == faulted
    return shards


@pytest.mark.parametrize("kind", ["status", "drop", "stall", "cut"])
def test_a_write_inside_a_fault_window_is_retried_and_lands_whole(store, kind, caplog):
    proxy, _ = store
    data = os.urandom(200_000)
    # longer than pyarrow's own retries last (about 2 s for a 503): ours carry it through
    proxy.inject(kind, seconds=4, match=r"^/panoptic/blips/", delay_s=5)
    with caplog.at_level(logging.WARNING, logger="components.common.storage"):
        storage.write_bytes(f"s3://panoptic/blips/{kind}.bin", data)
    proxy.clear()
    assert proxy.hits and proxy.hits[-1][0] == kind
    assert storage.read_bytes(f"s3://panoptic/blips/{kind}.bin") == data
    if kind in ("status", "drop"):   # a stall and a cut may end inside pyarrow's own retries
        assert "failed to write it" in caplog.text and "retry 1 of 4" in caplog.text


def test_shards_written_through_a_503_storm_equal_the_clean_runs(store, clean, caplog):
    proxy, manifest = store
    proxy.inject("status", seconds=5, match=r"^/panoptic/storm/", method="POST")
    with caplog.at_level(logging.WARNING, logger="components.common.storage"):
        r = preprocess(PreprocessSettings(shard_images=2, workers=0), manifest, "s3://panoptic/storm", progress=False)
    proxy.clear()
    assert proxy.hits and "retry 1 of 4" in caplog.text
    assert (r.rows_written, r.quarantined) == (6, 0)
    assert _shards("s3://panoptic/storm") == clean


def test_a_store_down_past_the_budget_fails_in_one_line_and_the_rerun_converges(store, clean):
    proxy, manifest = store
    proxy.inject("status", match=r"^/panoptic/down/", method="POST")     # until cleared
    env = {**os.environ, "PANOPTIC_STORE_ATTEMPTS": "2"}
    cmd = [sys.executable, "-m", "components", "preprocess", "--manifest", manifest, "--out", "s3://panoptic/down",
           "--shard-images", "2", "--workers", "0", "--quiet"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    proxy.clear()
    assert out.returncode == 1, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out.stderr
    assert last.startswith("Error: s3://panoptic/down/") and proxy.url in last and "failed to write it 2 times" in last
    assert "nothing half-written" in last and "PANOPTIC_STORE_ATTEMPTS" in last
    assert not _shards("s3://panoptic/down")      # no shard object at all: S3 shows a PUT whole or not
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _shards("s3://panoptic/down") == clean
