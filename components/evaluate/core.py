"""Stage 4: run a model over the val shards, score it, write predictions, metrics and a report.

PQ statistics are accumulated from the in-memory predictions while inference runs (no PNG
write-then-read round trip); the prediction files are still written in COCO panoptic format
for users and for ``panoptic pq``. Time spent in inference, in PQ and in writing files is
measured apart and reported in ``metrics.json``.
"""

from __future__ import annotations

import csv
import heapq
import io
import json
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from components.common import storage
from components.common.coco_panoptic import decode_image, encode_png
from components.common.devices import pick_device
from components.common.hashing import samples_digest
from components.common.logs import progress as progress_bar
from components.common.metrics import summary_metrics
from components.common.overlays import overlay
from components.common.pq import PQStat, device_pair_counts
from components.data.reader import ShardDataset, collate
from components.data.records import load_index
from components.evaluate import coco_ap
from components.evaluate.report import render_report, thumbnail
from components.evaluate.settings import PER_IMAGE_FILE, EvaluateSettings
from components.model.artifact import load_model_and_digest
from components.model.inference import prediction_to_coco


def _device_pairs(sample: dict, pred: torch.Tensor, device) -> tuple:
    gt = torch.as_tensor(sample["gt_ids"].astype("int64"), device=pred.device)
    if gt.shape != pred.shape:
        raise ValueError(f"image {sample['image_id']}: the prediction is {tuple(pred.shape)}, the ground truth "
                         f"{tuple(gt.shape)}")
    return device_pair_counts(gt, pred)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


@dataclass
class EvalResult:
    metrics: dict
    metrics_uri: str
    report_uri: str
    per_class_uri: str
    predictions_json: str


def _image_pq(stat: PQStat, categories: dict) -> float:
    return stat.results(categories)["All"]["pq"]


def _postprocess(sample: dict, panoptic_seg, categories: dict, pred_dir: str, write: bool, pairs=None,
                 instances: dict | None = None, thing_ids: tuple = ()):
    """One image: COCO-format prediction, its PQ counts, its PNG (on a worker thread). ``pairs``:
    the (gt, pred) pixel counts already made on the inference device (``device_pair_counts``);
    ``instances``: the model's detections, made COCO results beside the image's thing segments
    as instances (for box and mask AP), or None."""
    coco = None
    t_ap = time.perf_counter()
    if instances is not None:
        coco = (coco_ap.detections(sample["image_id"], instances, thing_ids),
                coco_ap.ground_truth(sample["image_id"], sample["gt_ids"], sample["segments_info"], thing_ids))
    t0 = time.perf_counter()
    t_ap = t0 - t_ap
    ids, info = prediction_to_coco(*panoptic_seg)
    image_stat = PQStat()
    if pairs is None:
        image_stat.add_image(sample["image_id"], sample["gt_ids"], sample["segments_info"], ids, info, categories)
    else:
        image_stat.add_pairs(sample["image_id"], *pairs, sample["segments_info"], info, categories)
    t1 = time.perf_counter()
    stem = sample["file_name"].rsplit(".", 1)[0]
    if write:
        storage.write_bytes(storage.join(pred_dir, f"{stem}.png"), encode_png(ids))
    ann = {"image_id": sample["image_id"], "file_name": f"{stem}.png", "segments_info": info}
    return image_stat, ann, ids, info, t1 - t0, time.perf_counter() - t1, coco, t_ap


def evaluate(model_uri: str, shards: str, out: str, cfg: EvaluateSettings = EvaluateSettings(),
             progress: bool = True) -> EvalResult:
    """Evaluate ``model_uri`` on ``shards`` (with ``index.json``); write everything under ``out``.

    ``metrics.json`` names what was measured: ``model_digest`` (the model file's sha256: the gate
    checks it is the model it registers) and ``val_samples_digest`` (the subset and exactly the
    images scored: the gate compares only evaluations whose digests are equal)."""
    with storage.exclusive(out, ".evaluate.lock", "panoptic evaluate"):
        return _evaluate(model_uri, shards, out, cfg, progress)


