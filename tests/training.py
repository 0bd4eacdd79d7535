"""Small training setups shared by the trainer tests."""

from __future__ import annotations

import io
import json
import os
import shutil

import torch

from components.common import storage
from components.model.config import load_config
from components.preprocess.core import PreprocessSettings, preprocess
from components.select_subset.core import SplitSettings, select_subset

MICRO = {
    "input": {"min_size_train": [128], "max_size_train": 192, "min_size_test": 128, "max_size_test": 192},
    "solver": {"ims_per_batch": 2, "reference_batch": 2, "max_iter": 6, "checkpoint_period": 100, "warmup_iters": 2,
               "steps": [4], "base_lr": 0.01},
    "data": {"num_workers": 0, "shuffle_buffer": 4},
    "log_period": 1,
}


# MICRO as train-settings overrides, without its max_iter (the settings' iterations say the length)
MICRO_OVERRIDES = {f"{section}.{k}": v for section, values in MICRO.items() if isinstance(values, dict)
                   for k, v in values.items() if k != "max_iter"}


def micro_config(**sections):
    over = json.loads(json.dumps(MICRO))
    for k, v in sections.items():
        over.setdefault(k, {}).update(v) if isinstance(v, dict) else over.__setitem__(k, v)
    return load_config("tiny", over)


def make_shards(root: str, out: str, split: str = "train2017", size=None) -> str:
    m = select_subset(SplitSettings(size=size), root, split, os.path.join(out, "subset")).manifest_uri
    preprocess(PreprocessSettings(shard_images=4, row_group_images=2, workers=0), m, os.path.join(out, "shards"),
               progress=False)
    return os.path.join(out, "shards")


def duplicate_image_split(root: str, dst: str, copies: int = 4) -> str:
    """A copy of ``root`` whose split 'dup2017' holds ``copies`` identical images (distinct ids)."""
    shutil.copytree(root, dst)
    doc = json.load(open(os.path.join(dst, "annotations", "panoptic_train2017.json")))
    image, ann = doc["images"][0], doc["annotations"][0]
    os.makedirs(os.path.join(dst, "dup2017"))
    os.makedirs(os.path.join(dst, "annotations", "panoptic_dup2017"))
    images, anns = [], []
    for k in range(copies):
        shutil.copy(os.path.join(dst, "train2017", image["file_name"]), os.path.join(dst, "dup2017", f"{k}.jpg"))
        shutil.copy(os.path.join(dst, "annotations", "panoptic_train2017", ann["file_name"]),
                    os.path.join(dst, "annotations", "panoptic_dup2017", f"{k}.png"))
        images.append({**image, "id": k + 1, "file_name": f"{k}.jpg"})
        anns.append({**ann, "image_id": k + 1, "file_name": f"{k}.png"})
    json.dump({**doc, "images": images, "annotations": anns},
              open(os.path.join(dst, "annotations", "panoptic_dup2017.json"), "w"))
    return dst


def load_state(model_uri: str) -> dict:
    return torch.load(io.BytesIO(storage.read_bytes(model_uri)), weights_only=False)["state_dict"]


def max_abs_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) if a[k].numel() else 0.0 for k in a)


def preprocess_step(*, data_uri: str, subset: dict, train_manifest: str, val_manifest: str, train_out: str,
                    val_out: str, settings: dict, run_id: str, mlflow_uri: str) -> None:
    """The preprocess and log-shards tasks as the DAG calls them: the subsets by their hashes."""
    from components.common.manifests import load_manifest
    from pipeline.steps import step_log_shards, step_preprocess

    step_preprocess(data_uri=data_uri, subset=subset,
                    train_manifest_hash=load_manifest(train_manifest)["manifest_hash"],
                    val_manifest_hash=load_manifest(val_manifest)["manifest_hash"], train_out=train_out,
                    val_out=val_out, settings=settings)
    step_log_shards(train_shards=train_out, val_shards=val_out, run_id=run_id, mlflow_uri=mlflow_uri)
