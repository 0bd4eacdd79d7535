"""Break a COCO panoptic split in one named way, for the validator and quarantine tests."""

from __future__ import annotations

import json
import os

import numpy as np

from components.common.coco_panoptic import decode_png, encode_png

KINDS = (
    "missing_image", "corrupt_image", "missing_png", "corrupt_png", "size_mismatch",
    "id_not_in_segments_info", "segment_not_in_png", "duplicate_segment_id", "unknown_category",
    "area_mismatch", "bbox_mismatch", "missing_annotation",
)


def _load(root, split):
    path = os.path.join(root, "annotations", f"panoptic_{split}.json")
    with open(path) as f:
        return path, json.load(f)


def corrupt(root: str, split: str, kind: str, index: int = 0) -> tuple[int, str]:
    """Break sample ``index`` of ``split`` in the way ``kind`` names. Returns (image_id, file)."""
    path, doc = _load(root, split)
    image = doc["images"][index]
    ann = next(a for a in doc["annotations"] if a["image_id"] == image["id"])
    img_file = os.path.join(root, split, image["file_name"])
    png_file = os.path.join(root, "annotations", f"panoptic_{split}", ann["file_name"])
    seg = ann["segments_info"][0]
    target = png_file
    if kind == "missing_image":
        os.remove(img_file)
        target = img_file
    elif kind == "corrupt_image":
        data = open(img_file, "rb").read()
        open(img_file, "wb").write(data[: len(data) // 3])  # a truncated JPEG
        target = img_file
    elif kind == "missing_png":
        os.remove(png_file)
    elif kind == "corrupt_png":
        open(png_file, "wb").write(b"\x89PNG\r\n\x1a\nnot really a png")
    elif kind == "size_mismatch":
        ids = decode_png(open(png_file, "rb").read())
        open(png_file, "wb").write(encode_png(ids[:-3, :]))
    elif kind == "id_not_in_segments_info":
        ann["segments_info"] = ann["segments_info"][1:]
    elif kind == "segment_not_in_png":
        ann["segments_info"].append({**seg, "id": 16777000})
    elif kind == "duplicate_segment_id":
        ann["segments_info"].append(dict(seg))
    elif kind == "unknown_category":
        seg["category_id"] = 7777
    elif kind == "area_mismatch":
        seg["area"] = seg["area"] + 5
    elif kind == "bbox_mismatch":
        seg["bbox"] = [seg["bbox"][0] + 1] + seg["bbox"][1:]
    elif kind == "missing_annotation":
        doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != image["id"]]
        target = img_file
    else:
        raise ValueError(kind)
    with open(path, "w") as f:
        json.dump(doc, f)
    return image["id"], target


def void_count(png_file: str) -> int:
    return int((decode_png(open(png_file, "rb").read()) == 0).sum())


__all__ = ["KINDS", "corrupt", "void_count", "np"]
