"""A model's PQ while it trains: the trainer's model in memory, scored on a fixed part of the
validation shards without files (the evaluate stage scores a model file and writes everything;
both count with ``components/common/pq.py``, so their figures agree for the same images one at a
time)."""

from __future__ import annotations

import torch

from components.common.pq import PQStat
from components.model.inference import prediction_to_coco


def score_in_memory(model, rows, categories, aug, *, max_images: int = 0, batch_size: int = 1,
                    rank: int = 0, world: int = 1) -> tuple[dict, int]:
    """PQ of a model in memory (the trainer's, mid-run) on the first ``max_images`` (0: all) rows
    of ``rows`` (a ``raw=True`` reader over the validation shards: a fixed set, in shard order).

    With ``world`` > 1 (DDP) rank r scores the images i with i % world == r and the ranks gather
    every image's counts, so each rank returns the same results, summed in image order as one
    process would. Writes no file, draws from no global random generator, and leaves the model
    in the mode it found it. Returns (pq results, images scored)."""
    import torch.distributed as dist

    from components.data.targets import record_to_sample

    cats = {c["id"]: c for c in categories.to_json()}
    total = min(len(rows), max_images or len(rows))
    mine: list[tuple[int, PQStat]] = []   # (index in the set, that image's counts)
    was_training = model.training

    def run(items):
        outputs = model([sample for _, sample in items])
        for (i, sample), output in zip(items, outputs):
            ids, info = prediction_to_coco(*output["panoptic_seg"])
            image_stat = PQStat()
            image_stat.add_image(sample["image_id"], sample["gt_ids"], sample["segments_info"], ids, info, cats)
            mine.append((i, image_stat))

    model.eval()
    try:
        with torch.inference_mode():
            batch = []
            for i, record in enumerate(rows):
                if i >= total:
                    break
                if i % world != rank:
                    continue
                batch.append((i, record_to_sample(record, categories, aug, False, None, with_gt=True)))
                if len(batch) == batch_size:
                    run(batch)
                    batch = []
            if batch:
                run(batch)
    finally:
        model.train(was_training)
    if world > 1:
        parts: list = [None] * world
        dist.all_gather_object(parts, mine)
        mine = [item for part in parts for item in part]
    stat = PQStat()
    for _, image_stat in sorted(mine, key=lambda t: t[0]):
        stat += image_stat
    return stat.results(cats), len(mine)
