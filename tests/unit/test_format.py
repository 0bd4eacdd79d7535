import json
import os

import numpy as np
import pytest

from components.common import storage
from components.common.coco_panoptic import (
    IGNORE_LABEL,
    Category,
    CategoryMaps,
    bbox_of,
    decode_png,
    encode_png,
    id2rgb,
    load_split,
    rgb2id,
)
from components.synthetic.generator import CATEGORIES


def test_rgb_id_round_trip_covers_all_channels():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256**3, size=(37, 53), dtype=np.uint32)
    ids[0, 0], ids[0, 1] = 0, 256**3 - 1
    assert np.array_equal(rgb2id(id2rgb(ids)), ids)
    assert np.array_equal(decode_png(encode_png(ids)), ids)
    # R + 256 G + 256^2 B, as COCO defines it
    assert rgb2id(np.array([[[1, 2, 3]]], np.uint8))[0, 0] == 1 + 2 * 256 + 3 * 65536


def test_id2rgb_rejects_out_of_range():
    with pytest.raises(ValueError):
        id2rgb(np.array([[256**3]]))


def test_rgb2id_matches_panopticapi():
    from panopticapi.utils import id2rgb as ref_id2rgb
    from panopticapi.utils import rgb2id as ref_rgb2id
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 256**3, size=(20, 30))
    assert np.array_equal(id2rgb(ids), ref_id2rgb(ids).astype(np.uint8))
    assert np.array_equal(rgb2id(id2rgb(ids)), ref_rgb2id(id2rgb(ids)))


def test_decode_png_names_the_file_when_corrupt():
    with pytest.raises(ValueError, match="x.png: cannot decode"):
        decode_png(b"garbage", "x.png")


def test_bbox_is_inclusive_xywh():
    m = np.zeros((10, 10), bool)
    m[2:5, 3:9] = True
    assert bbox_of(m) == [3, 2, 6, 3]


def test_category_maps_contiguous_and_semantic():
    maps = CategoryMaps(CATEGORIES)
    assert maps.thing_ids == (1, 3, 18, 44, 62, 90)
    assert maps.stuff_ids == (92, 118, 149, 184, 200)
    assert [maps.thing_contiguous(c) for c in maps.thing_ids] == list(range(6))
    assert [maps.thing_from_contiguous(i) for i in range(6)] == list(maps.thing_ids)
    # semantic branch: 0 = all things, stuff -> 1..S (detectron2's convention)
    assert {maps.semantic_id(c) for c in maps.thing_ids} == {0}
    assert [maps.semantic_id(c) for c in maps.stuff_ids] == [1, 2, 3, 4, 5]
    assert [maps.stuff_from_semantic(s) for s in range(1, 6)] == list(maps.stuff_ids)
    assert maps.num_sem_classes == 6 and IGNORE_LABEL == 255
    with pytest.raises(ValueError):
        maps.stuff_from_semantic(0)
    assert CategoryMaps.from_json(maps.to_json()) == maps


def test_category_maps_reject_duplicates_and_void():
    with pytest.raises(ValueError, match="twice"):
        CategoryMaps((Category(1, "a", True), Category(1, "b", False)))
    with pytest.raises(ValueError, match="VOID"):
        CategoryMaps((Category(0, "a", True),))


def test_load_split_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="panoptic_train2017.json"):
        load_split(str(tmp_path), "train2017")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "panoptic_train2017.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_split(str(tmp_path), "train2017")
    (tmp_path / "annotations" / "panoptic_train2017.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="annotations: missing or not a list"):
        load_split(str(tmp_path), "train2017")
    doc = {"images": [{"id": 1, "file_name": "a.jpg", "height": "tall", "width": 10**12},
                      {"id": 1, "file_name": "b.jpg", "height": 4, "width": 4}],
           "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": [{"id": 2**40, "category_id": 1}]}],
           "categories": [{"id": 1, "name": "x", "isthing": 1}]}
    (tmp_path / "annotations" / "panoptic_train2017.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError) as e:
        load_split(str(tmp_path), "train2017")
    for what in ("4 problem(s)", "images[0] (id 1): height must be an integer", "images[0] (id 1): width",
                 "images[1]: image id 1 is listed twice", "annotations[0].segments_info[0]: needs an integer id"):
        assert what in str(e.value)


def test_storage_atomic_write_and_listing(tmp_path):
    uri = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    assert storage.listdir(str(tmp_path / "a")) == ["b.bin"]  # no temp file left behind
    assert storage.exists(uri) and not storage.exists(uri + "x")
    with pytest.raises(FileNotFoundError, match="no such file"):
        storage.read_bytes(uri + "x")
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        storage.resolve("gs://bucket/x")
    assert storage.join("s3://b/p/", "x", "y") == "s3://b/p/x/y"
    assert storage.resolve("file://" + uri)[1] == os.path.abspath(uri)


def test_index_map_and_run_stats_match_per_segment_masks():
    from components.common.coco_panoptic import segment_index_map, segment_stats
    rng = np.random.default_rng(5)
    ids = rng.choice(np.array([0, 7, 300000, 12, 99], np.uint32), size=(41, 57))
    ids[:5, :5] = 5  # an id nobody listed
    ids[10:20, 30:] = 12  # runs that end at the row end and restart on the next row
    listed = [12, 300000, 7, 99, 4242]  # 4242 has no pixel
    index = segment_index_map(ids, listed)
    assert (index[ids == 5] == -1).all() and (index[ids == 0] == -1).all()
    for k, seg_id in enumerate(listed):
        assert ((index == k) == (ids == seg_id)).all()
    present, areas, boxes = segment_stats(ids)
    assert present.tolist() == [0, 5, 7, 12, 99, 300000]
    for seg_id, area, box in zip(present.tolist(), areas.tolist(), boxes.tolist()):
        m = ids == seg_id
        assert area == m.sum() and box == bbox_of(m)
    # straight from the PNG's RGB (the byte-word comparison) and from a non-contiguous RGB view
    rgb = id2rgb(ids)
    for pixels in (rgb, np.concatenate([rgb, rgb[..., :1]], -1)[..., :3]):
        got = segment_stats(pixels)
        assert all(np.array_equal(a, b) for a, b in zip(got, (present, areas, boxes)))
    # one column and one row images: every pixel is its own row / one long run
    for shape in ((7, 1), (1, 9)):
        col = np.array([3, 3, 0, 3, 9, 9, 3, 3, 3][: max(shape)], np.uint32).reshape(shape)
        present, areas, boxes = segment_stats(col)
        assert all(np.array_equal(a, b) for a, b in zip(segment_stats(id2rgb(col)), (present, areas, boxes)))
        for seg_id, area, box in zip(present.tolist(), areas.tolist(), boxes.tolist()):
            assert area == (col == seg_id).sum() and box == bbox_of(col == seg_id)
