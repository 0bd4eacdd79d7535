"""The pipeline's datasets as MLflow datasets: what the run table's Dataset column shows and
``search_runs(filter_string="dataset.digest = '...'")`` finds.

Two kinds, both described from files the stages already write (nothing is re-read or hashed
again here):

- a **subset** (``panoptic subset``'s manifest): source = the COCO dataset's URI, digest = the
  manifest hash, profile = image and category counts;
- its **shards** (``panoptic preprocess``'s index): source = the shard folder, digest = the
  hash over the shards' hashes, profile = rows, shards, quarantined images.

A digest is the first ``DIGEST_CHARS`` hex characters of the hash (MLflow's SQL stores keep 36
characters); the full hash is in the profile. Names are stable (``train2017 subset``,
``train2017 shards``) so that the same data logged by several stages is one dataset in MLflow.
This module imports MLflow at the top: import it only where MLflow is used.
"""

from __future__ import annotations

import json
import os
import warnings

from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.entities import DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from components.common.manifests import subset_profile

DIGEST_CHARS = 32
TRAINING, VALIDATION = "training", "validation"


def digest_of(full_hash: str) -> str:
    """The digest MLflow stores (and ``search_runs`` filters on) for one of our hashes."""
    return full_hash[:DIGEST_CHARS]


def dataset_source(uri: str):
    """An MLflow dataset source for a local path (made absolute) or a remote URI (``s3://``...)."""
    if "://" not in uri or uri.startswith("file://"):
        uri = os.path.abspath(uri.removeprefix("file://"))
    with warnings.catch_warnings():  # several registered sources may claim a URI: the first is right
        warnings.simplefilter("ignore")
        return resolve_dataset_source(uri)


class PanopticDataset(Dataset):
    """A dataset known by its source, a content hash and counts; the data stays where it is."""

    def __init__(self, source_uri: str, name: str, full_hash: str, profile: dict):
        self._profile = {**profile, "hash": full_hash}
        super().__init__(source=dataset_source(source_uri), name=name, digest=digest_of(full_hash))

    def _compute_digest(self) -> str:  # always given; required by the base class
        return digest_of(self._profile["hash"])

    @property
    def profile(self) -> dict:
        return self._profile

    @property
    def schema(self):
        return None

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile, sort_keys=True)}


def subset_dataset(manifest: dict) -> PanopticDataset:
    src = manifest["source"]
    return PanopticDataset(src["root"], f"{src['split']} subset", manifest["manifest_hash"], subset_profile(manifest))


def subset_dataset_of_index(index: dict) -> PanopticDataset:
    """The subset a shard folder was made from, described from its index."""
    profile = index.get("source_profile") or {"images": int(index.get("images_in", 0)),
                                              "split": index["source"]["split"]}
    return PanopticDataset(index["source"]["root"], f"{index['source']['split']} subset",
                           index["source_manifest_hash"], profile)


def shards_dataset(index: dict, shards_uri: str) -> PanopticDataset:
    from components.common.hashing import shard_hash

    profile = {"rows": int(index["rows_written"]), "shards": len(index["shards"]),
               "quarantined": int(index.get("quarantined", 0)), "source_manifest_hash": index["source_manifest_hash"]}
    return PanopticDataset(shards_uri, f"{index['source']['split']} shards", shard_hash(index), profile)


def log_datasets(ml, datasets: list[tuple[PanopticDataset, str]]) -> None:
    """Log ``(dataset, context)`` pairs as inputs of the active run."""
    for dataset, context in datasets:
        ml.log_input(dataset, context=context)


def log_datasets_to(client, run_id: str, datasets: list[tuple[PanopticDataset, str]]) -> None:
    """Log ``(dataset, context)`` pairs as inputs of ``run_id`` (a run that is not active here)."""
    client.log_inputs(run_id, datasets=[DatasetInput(d._to_mlflow_entity(),
                                                     tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
                                        for d, context in datasets])
