"""Augmentation (components/data/augment.py): every augmented sample is a valid panoptic target,
copy-paste follows its occlusion rules, and a seed gives the same samples every time."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from components.common.coco_panoptic import IGNORE_LABEL, Category, CategoryMaps
from components.data.augment import augment, copy_paste, large_scale_jitter
from components.data.reader import ShardDataset
from components.data.records import load_index
from components.data.targets import build_targets, decode_record
from components.model.config import InputConfig
from tests.training import make_shards

LSJ_PASTE = InputConfig(min_size_train=(96, 128), max_size_train=192, lsj_size=160, lsj_scale=(0.3, 2.0),
                        copy_paste_prob=1.0, flip_prob=0.5)


@pytest.fixture(scope="module")
def shards(synth_root, tmp_path_factory):
    return make_shards(synth_root, str(tmp_path_factory.mktemp("aug")))


@pytest.fixture(scope="module")
def records(shards):
    ds = ShardDataset(shards, CategoryMaps.from_json(load_index(shards)["categories"]), train=False, raw=True)
    return list(ds)


def _cats(shards) -> CategoryMaps:
    return CategoryMaps.from_json(load_index(shards)["categories"])


def check_sample(image, index, segments, cats: CategoryMaps):
    """Everything a panoptic training target must satisfy, from the index map and the targets."""
    assert image.shape[:2] == index.shape and image.dtype == np.uint8
    assert index.min() >= -1 and index.max() < len(segments)
    counts = np.bincount(index[index >= 0].ravel(), minlength=len(segments))
    for k, s in enumerate(segments):  # areas recomputed; no segment without pixels
        assert s["area"] == counts[k] > 0, (k, s, counts[k])
    assert len({s["id"] for s in segments}) == len(segments)
    t = build_targets(index, segments, cats)
    masks = t["masks"].numpy().astype(bool)
    assert (masks.sum(0) <= 1).all()  # no pixel claimed twice
    for m, (x0, y0, x1, y1) in zip(masks, t["boxes"].tolist()):
        ys, xs = np.nonzero(m)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)  # each mask inside its box, tight
    sem = t["sem_seg"].numpy()
    things = masks.any(0)
    assert (sem[things] == 0).all()   # the semantic map says "thing" wherever an instance is
    crowd = np.zeros_like(things)
    for k, s in enumerate(segments):
        if s.get("iscrowd") and cats.is_thing(int(s["category_id"])):
            crowd |= index == k
    assert ((sem == 0) == (things | crowd)).all()   # ... and nowhere else
    for k, s in enumerate(segments):
        if not cats.is_thing(int(s["category_id"])):
            assert (sem[index == k] == cats.semantic_id(int(s["category_id"]))).all()
    assert (sem[index == -1] == IGNORE_LABEL).all()
    return t


def test_every_augmented_sample_is_a_valid_panoptic_target(shards, records):
    cats = _cats(shards)
    pasted = 0
    for i, record in enumerate(records):
        for seed in range(3):
            rng = np.random.default_rng([seed, i])
            donor = decode_record(records[(i + 1 + seed) % len(records)])
            image, index, segments = augment(decode_record(record), LSJ_PASTE, cats, rng, donor)
            assert max(index.shape) <= LSJ_PASTE.lsj_size
            check_sample(image, index, segments, cats)
            pasted += sum(1 for s in segments if int(s["id"]) > max(int(x["id"]) for x in record["segments_info"]))
    assert pasted > len(records)   # copy-paste did paste


def test_lsj_scales_within_the_range_and_crops_to_the_fixed_size(shards, records):
    cats = _cats(shards)
    image, index, segments = decode_record(records[0])
    for seed in range(20):
        out = large_scale_jitter((image, index, segments), 128, (0.1, 2.0), np.random.default_rng(seed))
        oh, ow = out[1].shape
        assert oh <= 128 and ow <= 128   # cropped to the fixed size (the batch pads a smaller one)
        assert max(oh, ow) >= min(128, round(0.1 * 128)) - 1
        check_sample(out[0], *_dense(out[1], out[2]), cats)


def _dense(index, segments):
    """Segments cut away by a crop: drop them, as augment does through copy_paste/_with_areas."""
    from components.data.augment import _with_areas

    _, index, segments = _with_areas(None, index, segments)
    return index, segments


def _scene(cats_spec):
    """A hand-made 10x10 scene: stuff 1 everywhere, thing A (id 1) at rows 2-5 x cols 2-5."""
    cats = CategoryMaps(tuple(Category(id=i, name=n, isthing=t) for i, n, t in cats_spec))
    image = np.zeros((10, 10, 3), np.uint8)
    index = np.zeros((10, 10), np.int64)
    index[2:6, 2:6] = 1
    segments = [{"id": 10, "category_id": 100, "iscrowd": 0}, {"id": 11, "category_id": 1, "iscrowd": 0}]
    return cats, (image, index, segments)


CATS = [(1, "thing", True), (2, "other", True), (100, "stuff", False), (101, "sky", False)]


def test_copy_paste_occludes_drops_mostly_hidden_instances_and_erases_covered_stuff():
    cats, target = _scene(CATS)
    donor_index = np.full((10, 10), 0, np.int64)   # donor: sky everywhere, a thing over rows 1-5, cols 1-5
    donor_index[1:6, 1:6] = 1
    donor_image = np.full((10, 10, 3), 200, np.uint8)
    donor = (donor_image, donor_index, [{"id": 1, "category_id": 101, "iscrowd": 0},
                                        {"id": 2, "category_id": 2, "iscrowd": 0}])
    image, index, segments = copy_paste(target, donor, cats, np.random.default_rng(0), min_visible=0.3,
                                        min_pixels=1, offset=(0, 0))
    # thing A (16 px) is fully covered: gone; the pasted thing owns its 25 pixels; sky was not pasted
    assert [s["category_id"] for s in segments] == [100, 2]
    assert segments[1]["area"] == 25 and (image[1:6, 1:6] == 200).all() and (image[0] == 0).all()
    check_sample(image, index, segments, cats)

    # partly covered: A keeps 16 - 9 = 7 of 16 pixels (44 % >= 30 %): kept, its area updated
    donor_index2 = np.full((10, 10), -1, np.int64)
    donor_index2[0:5, 0:5] = 1
    image, index, segments = copy_paste(target, (donor_image, donor_index2, donor[2]), cats,
                                        np.random.default_rng(0), min_visible=0.3, min_pixels=1, offset=(0, 0))
    assert [(s["category_id"], s["area"]) for s in segments] == [(100, 100 - 16 - 25 + 9), (1, 7), (2, 25)]
    check_sample(image, index, segments, cats)
    # with min_visible 0.5 it is dropped and its 7 pixels become VOID (nobody's)
    image, index, segments = copy_paste(target, (donor_image, donor_index2, donor[2]), cats,
                                        np.random.default_rng(0), min_visible=0.5, min_pixels=1, offset=(0, 0))
    assert [s["category_id"] for s in segments] == [100, 2] and (index == -1).sum() == 7
    check_sample(image, index, segments, cats)

    # a stuff region entirely under pasted things disappears
    cats2, (image0, index0, segs0) = _scene(CATS)
    index0 = np.where(index0 == 1, 0, 1)     # stuff 100 = the 4x4 block, thing A elsewhere
    donor_index3 = np.full((10, 10), -1, np.int64)
    donor_index3[2:6, 2:6] = 1
    _, index, segments = copy_paste((image0, index0, segs0), (donor_image, donor_index3, donor[2]), cats2,
                                    np.random.default_rng(0), min_pixels=1, offset=(0, 0))
    assert 100 not in [s["category_id"] for s in segments]
    check_sample(image0, index, segments, cats2)


def test_copy_paste_never_pastes_crowds_or_stuff():
    cats, target = _scene(CATS)
    donor_index = np.zeros((10, 10), np.int64)
    donor_index[0:3] = 1
    donor = (np.full((10, 10, 3), 9, np.uint8), donor_index, [{"id": 1, "category_id": 101, "iscrowd": 0},
                                                              {"id": 2, "category_id": 2, "iscrowd": 1}])
    image, index, segments = copy_paste(target, donor, cats, np.random.default_rng(0), offset=(0, 0))
    assert [s["category_id"] for s in segments] == [100, 1] and not (image == 9).any()


def _samples(shards, cfg: InputConfig, seed: int, n: int = 6) -> list[dict]:
    ds = ShardDataset(shards, _cats(shards), cfg, train=True, shuffle_buffer=8, seed=seed, infinite=True)
    out = []
    for s in ds:
        out.append(s)
        if len(out) == n:
            return out


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(x["image_id"] == y["image_id"] and all(torch.equal(x[k], y[k]) for k in
                                                        ("image", "sem_seg", "boxes", "labels", "masks"))
               for x, y in zip(a, b))


def test_augmentation_is_deterministic_per_seed_and_resumes_identically(shards):
    a, b = _samples(shards, LSJ_PASTE, 3), _samples(shards, LSJ_PASTE, 3)
    assert _same(a, b)
    assert not _same(a, _samples(shards, LSJ_PASTE, 4))
    ds = ShardDataset(shards, _cats(shards), LSJ_PASTE, train=True, shuffle_buffer=8, seed=3, infinite=True)
    ds.resume_after(2, 2)   # a resumed run: skips 4 samples, then sees the same ones (donors included)
    it = iter(ds)
    assert _same([next(it), next(it)], a[4:6])
    for s in a:
        assert s["masks"].shape[0] == s["boxes"].shape[0] == s["labels"].shape[0]


def test_without_lsj_and_copy_paste_the_recipe_is_detectrons(shards, records):
    """Off, the new options change nothing: the same draws, the same samples as the plain recipe."""
    plain = InputConfig(min_size_train=(96, 128), max_size_train=192)
    off = dataclasses.replace(plain, lsj_scale=(0.5, 1.0), copy_paste_max_instances=3)
    assert _same(_samples(shards, plain, 0), _samples(shards, off, 0))
