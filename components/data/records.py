"""The record schema of the Parquet shards: one row per image."""

from __future__ import annotations

import re

import pyarrow as pa

from components.common import storage

SCHEMA_VERSION = 1

SEGMENT = pa.struct([
    ("id", pa.int64()),
    ("category_id", pa.int32()),
    ("iscrowd", pa.int8()),
    ("area", pa.int64()),
    ("bbox", pa.list_(pa.float32(), 4)),
])

SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("file_name", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("image", pa.binary()),          # the original JPEG bytes (re-encoded only when resized)
    ("panoptic_png", pa.binary()),   # the COCO panoptic PNG bytes
    ("segments_info", pa.list_(SEGMENT)),
], metadata={b"panoptic.schema_version": str(SCHEMA_VERSION).encode()})

# Image bytes are already compressed; zstd only pays on the small columns.
COMPRESSION = {"image_id": "zstd", "file_name": "zstd", "height": "zstd", "width": "zstd",
               "image": "none", "panoptic_png": "none", "segments_info": "zstd"}


SHARD_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.parquet")   # a plain name in the shard folder


def load_index(uri: str) -> dict:
    """Read ``index.json``; ``uri`` may be the file or the shard folder. Its shard entries must
    name plain files of the folder (an edited index cannot point at other shards, the training
    set's say) with whole-number sizes and hex digests."""
    uri, index = storage.read_json_doc(uri, "index.json", "shard index not found (run `panoptic preprocess` first)")
    if not isinstance(index, dict) or index.get("schema_version") != SCHEMA_VERSION:
        version = index.get("schema_version") if isinstance(index, dict) else None
        raise ValueError(f"{uri}: schema_version {version} but this code reads {SCHEMA_VERSION}; re-run "
                         f"`panoptic preprocess`")
    problems = []
    if not isinstance(index.get("shards"), list):
        problems.append("shards: not a list")
    else:
        for i, s in enumerate(index["shards"]):
            if not isinstance(s, dict) or not isinstance(s.get("file"), str) or not SHARD_FILE.fullmatch(s["file"]):
                problems.append(f"shards[{i}]: file must be a plain *.parquet name of this folder, not "
                                f"{str(s.get('file') if isinstance(s, dict) else s)[:80]!r}")
            elif not all(isinstance(s.get(k), int) and not isinstance(s.get(k), bool) and s[k] >= 0
                         for k in ("bytes", "rows")) or not re.fullmatch(r"[0-9a-f]{64}", str(s.get("sha256"))):
                problems.append(f"shards[{i}] ({s['file']}): bytes and rows must be whole numbers, sha256 a hex digest")
    if not isinstance(index.get("categories"), list):
        problems.append("categories: not a list")
    if not isinstance(index.get("source_manifest_hash", ""), str):
        problems.append("source_manifest_hash: not a string")
    if problems:
        raise ValueError(f"{uri}: a broken shard index ({'; '.join(problems[:5])}); re-run `panoptic preprocess`")
    gate = index.get("quality_gate", {"passed": True})
    if not isinstance(gate, dict) or gate.get("passed") is not True:
        failure = gate.get("failure", "") if isinstance(gate, dict) else ""
        raise ValueError(f"{uri}: these shards failed preprocess's data-quality gate, so nothing may train or "
                         f"evaluate on them: {str(failure)[:500] or 'no reason recorded'}")
    return index


def shard_image_ids(shards_uri: str) -> list[int]:
    """The image ids of every row, in index order (the order evaluation reads them in)."""
    import pyarrow.parquet as pq

    index = load_index(shards_uri)
    folder = shards_uri if not shards_uri.endswith(".json") else storage.dirname(shards_uri)
    ids: list[int] = []
    for s in index["shards"]:
        fs, path = storage.resolve(storage.join(folder, s["file"]))
        with fs.open_input_file(path) as f:
            ids += pq.read_table(f, columns=["image_id"])["image_id"].to_pylist()
    return ids


