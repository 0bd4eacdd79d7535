"""PQ of prediction files (`panoptic pq`): panopticapi's numbers, as fast as the best tool.

Both JSONs are read and checked first (``prediction_files``), so a bad input is a named error
whichever engine scores it. Local files are then scored by hotcoco's Rust engine (every core;
tested equal to panopticapi to 1e-9 on our prediction sets); S3 inputs, or a machine without
hotcoco, by our numpy engine (``pq.PQStat``, the one ``panoptic evaluate`` accumulates in
memory) with a process per core. This module imports little: the time a user waits is mostly
scoring.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from components.common import storage
from components.common.coco_panoptic import decode_png, file_name_problem
from components.common.logs import progress as progress_bar
from components.common.pq import PQStat
from components.evaluate.prediction_files import PredictionError, _local, match_annotations, read_json
from components.evaluate.tables import present


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


def _read_png(folder: str, name: str, image_id, what: str) -> np.ndarray:
    problem = file_name_problem(name)
    if problem:  # never read outside the folder given
        raise PredictionError(f"In the image with ID {image_id} the {what} file_name {name!r}: {problem}.")
    uri = storage.join(folder, name)
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise PredictionError(f"In the image with ID {image_id} the {what} PNG {uri} does not exist.") from None
    try:
        return decode_png(data, uri)
    except ValueError as e:
        raise PredictionError(f"In the image with ID {image_id}: {e}") from None


def _score_chunk(args) -> PQStat:
    pairs, gt_dir, pred_dir, categories, progress = args
    stat = PQStat()
    for gt_ann, pred_ann in progress_bar(pairs, desc="pq", unit="img", enabled=progress):
        image_id = gt_ann["image_id"]
        gt = _read_png(gt_dir, gt_ann["file_name"], image_id, "ground-truth")
        pred = _read_png(pred_dir, pred_ann["file_name"], image_id, "prediction")
        stat.add_image(image_id, gt, gt_ann["segments_info"], pred, pred_ann["segments_info"], categories)
    return stat


def pq_compute(gt_json_file: str, pred_json_file: str, gt_folder: str | None = None, pred_folder: str | None = None,
               workers: int = 1, progress: bool = False) -> dict:
    """PQ of a prediction set with this module's engine; the same inputs and result shape as
    ``panopticapi.evaluation.pq_compute``. Files may be local or ``s3://``; folders default to
    the JSON path without ``.json``. ``workers`` > 1 scores chunks of images in that many
    processes. (`panoptic pq` goes through ``pq_files``, which picks the fastest engine.)"""
    gt = read_json(gt_json_file, "ground-truth", gt=True)
    pred = read_json(pred_json_file, "prediction", gt=False)
    return pq_compute_docs(gt, pred, gt_folder or gt_json_file[: -len(".json")],
                           pred_folder or pred_json_file[: -len(".json")], workers=workers, progress=progress)


def pq_compute_docs(gt_json: dict, pred_json: dict, gt_folder: str, pred_folder: str, workers: int = 1,
                    progress: bool = False) -> dict:
    """``pq_compute`` on JSON documents already read and checked (``pq_files.read_json``)."""
    categories = {el["id"]: el for el in gt_json["categories"]}
    pairs = match_annotations(gt_json, pred_json)
    stat = PQStat()
    if workers > 1 and len(pairs) > 1:
        chunks = [list(c) for c in np.array_split(np.arange(len(pairs)), workers) if len(c)]
        jobs = [([pairs[i] for i in c], gt_folder, pred_folder, categories, False) for c in chunks]
        with ProcessPoolExecutor(max_workers=len(jobs), mp_context=mp.get_context("fork")) as pool:
            for part in pool.map(_score_chunk, jobs):
                stat += part
    else:
        stat = _score_chunk((pairs, gt_folder, pred_folder, categories, progress))
    return stat.results(categories)
