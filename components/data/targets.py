"""Panoptic FPN targets from a shard record (augmented by ``augment.py``, as the config's ``input``
section, ``components/model/config.py: InputConfig``, asks)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from components.common.coco_panoptic import (
    IGNORE_LABEL,
    CategoryMaps,
    decode_image,
    decode_png,
    file_name_problem,
    segment_index_map,
)
from components.data.transforms import output_shape
from components.model.config import InputConfig

log = logging.getLogger(__name__)
_capped: set[str] = set()   # the images whose cap was said (once each per process, not once per epoch)


def build_targets(seg_index: np.ndarray, segments: list[dict], cats: CategoryMaps, max_instances: int | None = None,
                  name: str = "") -> dict:
    """Targets from an (H, W) map of indices into ``segments`` (-1 = VOID).

    ``max_instances``: more thing instances than this and only the largest that many are kept
    (``input.max_instances``), said in the log naming ``name``.

    Returns torch tensors: ``sem_seg`` (H, W) uint8 with 0 = things, 1..S = stuff, 255 = VOID;
    ``boxes`` (N, 4) XYXY float32, ``labels`` (N,) int64 contiguous thing ids, ``masks``
    (N, H, W) uint8 for non-crowd thing segments with pixels left (crowds are left out of
    the instance targets, as detectron2 does, but count as 'things' in ``sem_seg``).
    """
    h, w = seg_index.shape
    lut = np.full(len(segments) + 1, IGNORE_LABEL, np.uint8)  # last entry: VOID (index -1)
    for k, s in enumerate(segments):
        lut[k] = cats.semantic_id(int(s["category_id"]))
    sem = lut[seg_index]
    area = np.bincount(seg_index.ravel() + 1, minlength=len(segments) + 1)[1:]   # one pass, not one per segment
    things = [k for k, s in enumerate(segments)
              if area[k] and not s.get("iscrowd") and cats.is_thing(int(s["category_id"]))]
    if max_instances is not None and len(things) > max_instances:
        kept = sorted(sorted(things, key=lambda k: -int(area[k]))[:max_instances])
        if name not in _capped and len(_capped) < 10_000:
            _capped.add(name)
            log.warning("%s: %d thing instances, more than input.max_instances=%d: the %d largest are trained on, "
                        "the other %d dropped", name or "an image", len(things), max_instances, max_instances,
                        len(things) - max_instances)
        things = kept
    boxes, labels, masks = [], [], []
    for k in things:
        m = seg_index == k
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        labels.append(cats.thing_contiguous(int(segments[k]["category_id"])))
        masks.append(m)
    return {
        "sem_seg": torch.from_numpy(sem),
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": (torch.from_numpy(np.stack(masks).astype(np.uint8)) if masks else
                  torch.zeros((0, h, w), dtype=torch.uint8)),
    }


def _decode_pair(record: dict) -> tuple[str, np.ndarray, np.ndarray]:
    """(file name, image, panoptic id map) of a shard row, its name and sizes checked."""
    name = record["file_name"]
    problem = file_name_problem(name)
    if problem:  # a shard is a file too: its names must not steer writes (evaluate names PNGs after them)
        raise ValueError(f"{name!r}: {problem} (a shard row; re-run `panoptic preprocess`)")
    image = decode_image(record["image"], name)
    ids = decode_png(record["panoptic_png"], name)
    if ids.shape != image.shape[:2]:
        raise ValueError(f"{name}: panoptic PNG is {ids.shape} but the image is {image.shape[:2]}; re-run preprocess")
    return name, image, ids


def decode_record(record: dict, with_ids: bool = False):
    """A shard row -> (image, segment index map, segments), checked (``with_ids``: and the
    panoptic id map as decoded)."""
    _, image, ids = _decode_pair(record)
    segments = list(record["segments_info"])
    index = segment_index_map(ids, [s["id"] for s in segments])
    return (image, index, segments, ids) if with_ids else (image, index, segments)


def _eval_sample(record: dict, aug: InputConfig, with_gt: bool) -> dict:
    """An evaluation sample: the image at the test size and (``with_gt``) the ground truth as read,
    which is all inference and PQ use; no training targets, so no segment map, no resized mask."""
    from components.data.transforms import resize_image

    name, image, ids = _decode_pair(record)
    h, w = image.shape[:2]
    nh, nw = output_shape(h, w, aug.min_size_test, aug.max_size_test)
    sample = {"image_id": int(record["image_id"]), "file_name": name, "height": h, "width": w,
              "image": torch.from_numpy(np.ascontiguousarray(resize_image(image, nh, nw)).transpose(2, 0, 1).copy())}
    if with_gt:
        sample.update(gt_ids=ids, segments_info=list(record["segments_info"]), image_bytes=record["image"])
    return sample


def record_to_sample(record: dict, cats: CategoryMaps, aug: InputConfig, train: bool,
                     rng: np.random.Generator, with_gt: bool = False, donor: dict | None = None) -> dict:
    """Decode a shard row, augment it (train: ``augment.augment``, with ``donor``'s instances to
    paste when copy-paste is on) and build the model's inputs and targets; eval: the test resize of
    the image, and the ground truth when ``with_gt`` (``_eval_sample``)."""
    from components.data.augment import augment, resize

    if not train:
        return _eval_sample(record, aug, with_gt)
    image, index, segments, ids = decode_record(record, with_ids=True)
    h, w = image.shape[:2]
    if train:
        donor_sample = decode_record(donor) if donor is not None and aug.copy_paste_prob > 0 else None
        image, index, segments = augment((image, index, segments), aug, cats, rng, donor_sample)
    else:
        image, index = resize(image, index, *output_shape(h, w, aug.min_size_test, aug.max_size_test))
    sample = {
        "image_id": int(record["image_id"]),
        "file_name": record["file_name"],
        "height": h,
        "width": w,
        "image": torch.from_numpy(np.ascontiguousarray(image).transpose(2, 0, 1).copy()),
        **build_targets(np.ascontiguousarray(index), segments, cats, aug.max_instances, record["file_name"]),
    }
    if with_gt:
        sample["gt_ids"] = ids
        sample["segments_info"] = list(record["segments_info"])
        sample["image_bytes"] = record["image"]
    return sample
