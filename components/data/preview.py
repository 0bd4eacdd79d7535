"""`panoptic data augment-preview`: a picture of training samples exactly as the trainer gets
them (the reader, the config's ``input`` section, the seed), to look at before training."""

from __future__ import annotations

import numpy as np

from components.common.coco_panoptic import IGNORE_LABEL, CategoryMaps
from components.common.overlays import segment_colors


def target_overlay(sample: dict, categories: CategoryMaps, alpha: float = 0.55) -> np.ndarray:
    """The targets over the image: stuff by its category colour, each instance in its own
    shade with its box, VOID left as is."""
    image = sample["image"].permute(1, 2, 0).numpy().astype(np.float32)
    sem = sample["sem_seg"].numpy()
    cats = {c.id: {"color": c.color, "isthing": c.isthing} for c in categories.categories}
    paint = np.zeros_like(image)
    labelled = np.zeros(sem.shape, bool)
    for k, cid in enumerate(categories.stuff_ids):
        m = sem == categories.semantic_id(cid)
        paint[m], labelled[m] = cats[cid]["color"], True
    labels = sample["labels"].tolist()
    thing_ids = [categories.thing_ids[c] for c in labels]
    colors = segment_colors([{"category_id": c} for c in thing_ids], cats, seed=1)
    for mask, color in zip(sample["masks"].numpy().astype(bool), colors):
        paint[mask], labelled[mask] = color, True
    crowd = (sem == 0) & ~labelled   # thing pixels with no instance: crowds
    paint[crowd], labelled[crowd] = (255, 255, 255), True
    out = image.copy()
    out[labelled] = (1 - alpha) * image[labelled] + alpha * paint[labelled]
    out[sem == IGNORE_LABEL] *= 0.5
    for (x0, y0, x1, y1), color in zip(sample["boxes"].round().int().tolist(), colors):
        x1, y1 = max(x0, x1 - 1), max(y0, y1 - 1)
        out[y0, x0:x1 + 1] = out[y1, x0:x1 + 1] = color
        out[y0:y1 + 1, x0] = out[y0:y1 + 1, x1] = color
    return np.clip(out, 0, 255).astype(np.uint8)


def augment_preview(shards: str, input_cfg, samples: int = 6, seed: int = 0, columns: int = 3) -> bytes:
    """A PNG of ``samples`` training samples (image and targets side by side)."""
    from components.common.plots import figure_png, pyplot
    from components.data.reader import ShardDataset
    from components.data.records import load_index

    categories = CategoryMaps.from_json(load_index(shards)["categories"])
    ds = ShardDataset(shards, categories, input_cfg, train=True, shuffle_buffer=16, seed=seed, infinite=True)
    drawn = []
    for sample in ds:
        drawn.append(sample)
        if len(drawn) == samples:
            break
    plt = pyplot()
    rows = -(-len(drawn) // columns)
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(4.2 * columns, 2.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, s in enumerate(drawn):
        r, c = divmod(i, columns)
        h, w = s["image"].shape[-2:]
        axes[r][2 * c].imshow(s["image"].permute(1, 2, 0).numpy())
        axes[r][2 * c].set_title(f"image {s['image_id']} ({w}x{h})", fontsize=8)
        axes[r][2 * c + 1].imshow(target_overlay(s, categories))
        axes[r][2 * c + 1].set_title(f"{len(s['labels'])} instances", fontsize=8)
    fig.suptitle(f"training samples, seed {seed}: lsj_size {input_cfg.lsj_size}, copy_paste_prob "
                 f"{input_cfg.copy_paste_prob}, flip_prob {input_cfg.flip_prob}", fontsize=9)
    fig.tight_layout()
    return figure_png(fig)
