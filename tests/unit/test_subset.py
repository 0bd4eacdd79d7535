import json

import pytest

from components.common.manifests import load_manifest
from components.select_subset.core import SplitSettings, select_subset


def test_manifest_is_deterministic_and_hashed(synth_root, tmp_path):
    cfg = SplitSettings(size=10, strategy="random", seed=4)
    a = select_subset(cfg, synth_root, "train2017", str(tmp_path / "a"))
    select_subset(cfg, synth_root, "train2017", str(tmp_path / "b"))
    assert (tmp_path / "a/manifest.json").read_bytes() == (tmp_path / "b/manifest.json").read_bytes()
    assert (tmp_path / "a/category_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(a.image_ids) == 10 and a.image_ids == sorted(a.image_ids)
    m = load_manifest(str(tmp_path / "a"))
    assert m["seed"] == 4 and len(m["source"]["annotation_sha256"]) == 64 and m["manifest_hash"]
    c = select_subset(SplitSettings(size=10, seed=5), synth_root, "train2017", str(tmp_path / "c"))
    assert c.image_ids != a.image_ids


def test_manifest_tampering_is_detected(synth_root, tmp_path):
    select_subset(SplitSettings(size=5), synth_root, "train2017", str(tmp_path))
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["image_ids"][0] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="manifest_hash does not match"):
        load_manifest(str(tmp_path))


def test_fraction_and_too_many(synth_root, tmp_path):
    r = select_subset(SplitSettings(size=0.5), synth_root, "train2017", str(tmp_path))
    assert len(r.image_ids) == 8
    with pytest.raises(ValueError, match="asked for 17 images but only 16"):
        select_subset(SplitSettings(size=17), synth_root, "train2017", str(tmp_path))
    with pytest.raises(ValueError, match="unknown strategy"):
        SplitSettings(strategy="best")


def test_balanced_reaches_minimum_for_rare_categories(synth_root, tmp_path):
    full = select_subset(SplitSettings(), synth_root, "train2017", str(tmp_path / "full")).manifest
    hist = full["category_histogram"]["full"]
    rare = min((c for c in hist if hist[c] > 0), key=lambda c: hist[c])
    k = min(3, hist[rare])
    rnd = select_subset(SplitSettings(size=4, seed=0), synth_root, "train2017", str(tmp_path / "r")).manifest
    bal = select_subset(SplitSettings(size=4, seed=0, strategy="balanced", min_per_category=1),
                        synth_root, "train2017", str(tmp_path / "b")).manifest
    # every category present in the split appears at least once in a balanced subset of 4
    # (when 4 images can cover them all; the synthetic split can)
    covered = [c for c, v in bal["category_histogram"]["subset"].items() if v > 0]
    assert len(covered) >= len([c for c, v in rnd["category_histogram"]["subset"].items() if v > 0])
    bal2 = select_subset(SplitSettings(size=12, strategy="balanced", min_per_category=k),
                         synth_root, "train2017", str(tmp_path / "b2")).manifest
    assert all(v >= min(k, hist[c]) for c, v in bal2["category_histogram"]["subset"].items())


def test_filters(synth_root, tmp_path):
    crowded = select_subset(SplitSettings(crowded_only=True), synth_root, "train2017", str(tmp_path / "c")).manifest
    from components.common.coco_panoptic import load_split
    data = load_split(synth_root, "train2017")
    assert crowded["image_ids"] == [i for i in sorted(data.annotations)
                                    if any(s["iscrowd"] for s in data.annotations[i]["segments_info"])]
    inc = select_subset(SplitSettings(include_categories=("disc",)), synth_root, "train2017",
                        str(tmp_path / "i")).manifest
    assert all(any(s["category_id"] == 1 for s in data.annotations[i]["segments_info"]) for i in inc["image_ids"])
    exc = select_subset(SplitSettings(exclude_categories=(1,)), synth_root, "train2017", str(tmp_path / "e")).manifest
    assert set(exc["image_ids"]).isdisjoint(inc["image_ids"])
    assert len(exc["image_ids"]) + len(inc["image_ids"]) == 16
    seg = select_subset(SplitSettings(min_segments=5, max_segments=6), synth_root, "train2017",
                        str(tmp_path / "s")).manifest
    assert all(5 <= len(data.annotations[i]["segments_info"]) <= 6 for i in seg["image_ids"])
    with pytest.raises(ValueError, match="unknown category 'dragon'"):
        select_subset(SplitSettings(include_categories=("dragon",)), synth_root, "train2017", str(tmp_path / "x"))
