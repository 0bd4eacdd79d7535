"""COCO panoptic prediction (and ground-truth) JSONs as `panoptic pq` and the PQ engines read
them: parsed (orjson, bounded in depth), their structure checked (types, file names that stay in
their folders, unique segment ids), and matched image by image; a bad input is a
``PredictionError`` naming the file, the image and the fix, whichever engine scores it."""

from __future__ import annotations

import json

from components.common.filenames import file_name_problem
from components.common.pq import PredictionError  # noqa: F401  (raised here and by the PQ engines)


def _local(uri: str | None) -> bool:
    return uri is None or "://" not in uri or uri.startswith("file://")


def _loads(data: bytes):
    try:
        import orjson  # Rust: parses COCO-sized JSON ~1.5x faster than json, the time users wait
    except ImportError:
        return json.loads(data)
    return orjson.loads(data)


def _annotation_problems(doc: dict, gt: bool) -> list[str]:
    """The annotations' structure: written for speed (it runs before every `panoptic pq`)."""
    problems = []
    for i, a in enumerate(doc["annotations"]):
        segs = a.get("segments_info") if type(a) is dict else None
        image_id = a.get("image_id") if type(a) is dict else None
        if type(image_id) is not int or type(a.get("file_name")) is not str or type(segs) is not list:
            problems.append(f"annotations[{i}]: needs an integer image_id, a file_name and a segments_info list")
            continue
        name_problem = file_name_problem(a["file_name"])
        if name_problem:
            problems.append(f"annotations[{i}] (image {image_id}): file_name {a['file_name']!r}: {name_problem}")
        ids = set()
        for j, seg in enumerate(segs):
            sid = seg.get("id") if type(seg) is dict else None
            if type(sid) is not int or type(seg.get("category_id")) is not int or not 0 < sid < 256**3 or (
                    gt and (seg.get("iscrowd", 0) not in (0, 1) or type(seg.get("area")) not in (int, float))):
                problems.append(f"annotations[{i}].segments_info[{j}]: needs an integer id in 1..{256**3 - 1} "
                                f"and an integer category_id" + (", iscrowd and area" if gt else ""))
                break
            ids.add(sid)
        else:
            if len(ids) != len(segs):
                dup = sorted({s["id"] for s in segs if sum(t["id"] == s["id"] for t in segs) > 1})
                problems.append(f"in the image with ID {image_id} segment IDs {dup} are listed more than once in "
                                f"segments_info; segment ids must be unique within an image")
    return problems


def read_json(uri: str, what: str, gt: bool) -> dict:
    """A ground-truth or prediction JSON, its structure checked: a PredictionError names the file
    and each broken entry (the scoring then only meets well-formed entries)."""
    try:
        if _local(uri):
            with open(uri.removeprefix("file://"), "rb") as f:
                doc = _loads(f.read())
        else:
            from components.common import storage

            doc = _loads(storage.read_bytes(uri))
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: {what} file not found") from None
    except (ValueError, UnicodeDecodeError) as e:  # orjson's JSONDecodeError is a ValueError too
        raise PredictionError(f"{uri}: the {what} file is not valid JSON ({e})") from None
    if type(doc) is not dict or type(doc.get("annotations")) is not list:
        problems = ["needs an `annotations` list"]
    elif gt and type(doc.get("categories")) is not list:
        problems = ["needs a `categories` list"]
    else:
        problems = _annotation_problems(doc, gt)
        if gt and not all(type(c) is dict and type(c.get("id")) is int and c.get("isthing") in (0, 1, True, False)
                          for c in doc["categories"]):
            problems.append("categories: each needs an integer id and isthing 0 or 1")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise PredictionError(f"{uri}: the {what} JSON is malformed: {shown}")
    return doc


def match_annotations(gt_json: dict, pred_json: dict) -> list[tuple[dict, dict]]:
    """(ground truth, prediction) per image; every ground-truth image needs its prediction."""
    preds = {el["image_id"]: el for el in pred_json["annotations"]}
    pairs = []
    for gt_ann in gt_json["annotations"]:
        if gt_ann["image_id"] not in preds:
            raise PredictionError(f"no prediction for the image with id: {gt_ann['image_id']}")
        pairs.append((gt_ann, preds[gt_ann["image_id"]]))
    return pairs
