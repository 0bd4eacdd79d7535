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
    ids = manifest.get("image_ids")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{uri}: image_ids must be a list of whole numbers; re-run `panoptic subset`")
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})[:10]
        raise ValueError(f"{uri}: image ids listed more than once ({', '.join(map(str, twice))}): every image would "
                         f"count twice; re-run `panoptic subset`")
    if manifest.get("num_images", len(ids)) != len(ids):
        raise ValueError(f"{uri}: num_images {manifest.get('num_images')} but {len(ids)} image ids; re-run "
                         f"`panoptic subset`")
    return manifest


def subset_profile(manifest: dict) -> dict:
    """Image and category counts of a subset (the shard index keeps a copy, so that every stage
    describes the subset exactly as the subset stage did)."""
    hist = manifest.get("category_histogram", {}).get("subset", {})
    return {"images": int(manifest["num_images"]), "categories": sum(1 for v in hist.values() if v),
            "split": manifest["source"]["split"], "strategy": manifest.get("strategy", "")}
