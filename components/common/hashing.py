"""Every digest the pipeline's lineage rests on, in one place: what each one is a digest of.

- ``sha256_bytes`` / ``file_digest``: a file's bytes (shards, model files: the gate checks an
  evaluation is of the very model it registers).
- ``canonical_hash``: a JSON document's canonical form (a subset manifest's ``manifest_hash``).
- ``shard_hash``: a shard set, from its shards' own digests (a training set's lineage).
- ``samples_digest``: exactly the validation samples an evaluation scored (the gate compares
  only evaluations whose digests are equal).
- ``code_version``: this code (package version + a hash of ``components/``' source).
- ``data_fingerprint``: what a trained model is a function of: data, config, code (``decide``
  skips a run whose fingerprint is the champion's).
"""

from __future__ import annotations

import hashlib
import json
import os


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(uri: str) -> str:
    """The sha256 of a (local or s3://) file's bytes."""
    from components.common import storage

    return sha256_bytes(storage.read_bytes(uri))


def canonical_hash(obj) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def shard_hash(index: dict) -> str:
    """One hash over the shards' own hashes: the lineage of a training set."""
    return sha256_bytes(json.dumps([s["sha256"] for s in index["shards"]]).encode())


def samples_digest(source_manifest_hash: str, image_ids: list[int]) -> str:
    """The identity of an evaluation's data: the subset it came from and exactly the images scored,
    in order. Two evaluations compare only when theirs are equal."""
    doc = {"manifest": source_manifest_hash, "images": [int(i) for i in image_ids]}
    return sha256_bytes(json.dumps(doc, separators=(",", ":")).encode())


def code_version() -> str:
    """This code's version: the package version and a hash of its source (``components/``: the
    stages, the model, the configs), so an edit shows even before it is committed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("panoptic-pipeline")
    except PackageNotFoundError:
        v = "0"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # components/
    h = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith((".py", ".yaml")):
                h.update(os.path.relpath(os.path.join(folder, name), root).encode())
                with open(os.path.join(folder, name), "rb") as f:
                    h.update(f.read())
    return f"{v}+src.{h.hexdigest()[:12]}"


def data_fingerprint(train_manifest_hash: str, config_fingerprint: str, code: str | None = None) -> str:
    """What a trained model is a function of: the training data, the config, the code."""
    doc = {"train_manifest": train_manifest_hash, "config": config_fingerprint, "code": code or code_version()}
    return sha256_bytes(json.dumps(doc, sort_keys=True).encode())
