"""The record schema of the Parquet shards: one row per image."""

from __future__ import annotations

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


def load_index(uri: str) -> dict:
    """Read ``index.json``; ``uri`` may be the file or the shard folder."""
    uri, index = storage.read_json_doc(uri, "index.json", "shard index not found (run `panoptic preprocess` first)")
    if index.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{uri}: schema_version {index.get('schema_version')} but this code reads "
                         f"{SCHEMA_VERSION}; re-run `panoptic preprocess`")
    return index
