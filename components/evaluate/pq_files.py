"""PQ of prediction files (`panoptic pq`): panopticapi's numbers, as fast as the best tool.

Both JSONs are read and checked here first (structure, file names that stay in their folders,
a prediction for every image), so a bad input is a named error whichever engine scores it.
Local files are then scored by hotcoco's Rust engine (every core; tested equal to panopticapi
to 1e-9 on our prediction sets); S3 inputs, or a machine without hotcoco, by our numpy engine
(``components/evaluate/pq.py``, the one ``panoptic evaluate`` accumulates in memory) with a
process per core. This module imports little: the time a user waits is mostly scoring.
"""

from __future__ import annotations

import json
import os

from components.common.filenames import file_name_problem


class PredictionError(ValueError):
    """A prediction set that cannot be scored; the message names the image and the fix."""


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


def engine(gt_json: str, pred_json: str, gt_dir: str | None, pred_dir: str | None) -> str:
    """"hotcoco" for local files when it is installed, else "numpy"."""
    if all(_local(u) for u in (gt_json, pred_json, gt_dir, pred_dir)):
        try:
            import hotcoco.panoptic  # noqa: F401
            return "hotcoco"
        except ImportError:
            pass
    return "numpy"


def pq_files(gt_json: str, pred_json: str, gt_dir: str | None = None, pred_dir: str | None = None,
             workers: int | None = None, progress: bool = False, use: str | None = None) -> dict:
    """PQ of a prediction set on files: ``pq_compute``'s inputs and result shape (per_class
    entries also carry tp, fp, fn). ``workers``: processes of the numpy engine (None: one per
    core); ``use`` forces an engine ("hotcoco" or "numpy")."""
    gt_dir = gt_dir or gt_json[: -len(".json")]
    pred_dir = pred_dir or pred_json[: -len(".json")]
    gt, pred = read_json(gt_json, "ground-truth", gt=True), read_json(pred_json, "prediction", gt=False)
    match_annotations(gt, pred)
    chosen = use or engine(gt_json, pred_json, gt_dir, pred_dir)
    for folder, what in ((gt_dir, "ground-truth"), (pred_dir, "prediction")):
        if _local(folder) and not os.path.isdir(folder.removeprefix("file://")):
            raise PredictionError(f"{folder}: the {what} PNG folder does not exist")
    if chosen == "numpy":
        from components.evaluate.pq import pq_compute_docs

        return pq_compute_docs(gt, pred, gt_dir, pred_dir, workers=workers or os.cpu_count() or 1, progress=progress)
    from hotcoco import panoptic

    try:
        ev = panoptic.PanopticEval(gt_json, pred_json, gt_folder=gt_dir, pred_folder=pred_dir)
        ev.evaluate()
        res = ev.results()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # hotcoco's errors, a Rust panic included: name them, do not crash
        raise PredictionError(f"{pred_json}: {' '.join(str(e).split())[:500]}") from None
    per_class = {}
    for cat, r in res["per_class"].items():
        r = {k: r[k] for k in ("pq", "sq", "rq", "tp", "fp", "fn")}
        if not present(r):  # hotcoco marks a category in neither set -1 (pycocotools' way); panopticapi 0
            r.update(pq=0.0, sq=0.0, rq=0.0)
        per_class[int(cat)] = r
    return {**{k: res[k] for k in ("All", "Things", "Stuff")}, "per_class": per_class}


def present(r: dict) -> bool:
    """Whether a category occurs in the ground truth or the predictions (a per_class entry)."""
    return r.get("tp", 1) + r.get("fp", 0) + r.get("fn", 0) > 0


PER_CLASS_TABLE = "evaluate/per_class_table.json"   # an MLflow table artifact (the UI shows it as a table)


def per_class_table(results: dict, categories: list[dict]) -> dict[str, list]:
    """Per-category results as columns for ``mlflow.log_table``, in category id order (PQ/SQ/RQ
    in points). A category in neither the ground truth nor the predictions has empty PQ/SQ/RQ
    and ``present`` false (panopticapi counts it as 0, which is not a measurement)."""
    names = {int(c["id"]): c for c in categories}
    cols: dict[str, list] = {k: [] for k in ("category_id", "name", "kind", "PQ", "SQ", "RQ", "TP", "FP", "FN",
                                            "present")}
    for cid, r in sorted(((int(k), v) for k, v in results["per_class"].items())):
        seen = present(r)
        cols["category_id"].append(cid)
        cols["name"].append(names.get(cid, {}).get("name", str(cid)))
        cols["kind"].append("thing" if names.get(cid, {}).get("isthing") else "stuff")
        for k in ("PQ", "SQ", "RQ"):
            cols[k].append(round(100 * r[k.lower()], 3) if seen else None)
        for k in ("TP", "FP", "FN"):
            cols[k].append(int(r.get(k.lower(), 0)))
        cols["present"].append(seen)
    return cols


def format_table(results: dict, categories: dict[int, dict] | None = None) -> str:
    """The PQ table; with ``categories``, a row per category too, best first, the categories in
    neither set last and marked "not present" (panopticapi reports them as PQ 0)."""
    lines = [f"{'':10s}|{'PQ':>8s}{'SQ':>8s}{'RQ':>8s}{'N':>6s}", "-" * 40]
    for name in ("All", "Things", "Stuff"):
        r = results[name]
        lines.append(f"{name:10s}|{100 * r['pq']:8.2f}{100 * r['sq']:8.2f}{100 * r['rq']:8.2f}{r['n']:6d}")
    if categories:
        lines += ["", f"{'category':24s}{'PQ':>8s}{'SQ':>8s}{'RQ':>8s}{'TP':>6s}{'FP':>6s}{'FN':>6s}"]
        rows = sorted(results["per_class"].items(), key=lambda kv: (not present(kv[1]), -kv[1]["pq"], int(kv[0])))
        for cat, r in rows:
            name = categories.get(int(cat), {}).get("name", str(cat))[:23]
            if present(r):
                lines.append(f"{name:24s}{100 * r['pq']:8.2f}{100 * r['sq']:8.2f}{100 * r['rq']:8.2f}"
                             f"{r.get('tp', ''):>6}{r.get('fp', ''):>6}{r.get('fn', ''):>6}")
            else:
                lines.append(f"{name:24s}{'not present':>24s}")
    return "\n".join(lines)
