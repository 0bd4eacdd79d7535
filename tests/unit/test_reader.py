import os
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from components.common.coco_panoptic import load_split
from components.data.reader import ShardDataset, ShardError, collate
from components.data.transforms import output_shape, resize_nearest
from components.model.config import InputConfig
from components.preprocess.core import PreprocessSettings, preprocess
from components.select_subset.core import SplitSettings, select_subset

TINY = InputConfig(min_size_train=(96, 128), max_size_train=192, min_size_test=128, max_size_test=192)


@pytest.fixture(scope="module")
def shards(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    m = select_subset(SplitSettings(), synth_root, "train2017", str(out / "subset")).manifest_uri
    preprocess(PreprocessSettings(shard_images=5, row_group_images=2, workers=0), m, str(out / "s"), progress=False)
    return str(out / "s"), load_split(synth_root, "train2017")


def _ids(ds, workers):
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    return [r["image_id"] for r in loader]


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 2), (4, 3)])
def test_ranks_and_workers_cover_every_row_exactly_once(shards, world, workers):
    uri, data = shards
    seen = []
    for rank in range(world):
        ds = ShardDataset(uri, data.categories, train=True, rank=rank, world_size=world, raw=True, seed=1)
        seen += _ids(ds, workers)
    assert Counter(seen) == Counter(sorted(data.annotations))  # 16 rows, each once


def test_row_level_split_when_fewer_row_groups_than_readers(shards):
    uri, data = shards
    seen = []
    for rank in range(6):  # 6 ranks x 2 workers = 12 readers > 8 row groups
        seen += _ids(ShardDataset(uri, data.categories, train=False, rank=rank, world_size=6, raw=True), 2)
    assert sorted(seen) == sorted(data.annotations)


def test_shuffle_is_seeded_and_epochs_differ(shards):
    uri, data = shards
    a = _ids(ShardDataset(uri, data.categories, raw=True, seed=3), 0)
    b = _ids(ShardDataset(uri, data.categories, raw=True, seed=3), 0)
    c = _ids(ShardDataset(uri, data.categories, raw=True, seed=4), 0)
    assert a == b and a != c and sorted(a) == sorted(c)
    ds = ShardDataset(uri, data.categories, raw=True, seed=3, infinite=True)
    it = iter(ds)
    two_epochs = [next(it)["image_id"] for _ in range(32)]
    assert two_epochs[:16] == a and sorted(two_epochs[16:]) == sorted(a) and two_epochs[16:] != a


def test_skip_resumes_the_same_stream(shards):
    uri, data = shards
    full = [s["image_id"] for s in ShardDataset(uri, data.categories, TINY, seed=2)]
    ds = ShardDataset(uri, data.categories, TINY, seed=2)
    ds.skip = 5
    rest = list(ds)
    assert [s["image_id"] for s in rest] == full[5:]
    again = list(ShardDataset(uri, data.categories, TINY, seed=2))[5:]
    for x, y in zip(rest, again):  # augmentation too is identical after a skip
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["masks"], y["masks"])


def test_targets_match_the_panoptic_png(shards):
    uri, data = shards
    cats = data.categories
    for s in ShardDataset(uri, cats, TINY, train=False, with_gt=True):   # evaluation: the image and the GT only
        assert not {"sem_seg", "boxes", "labels", "masks"} & set(s) and s["gt_ids"].shape == (s["height"], s["width"])
    fixed = InputConfig(min_size_train=(TINY.min_size_test,), max_size_train=TINY.max_size_test, flip_prob=0.0)
    for s in ShardDataset(uri, cats, fixed, train=True, with_gt=True, shuffle_buffer=0):   # the test resize, trained
        h, w = s["image"].shape[1:]
        assert min(h, w) == 128 or max(h, w) == 192
        segs = {seg["id"]: seg for seg in s["segments_info"]}
        # semantic target = nearest-resized GT: stuff -> 1..S, things -> 0, VOID -> 255
        idx = resize_nearest(s["gt_ids"], h, w)
        expected = np.full((h, w), 255, np.uint8)
        for seg_id, seg in segs.items():
            expected[idx == seg_id] = cats.semantic_id(seg["category_id"])
        assert np.array_equal(s["sem_seg"].numpy(), expected)
        inst = [seg for seg in segs.values() if cats.is_thing(seg["category_id"]) and not seg["iscrowd"]
                and (idx == seg["id"]).any()]
        assert len(s["labels"]) == len(inst) == len(s["masks"]) == len(s["boxes"])
        for m, box in zip(s["masks"], s["boxes"]):
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert all(0 <= int(label) < cats.num_things for label in s["labels"])


