"""Subset manifests: written by the subset stage, read by preprocess and the pipeline; and the
content hashes their lineage rests on."""

from __future__ import annotations

from components.common import storage
from components.common.hashing import canonical_hash


def load_manifest(uri: str) -> dict:
    """Read a manifest; ``uri`` may be the file or the folder holding ``manifest.json``."""
    uri, manifest = storage.read_json_doc(uri, "manifest.json", "manifest not found (run `panoptic subset` first)")
    claimed = manifest.pop("manifest_hash", None)
    if claimed != canonical_hash(manifest):
        raise ValueError(f"{uri}: manifest_hash does not match its content (edited by hand?); "
                         f"re-run `panoptic subset`")
    manifest["manifest_hash"] = claimed
    return manifest


def subset_profile(manifest: dict) -> dict:
    """Image and category counts of a subset (the shard index keeps a copy, so that every stage
    describes the subset exactly as the subset stage did)."""
    hist = manifest.get("category_histogram", {}).get("subset", {})
    return {"images": int(manifest["num_images"]), "categories": sum(1 for v in hist.values() if v),
            "split": manifest["source"]["split"], "strategy": manifest.get("strategy", "")}
