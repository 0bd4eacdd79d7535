import json
import os

import pyarrow.parquet as pq
import pytest

from components.data.records import load_index
from components.preprocess.core import DataQualityError, PreprocessSettings, preprocess
from components.select_subset.core import SplitSettings, select_subset
from tests.corrupt import KINDS, corrupt


def _manifest(root, tmp_path, name="m", **kw):
    return select_subset(SplitSettings(**kw), root, "train2017", str(tmp_path / name)).manifest_uri


def _files(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder)) if n.endswith(".parquet")}


def test_shards_are_byte_identical_and_rows_complete(synth_root, tmp_path):
    m = _manifest(synth_root, tmp_path)
    # 3 writers: this process and 2 spawned ones, taking jobs as they free up
    a = preprocess(PreprocessSettings(shard_images=5, workers=3), m, str(tmp_path / "a"), progress=False)
    preprocess(PreprocessSettings(shard_images=5, workers=0), m, str(tmp_path / "b"), progress=False)
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert list(fa) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet", "part-00003.parquet"]
    assert fa == fb
    assert a.rows_written == 16 and a.quarantined == 0 and a.images_in == 16
    index = load_index(str(tmp_path / "a"))
    assert [s["rows"] for s in index["shards"]] == [5, 5, 5, 1]
    t = pq.read_table(tmp_path / "a" / "part-00000.parquet")
    assert t.column_names == ["image_id", "file_name", "height", "width", "image", "panoptic_png", "segments_info"]
    # original JPEG bytes, not re-encoded
    row = t.slice(0, 1).to_pylist()[0]
    assert row["image"] == open(os.path.join(synth_root, "train2017", row["file_name"]), "rb").read()
    assert index["source_manifest_hash"] == json.load(open(m))["manifest_hash"]


@pytest.mark.parametrize("broken", [0, 3])
def test_a_failing_writer_fails_the_stage_and_names_the_file(synth_root, tmp_path, broken):
    """Whichever writer (this process or a spawned one) fails, the error reaches the caller."""
    m = _manifest(synth_root, tmp_path)
    out = tmp_path / "s"
    (out / f"part-{broken:05d}.parquet").mkdir(parents=True)  # a folder where the shard must go
    with pytest.raises(OSError, match=f"part-{broken:05d}.parquet"):
        preprocess(PreprocessSettings(shard_images=4, workers=2), m, str(out), progress=False)
    assert not (out / "index.json").exists()


def test_rerun_after_crash_skips_complete_shards_and_replaces_the_rest(synth_root, tmp_path):
    m = _manifest(synth_root, tmp_path)
    out = tmp_path / "s"
    cfg = PreprocessSettings(shard_images=4, workers=0)
    preprocess(cfg, m, str(out), progress=False)
    good = _files(out)
    # a crash: shard 1 never finished (half-written temp file, no marker, no final file),
    # shard 2 was truncated on disk after its marker was written, shard 3's marker is torn
    # (what a power cut can leave of a file renamed before its pages reached the disk)
    os.remove(out / "part-00001.parquet")
    os.remove(out / "_done" / "part-00001.json")
    (out / ".tmp-deadbeef-part-00001.parquet").write_bytes(good["part-00001.parquet"][:100])
    (out / "part-00002.parquet").write_bytes(good["part-00002.parquet"][:-50])
    marker3 = out / "_done" / "part-00003.json"
    marker3.write_bytes(marker3.read_bytes()[:20])
    r = preprocess(cfg, m, str(out), progress=False)
    assert r.skipped_shards == 1
    assert _files(out) == good
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    # and a third run has nothing to do
    assert preprocess(cfg, m, str(out), progress=False).skipped_shards == 4


def test_resize_option(synth_root, tmp_path):
    m = _manifest(synth_root, tmp_path, size=4)
    preprocess(PreprocessSettings(max_side=128, workers=0), m, str(tmp_path / "s"), progress=False)
    t = pq.read_table(tmp_path / "s" / "part-00000.parquet").to_pylist()
    assert all(max(r["height"], r["width"]) == 128 for r in t)
    from components.common.coco_panoptic import decode_png
    for r in t:
        ids = decode_png(r["panoptic_png"])
        assert ids.shape == (r["height"], r["width"])
        assert {s["id"] for s in r["segments_info"]} == set(ids.ravel().tolist()) - {0}
        assert all(s["area"] == int((ids == s["id"]).sum()) for s in r["segments_info"])