def test_train_augmentation_sizes_and_flip(shards):
    uri, data = shards
    ds = ShardDataset(uri, data.categories, InputConfig(min_size_train=(64,), max_size_train=1000, flip_prob=1.0))
    s = next(iter(ds))
    assert min(s["image"].shape[1:]) == 64
    noflip = next(iter(ShardDataset(uri, data.categories, InputConfig(min_size_train=(64,), max_size_train=1000,
                                                                  flip_prob=0.0))))
    assert torch.equal(s["sem_seg"], noflip["sem_seg"].flip(-1))


def test_output_shape_is_detectrons():
    assert output_shape(480, 640, 800, 1333) == (800, 1067)
    assert output_shape(640, 480, 800, 1333) == (1067, 800)
    assert output_shape(300, 1000, 800, 1333) == (400, 1333)


def test_truncated_shard_gives_a_clear_error(shards, tmp_path):
    import shutil
    uri, data = shards
    bad = tmp_path / "s"
    shutil.copytree(uri, bad)
    raw = (bad / "part-00001.parquet").read_bytes()
    (bad / "part-00001.parquet").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ShardError, match=r"part-00001.parquet: .* truncated .*re-run `panoptic preprocess`"):
        ShardDataset(str(bad), data.categories)
    os.remove(bad / "part-00001.parquet")
    with pytest.raises(ShardError, match="part-00001.parquet: shard listed in index.json is missing"):
        ShardDataset(str(bad), data.categories)


def test_batches_through_a_dataloader(shards):
    uri, data = shards
    loader = DataLoader(ShardDataset(uri, data.categories, TINY), batch_size=4, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert sum(len(b) for b in batches) == 16 and all(isinstance(b, list) for b in batches)


def test_an_image_without_thing_instances_gets_empty_instance_targets():
    """Stuff only, or only crowds (or an LSJ crop that left no instance): no boxes, no masks, and
    the empty mask stack has the image's size (the trainer's loader crashed here once)."""
    from components.common.coco_panoptic import Category, CategoryMaps
    from components.data.targets import build_targets

    cats = CategoryMaps((Category(1, "disc", True, (1, 1, 1), "x"), Category(92, "sky", False, (2, 2, 2), "x")))
    seg = np.zeros((5, 7), np.int64)
    seg[0, :] = 1
    segments = [{"id": 1, "category_id": 92, "iscrowd": 0}, {"id": 2, "category_id": 1, "iscrowd": 1}]
    t = build_targets(seg, segments, cats)
    assert t["masks"].shape == (0, 5, 7) and t["masks"].dtype == torch.uint8
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)


def test_an_image_with_ten_thousand_instances_is_trained_on_its_largest_ones(caplog):
    """input.max_instances bounds what one image costs: of 10,000 thing instances the 500 largest
    become targets (in their order), the rest are dropped, and the log says so naming the image."""
    import logging

    from components.common.coco_panoptic import Category, CategoryMaps
    from components.data.targets import build_targets
    from components.model.config import InputConfig

    cats = CategoryMaps((Category(1, "disc", True, (1, 1, 1), "x"), Category(92, "sky", False, (2, 2, 2), "x")))
    seg = np.arange(200 * 200, dtype=np.int64).reshape(200, 200) // 4     # 10,000 segments of 4 pixels
    seg[:20, :] = np.arange(20 * 200).reshape(20, 200) % 7 + 9000   # 9000..9006 grow larger; 0..999 are gone
    segments = [{"id": k + 1, "category_id": 1, "iscrowd": 0} for k in range(10_000)]
    with caplog.at_level(logging.WARNING, logger="components.data.targets"):
        t = build_targets(seg, segments, cats, InputConfig().max_instances, "crowded.jpg")
    assert t["masks"].shape == (500, 200, 200) and t["labels"].shape == (500,)
    areas = t["masks"].flatten(1).sum(1)
    assert (areas[-7:] > 4).all() and (areas[:-7] == 4).all()   # the seven large ones kept, in segment order
    assert "crowded.jpg: 9000 thing instances, more than input.max_instances=500" in caplog.text
    assert "the other 8500 dropped" in caplog.text
