"""COCO box AP and mask AP of the thing classes, beside PQ, from the same model outputs.

The detections are the model's instances (before panoptic fusion: every box above the test
score threshold, as detectron2's COCOEvaluator scores them); the ground truth is each thing
segment of the panoptic annotation as an instance (its pixels, its bbox and area from
segments_info, its ``iscrowd``), which is what COCO's instances annotations hold for the same
objects. Scored by hotcoco's COCOeval (a Rust port of pycocotools' algorithm; the tests check it
gives pycocotools' numbers on the files this stage writes).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

GT_FILE = "instances_val_gt.json"            # the thing segments as COCO instances
RESULTS_FILE = "coco_instances_results.json"  # the detections (detectron2's COCOEvaluator's name)
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")   # COCOeval.stats[0:6]
IOU_TYPES = (("box", "bbox"), ("mask", "segm"))


def metric_names() -> tuple[str, ...]:
    """The figures this module adds to metrics.json: ``AP_box``, ``AP50_box``, ... ``AP_mask`` ..."""
    return tuple(f"{k}_{kind}" for kind, _ in IOU_TYPES for k in AP_KEYS)


def _rles(masks: np.ndarray) -> list[dict]:
    from hotcoco import mask as rle

    if not len(masks):
        return []
    encoded = rle.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": list(r["size"]), "counts": r["counts"].decode("ascii") if isinstance(r["counts"], bytes)
             else r["counts"]} for r in encoded]


def detections(image_id: int, instances: dict, thing_ids: tuple) -> list[dict]:
    """One image's instances as COCO results: [x, y, w, h] boxes, scores, dataset category ids,
    RLE masks (the model's pasted masks at the image's size)."""
    boxes = instances["boxes"].detach().float().cpu().numpy()
    scores = instances["scores"].detach().float().cpu().numpy()
    classes = instances["classes"].detach().cpu().numpy()
    masks = instances["masks"].detach().cpu().numpy().astype(bool)
    out = []
    for (x1, y1, x2, y2), score, cls, seg in zip(boxes, scores, classes, _rles(masks)):
        out.append({"image_id": int(image_id), "category_id": int(thing_ids[int(cls)]),
                    "bbox": [round(float(x1), 3), round(float(y1), 3), round(float(x2 - x1), 3),
                             round(float(y2 - y1), 3)],
                    "score": round(float(score), 5), "segmentation": seg})
    return out


def ground_truth(image_id: int, gt_ids: np.ndarray, segments_info: list[dict], thing_ids: tuple) -> list[dict]:
    """One image's thing segments as COCO instance annotations (ids assigned when the whole set
    is put together, ``gt_document``)."""
    things = set(thing_ids)
    segments = [s for s in segments_info if int(s["category_id"]) in things]
    if not segments:
        return []
    masks = np.stack([gt_ids == int(s["id"]) for s in segments])
    return [{"image_id": int(image_id), "category_id": int(s["category_id"]), "iscrowd": int(s.get("iscrowd", 0)),
             "area": float(s.get("area", int(m.sum()))), "bbox": [float(v) for v in s["bbox"]], "segmentation": seg}
            for s, m, seg in zip(segments, masks, _rles(masks))]


def gt_document(images: list[dict], annotations: list[dict], categories: dict) -> dict:
    """The ground truth as a COCO instances JSON (the thing categories only)."""
    return {"images": images, "annotations": [{**a, "id": i + 1} for i, a in enumerate(annotations)],
            "categories": [{"id": int(c["id"]), "name": c["name"], "supercategory": c.get("supercategory", "")}
                           for c in categories.values() if c["isthing"]]}


def coco_ap(gt: dict, dets: list[dict]) -> dict[str, float | None]:
    """{``AP_box``, ``AP50_box`` ..., ``AP_mask`` ...} in 0..1 (None where COCOeval has no
    figure: no ground-truth instance of that size, or no thing category at all)."""
    import hotcoco

    out: dict[str, float | None] = dict.fromkeys(metric_names())
    if not gt["categories"] or not gt["annotations"]:
        return out
    coco_gt = hotcoco.COCO(gt)
    for kind, iou_type in IOU_TYPES:
        coco_dt = coco_gt.loadRes(dets) if dets else None
        if coco_dt is None:
            out.update({f"{k}_{kind}": 0.0 for k in AP_KEYS})
            continue
        ev = hotcoco.COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        with contextlib.redirect_stdout(io.StringIO()):   # its 12-line table: the figures are logged instead
            ev.summarize()
        for k, v in zip(AP_KEYS, ev.stats[:6]):
            v = float(v)
            out[f"{k}_{kind}"] = v if np.isfinite(v) and v >= 0 else None
    return out