@pytest.mark.parametrize("kind", KINDS)
def test_each_bad_input_kind_is_quarantined_with_its_reason(synth_copy, tmp_path, kind):
    m = _manifest(synth_copy, tmp_path)  # manifest first: the JSON still lists every image
    image_id, target = corrupt(synth_copy, "train2017", kind)
    r = preprocess(PreprocessSettings(shard_images=6, workers=0, max_bad_fraction=0.1), m, str(tmp_path / "s"),
                   progress=False)
    assert r.quarantined == 1 and r.rows_written == 15 and r.images_in == r.rows_written + r.quarantined
    q = [json.loads(line) for line in open(tmp_path / "s" / "quarantine.jsonl")]
    assert len(q) == 1 and q[0]["image_id"] == image_id
    assert kind in {reason["kind"] for reason in q[0]["reasons"]}
    assert any(target == reason["file"] and reason["fix"] for reason in q[0]["reasons"]) or kind == "missing_annotation"
    assert load_index(str(tmp_path / "s"))["quarantine_by_kind"][kind] == 1
    rows = sum(pq.read_metadata(tmp_path / "s" / f).num_rows
               for f in os.listdir(tmp_path / "s") if f.endswith(".parquet"))
    assert rows == 15


def test_gate_fails_the_stage_with_a_clear_message(synth_copy, tmp_path):
    m = _manifest(synth_copy, tmp_path)
    for i in range(3):
        corrupt(synth_copy, "train2017", "corrupt_png", index=i)
    with pytest.raises(DataQualityError, match=r"3 of 16 samples \(18.8%\).*corrupt_png.*quarantine.jsonl"):
        preprocess(PreprocessSettings(workers=0, max_bad_fraction=0.1), m, str(tmp_path / "s"), progress=False)
    # the report is still written, counts adding up, and it says the gate failed; nothing looks complete
    index = json.load(open(tmp_path / "s" / "index.json"))
    assert index["images_in"] == index["rows_written"] + index["quarantined"] == 16
    assert index["quality_gate"]["passed"] is False and "3 of 16 samples" in index["quality_gate"]["failure"]
    assert not [f for f in os.listdir(tmp_path / "s" / "_done") if f.endswith(".json")]
    with pytest.raises(ValueError, match=r"failed preprocess's data-quality gate, so nothing may train or evaluate"):
        load_index(str(tmp_path / "s"))   # what train and evaluate read: refused
    # a re-run that accepts the quarantine rewrites the same shards and passes
    preprocess(PreprocessSettings(workers=0, max_bad_fraction=0.5), m, str(tmp_path / "s"), progress=False)
    assert load_index(str(tmp_path / "s"))["quality_gate"]["passed"] is True


def test_the_default_writer_count_is_the_pods_cpu_limit_not_the_nodes(tmp_path, monkeypatch):
    """A pod limited to 1.5 CPUs on a 64-core node gets 2 writers (cgroup v2 cpu.max, or v1's
    quota and period), never 64."""
    import os

    from components.common.cluster import usable_cpus

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert usable_cpus(str(tmp_path)) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(str(tmp_path)) == 64
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("800000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(str(v1)) == 8
    assert usable_cpus(str(tmp_path / "none")) == 64


def test_a_negative_writer_count_is_refused_where_it_is_parsed():
    from components.preprocess.core import PreprocessSettings

    for bad in (-3, 5000):
        with pytest.raises(ValueError, match=f"workers must be 0 .* not {bad}"):
            PreprocessSettings(workers=bad)


def test_a_manifest_that_lists_an_image_twice_is_refused(synth_copy, tmp_path):
    """Re-hashed so that its hash still matches: the duplicate itself is what is refused."""
    from components.common.hashing import canonical_hash
    from components.common.manifests import load_manifest

    folder = _manifest(synth_copy, tmp_path)
    path = os.path.join(folder, "manifest.json") if os.path.isdir(folder) else folder
    doc = json.load(open(path))
    doc.pop("manifest_hash")
    doc["image_ids"] = doc["image_ids"] + doc["image_ids"][:1]
    doc["num_images"] = len(doc["image_ids"])
    doc["manifest_hash"] = canonical_hash({k: v for k, v in doc.items() if k != "manifest_hash"})
    json.dump(doc, open(path, "w"))
    with pytest.raises(ValueError, match=r"image ids listed more than once"):
        load_manifest(path)
    with pytest.raises(ValueError, match=r"image ids listed more than once"):
        preprocess(PreprocessSettings(workers=0), folder, str(tmp_path / "s"), progress=False)