def _evaluate(model_uri: str, shards: str, out: str, cfg: EvaluateSettings, progress: bool) -> EvalResult:
    device = pick_device(cfg.device)
    model, mcfg, cats, model_digest = load_model_and_digest(model_uri, device)
    categories = {c["id"]: c for c in cats.to_json()}
    dataset = ShardDataset(shards, cats, mcfg.input, train=False, with_gt=True, rank=0, world_size=1)
    total = min(len(dataset), cfg.max_images or len(dataset))
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=collate)

    stat = PQStat()
    # pair counting where the prediction is (integer ops: the counts are the host's, exactly);
    # on the CPU the host's run-length path is the faster one
    on_device = cfg.pair_counts == "device" or (cfg.pair_counts == "auto" and device.type == "cuda")
    pred_dir = storage.join(out, "predictions", "panoptic_val")
    annotations, worst = [], []  # worst: heap of (-pq, image_id, sample data) of size report_samples
    per_image = []   # (image_id, file_name, PQ, segments predicted), in sample order
    t_infer = t_pq = t_write = t_ap = 0.0
    seen = empty = 0  # empty: images with no predicted segment
    thing_ids = cats.thing_ids if cfg.coco_ap else ()
    ap_images, ap_gt, ap_dets = [], [], []   # COCO instances: the images, ground truth, detections
    bar = progress_bar(total=total, desc="evaluate", unit="img", enabled=progress)

    def consume(sample: dict, result: tuple) -> None:
        """Fold one image's results in, in sample order (so sums and files are deterministic)."""
        nonlocal stat, t_pq, t_write, t_ap, empty
        image_stat, ann, ids, info, dt_pq, dt_write, coco, dt_ap = result
        if coco is not None:
            ap_images.append({"id": int(sample["image_id"]), "file_name": sample["file_name"],
                              "height": int(sample["gt_ids"].shape[0]), "width": int(sample["gt_ids"].shape[1])})
            ap_dets.extend(coco[0])
            ap_gt.extend(coco[1])
            t_ap += dt_ap
        empty += not info
        stat += image_stat
        annotations.append(ann)
        t_pq += dt_pq
        t_write += dt_write
        pq = _image_pq(image_stat, categories)
        per_image.append((sample["image_id"], sample["file_name"], pq, len(info)))
        if cfg.report_samples:  # keep the N lowest-PQ images: a max-heap on PQ, pop the best
            heapq.heappush(worst, (-pq, -sample["image_id"], pq, sample, ids, info))
            if len(worst) > cfg.report_samples:
                heapq.heappop(worst)

    # Inference runs here; each image's PQ counting and PNG writing runs on a thread meanwhile.
    # At most a few batches wait, so GPU memory held by pending predictions stays bounded.
    pending: deque = deque()
    max_pending = max(2, cfg.post_workers) * max(1, cfg.batch_size)
    t_loop = time.perf_counter()
    with torch.inference_mode(), ThreadPoolExecutor(max_workers=max(1, cfg.post_workers)) as pool:
        for batch in loader:
            batch = batch[: total - seen]
            t0 = time.perf_counter()
            outputs = model(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t_infer += time.perf_counter() - t0
            for sample, output in zip(batch, outputs):
                pairs = _device_pairs(sample, output["panoptic_seg"][0], device) if on_device else None
                args = (sample, output["panoptic_seg"], categories, pred_dir, cfg.write_predictions, pairs,
                        output["instances"] if thing_ids else None, thing_ids)
                if cfg.post_workers > 0:
                    pending.append((sample, pool.submit(_postprocess, *args)))
                else:
                    consume(sample, _postprocess(*args))
            del outputs  # the instance masks are not needed past this point
            while pending and (len(pending) > max_pending or pending[0][1].done()):
                sample, done = pending.popleft()
                consume(sample, done.result())
            seen += len(batch)
            bar.update(len(batch))
            if seen >= total:
                break
        while pending:
            sample, done = pending.popleft()
            consume(sample, done.result())
    t_loop = time.perf_counter() - t_loop
    bar.close()
    if seen == 0:
        raise ValueError(f"{shards}: no images to evaluate")

    results = stat.results(categories)
    pred_json = storage.join(out, "predictions", "panoptic_val.json")
    storage.write_text(pred_json, json.dumps({"annotations": annotations, "categories": list(categories.values())}))
    ap: dict = {}
    if thing_ids:
        t0 = time.perf_counter()
        gt_doc = coco_ap.gt_document(ap_images, ap_gt, categories)
        ap = coco_ap.coco_ap(gt_doc, ap_dets)
        t_ap += time.perf_counter() - t0
        # what COCOeval scored, in COCO's formats (pycocotools or detectron2 read them as they are)
        storage.write_text(storage.join(out, "predictions", coco_ap.GT_FILE), json.dumps(gt_doc))
        storage.write_text(storage.join(out, "predictions", coco_ap.RESULTS_FILE), json.dumps(ap_dets))
    metrics = {
        **summary_metrics(results), **ap,
        "images": seen, "images_without_prediction": empty, "results": results,
        "counts": {str(k): v for k, v in stat.counts().items()},
        # pq_s and write_s add up the worker threads' time; loop_s is the wall time of the
        # whole pass (loading, inference and, overlapped with it, PQ and writing)
        "timing": {"inference_s": t_infer, "pq_s": t_pq, "write_s": t_write, "loop_s": t_loop, "ap_s": t_ap,
                   "pq_overhead_vs_inference": t_pq / max(t_infer, 1e-9),
                   "images_per_s_inference": seen / max(t_infer, 1e-9), "device": str(device)},
        "model": model_uri, "shards": shards, "model_digest": model_digest,
        # what the gate checks before comparing two models' metrics: the same validation data
        "val_manifest_hash": load_index(shards).get("source_manifest_hash"),
        "val_samples_digest": samples_digest(load_index(shards).get("source_manifest_hash", ""),
                                             [row[0] for row in per_image]),
    }
    metrics_uri = storage.join(out, "metrics.json")
    storage.write_text(metrics_uri, json.dumps(metrics, indent=1))

    rows = io.StringIO()
    w = csv.writer(rows, lineterminator="\n")
    # a category in neither the ground truth nor the predictions has no PQ (panopticapi's 0 is no
    # measurement): present 0, the figures empty, listed last
    w.writerow(["category_id", "name", "isthing", "present", "pq", "sq", "rq", "tp", "fp", "fn"])
    counts = stat.counts()
    zero = {"tp": 0, "fp": 0, "fn": 0}
    here = {cid: sum(counts.get(cid, zero).values()) > 0 for cid in results["per_class"]}
    for cid, r in sorted(results["per_class"].items(), key=lambda kv: (not here[kv[0]], -kv[1]["pq"], kv[0])):
        c = counts.get(cid, zero)
        figures = [f"{r[k]:.6f}" for k in ("pq", "sq", "rq")] if here[cid] else ["", "", ""]
        w.writerow([cid, categories[cid]["name"], categories[cid]["isthing"], int(here[cid]), *figures,
                    c["tp"], c["fp"], c["fn"]])
    per_class_uri = storage.join(out, "per_class.csv")
    storage.write_text(per_class_uri, rows.getvalue())
    images = io.StringIO()
    w = csv.writer(images, lineterminator="\n")
    w.writerow(["image_id", "file_name", "pq", "predicted_segments"])
    w.writerows((i, f, f"{q:.6f}", n) for i, f, q, n in per_image)
    storage.write_text(storage.join(out, PER_IMAGE_FILE), images.getvalue())

    samples = []
    for _, _, pq, sample, ids, info in sorted(worst, key=lambda t: (t[2], t[3]["image_id"])):
        image = decode_image(sample["image_bytes"], sample["file_name"])
        samples.append({"image_id": sample["image_id"], "file_name": sample["file_name"], "pq": pq,
                        "predicted_segments": len(info),
                        "image": thumbnail(image),
                        "gt_overlay": thumbnail(overlay(image, sample["gt_ids"], sample["segments_info"], categories)),
                        "pred_overlay": thumbnail(overlay(image, ids, info, categories))})
    report_uri = storage.join(out, "report.html")
    storage.write_text(report_uri, render_report(
        title="Panoptic FPN evaluation", results=results, categories=categories, samples=samples,
        extra={"model": model_uri, "shards": shards, "images": seen, "config": mcfg.name,
               "images with no predicted segment": empty,
               **({"box AP / mask AP (things, COCOeval)": f"{_pct(ap.get('AP_box'))} / {_pct(ap.get('AP_mask'))}"}
                  if ap else {}),
               "inference": f"{seen / max(t_infer, 1e-9):.2f} images/s on {device}",
               "PQ accumulation": f"{100 * t_pq / max(t_infer, 1e-9):.2f}% of inference time"}))
    return EvalResult(metrics, metrics_uri, report_uri, per_class_uri, pred_json)


