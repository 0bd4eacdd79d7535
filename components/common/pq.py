"""Panoptic Quality, with exactly COCO panopticapi's numbers, computed faster.

The matching rules are panopticapi's (``pq_compute``):

* a GT and a predicted segment of the same category match when IoU > 0.5, where the union
  leaves out the predicted segment's pixels on GT VOID; GT crowd segments never match;
* GT areas are the JSON's ``area``; predicted areas are counted from the PNG;
* an unmatched GT segment that is not crowd is a false negative; an unmatched prediction is a
  false positive unless more than half of it lies on VOID or on a GT crowd region of its
  category;
* per category PQ = sum(IoU) / (TP + FP/2 + FN/2), SQ = sum(IoU) / TP, RQ = TP / (TP + FP/2 +
  FN/2); averages run over the categories with TP + FP + FN > 0.

Where the time goes differs: panopticapi sorts every pixel's 64-bit (gt, pred) id pair with
``np.unique``. Here each id map becomes a small index map (``searchsorted`` over the few
listed ids) and the confusion matrix is one ``bincount`` pass; PNGs decode through a single
RGBA view. ``PQStat.add_image`` takes arrays, so ``panoptic evaluate`` accumulates PQ from
the in-memory predictions while inference runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from components.common.coco_panoptic import VOID


class PredictionError(ValueError):
    """A prediction set that cannot be scored; the message names the image and the fix."""


@dataclass
class CategoryStat:
    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0


@dataclass
class PQStat:
    per_cat: dict[int, CategoryStat] = field(default_factory=dict)
    images: int = 0

    def __getitem__(self, cat: int) -> CategoryStat:
        if cat not in self.per_cat:
            self.per_cat[cat] = CategoryStat()
        return self.per_cat[cat]

    def __iadd__(self, other: "PQStat") -> "PQStat":
        for cat, s in other.per_cat.items():
            mine = self[cat]
            mine.iou += s.iou
            mine.tp += s.tp
            mine.fp += s.fp
            mine.fn += s.fn
        self.images += other.images
        return self

    def add_image(self, image_id, gt_ids: np.ndarray, gt_segments: list[dict], pred_ids: np.ndarray,
                  pred_segments: list[dict], categories: dict[int, dict]) -> None:
        """Score one image: (H, W) GT and predicted segment-id maps with their segments_info."""
        if gt_ids.shape != pred_ids.shape:
            raise PredictionError(
                f"In the image with ID {image_id} the prediction is {pred_ids.shape[0]}x{pred_ids.shape[1]} (HxW) "
                f"but the ground truth is {gt_ids.shape[0]}x{gt_ids.shape[1]}; predict at the original image size.")
        keys, inter = pair_counts(gt_ids, pred_ids)
        self.add_pairs(image_id, keys, inter, gt_segments, pred_segments, categories)

    def add_pairs(self, image_id, keys: np.ndarray, inter: np.ndarray, gt_segments: list[dict],
                  pred_segments: list[dict], categories: dict[int, dict]) -> None:
        """Score one image from its (gt, pred) pair counts (``pair_counts`` or, on the device that
        ran inference, ``device_pair_counts``): sorted packed keys ``gt << 24 | pred`` and pixels."""
        gt_segms = {el["id"]: el for el in gt_segments}
        pred_segms = {el["id"]: el for el in pred_segments}
        if len(pred_segms) != len(pred_segments):
            dup = sorted({el["id"] for el in pred_segments if sum(p["id"] == el["id"] for p in pred_segments) > 1})
            raise PredictionError(f"In the image with ID {image_id} segment IDs {dup} are listed more than once "
                                  f"in segments_info; segment ids must be unique within an image.")
        gt_of, pred_of = keys >> np.uint64(24), keys & np.uint64(0xFFFFFF)
        pairs = {(int(g), int(p)): int(n) for g, p, n in zip(gt_of, pred_of, inter)}  # sorted as panopticapi's
        pred_area: dict[int, int] = {}
        for (_, pid), n in pairs.items():
            pred_area[pid] = pred_area.get(pid, 0) + n
        for pid in sorted(pred_area):
            if pid not in pred_segms:
                if pid == VOID:
                    continue
                raise PredictionError(f"In the image with ID {image_id} segment with ID {pid} is presented in PNG "
                                      f"and not presented in JSON.")
            if pred_segms[pid]["category_id"] not in categories:
                raise PredictionError(f"In the image with ID {image_id} segment with ID {pid} has unknown "
                                      f"category_id {pred_segms[pid]['category_id']}.")
        missing = [pid for pid in pred_segms if pid not in pred_area]
        if missing:
            raise PredictionError(f"In the image with ID {image_id} the following segment IDs {missing} are "
                                  f"presented in JSON and not presented in PNG.")

        gt_matched, pred_matched = set(), set()
        for (gid, pid), n in pairs.items():
            gt, pr = gt_segms.get(gid), pred_segms.get(pid)
            if gt is None or pr is None or gt["iscrowd"] == 1 or gt["category_id"] != pr["category_id"]:
                continue
            union = pred_area[pid] + gt["area"] - n - pairs.get((VOID, pid), 0)
            iou = n / union
            if iou > 0.5:
                stat = self[gt["category_id"]]
                stat.tp += 1
                stat.iou += iou
                gt_matched.add(gid)
                pred_matched.add(pid)

        crowd = {}
        for gid, info in gt_segms.items():
            if gid in gt_matched:
                continue
            if info["iscrowd"] == 1:
                crowd[info["category_id"]] = gid
                continue
            self[info["category_id"]].fn += 1
        for pid, info in pred_segms.items():
            if pid in pred_matched:
                continue
            n = pairs.get((VOID, pid), 0)
            if info["category_id"] in crowd:
                n += pairs.get((crowd[info["category_id"]], pid), 0)
            if n / pred_area[pid] > 0.5:
                continue
            self[info["category_id"]].fp += 1
        self.images += 1

    def average(self, categories: dict[int, dict], isthing: bool | None) -> tuple[dict, dict]:
        pq = sq = rq = 0.0
        n = 0
        per_class = {}
        for cat, info in categories.items():
            if isthing is not None and (info["isthing"] == 1) != isthing:
                continue
            s = self.per_cat.get(cat, CategoryStat())
            counts = {"tp": s.tp, "fp": s.fp, "fn": s.fn}
            if s.tp + s.fp + s.fn == 0:  # not present: panopticapi's zeros, and the counts that say why
                per_class[cat] = {"pq": 0.0, "sq": 0.0, "rq": 0.0, **counts}
                continue
            n += 1
            denom = s.tp + 0.5 * s.fp + 0.5 * s.fn
            pc, sc, rc = s.iou / denom, (s.iou / s.tp if s.tp else 0), s.tp / denom
            per_class[cat] = {"pq": pc, "sq": sc, "rq": rc, **counts}
            pq, sq, rq = pq + pc, sq + sc, rq + rc
        # panopticapi divides by n unguarded; with no category present we report 0 instead of failing
        return ({"pq": pq / n if n else 0.0, "sq": sq / n if n else 0.0, "rq": rq / n if n else 0.0, "n": n},
                per_class)

    def results(self, categories: dict[int, dict]) -> dict:
        """``{"All", "Things", "Stuff": {pq, sq, rq, n}, "per_class": {cat: {pq, sq, rq, tp, fp, fn}}}``.
        A category with tp + fp + fn = 0 is not present in either set (see ``present``)."""
        out = {}
        for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
            out[name], per_class = self.average(categories, isthing)
            if name == "All":
                out["per_class"] = per_class
        return out

    def counts(self) -> dict[int, dict]:
        return {c: {"tp": s.tp, "fp": s.fp, "fn": s.fn, "iou": s.iou} for c, s in sorted(self.per_cat.items())}


def pair_counts(gt_ids: np.ndarray, pred_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels per (gt id, pred id) pair: sorted packed keys ``gt << 24 | pred`` and their counts.

    Neighbouring pixels nearly always share their pair, so the pair image is run-length
    encoded first and only the run heads are sorted: a few thousand values, not every pixel.
    """
    g, p = gt_ids.ravel(), pred_ids.ravel()
    change = np.empty(g.size, bool)
    change[0] = True
    np.not_equal(g[1:], g[:-1], out=change[1:])
    change[1:] |= p[1:] != p[:-1]
    starts = np.flatnonzero(change)
    lengths = np.diff(starts, append=g.size)
    heads = (g[starts].astype(np.uint64) << np.uint64(24)) | p[starts].astype(np.uint64)
    keys, inverse = np.unique(heads, return_inverse=True)
    counts = np.bincount(inverse.ravel(), weights=lengths, minlength=len(keys)).astype(np.int64)
    return keys, counts


def device_pair_counts(gt_ids, pred_ids) -> tuple[np.ndarray, np.ndarray]:
    """``pair_counts`` on torch tensors, on their device (integer ops only: the pairs and counts
    are exactly the numpy path's); only the few distinct pairs come back to the host."""
    import torch

    packed = (gt_ids.reshape(-1).to(torch.int64) << 24) | pred_ids.reshape(-1).to(torch.int64)
    keys, counts = torch.unique(packed, sorted=True, return_counts=True)
    return keys.cpu().numpy().astype(np.uint64), counts.cpu().numpy().astype(np.int64)
