"""A synthetic dataset in the exact COCO panoptic layout.

Scenes are learnable yet honest: stuff regions (sky or wall above a wavy horizon, grass or
sand below, sometimes a band of water) with textures; things of six categories, each with
its own shape and colour, several instances per image, overlapping and occluding one
another; crowd segments (a clump of small objects annotated once, ``iscrowd=1``); VOID
pixels along the horizon and in "unlabeled" patches; image sizes and aspect ratios vary.

Category ids follow COCO's non-contiguous scheme (things within 1-90, stuff within 92-200).
The same seed gives byte-identical files.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from components.common import storage
from components.common.coco_panoptic import Category, annotation_json_uri, bbox_of, encode_png, image_uri, png_uri
from components.common.logs import progress as progress_bar

THING_CATEGORIES = (
    Category(1, "disc", True, (220, 40, 40), "shape"),
    Category(3, "box", True, (40, 70, 220), "shape"),
    Category(18, "triangle", True, (30, 170, 60), "shape"),
    Category(44, "ring", True, (240, 140, 20), "shape"),
    Category(62, "star", True, (150, 50, 190), "shape"),
    Category(90, "bar", True, (240, 220, 40), "shape"),
)
STUFF_CATEGORIES = (
    Category(92, "sky", False, (120, 170, 235), "scene"),
    Category(118, "wall", False, (190, 160, 130), "scene"),
    Category(149, "grass", False, (70, 130, 50), "scene"),
    Category(184, "sand", False, (210, 190, 130), "scene"),
    Category(200, "water", False, (40, 90, 140), "scene"),
)
CATEGORIES = THING_CATEGORIES + STUFF_CATEGORIES
SPLITS = {"train2017": 0, "val2017": 1}
# Image ids of different splits never collide: val ids start here.
VAL_ID_OFFSET = 1_000_000
MIN_SEGMENT_AREA = 24


@dataclass(frozen=True)
class SynthSettings:
    train: int = 200
    val: int = 50
    seed: int = 0
    min_side: int = 192
    max_side: int = 512
    max_things: int = 7
    crowd_prob: float = 0.2
    jpeg_quality: int = 90

    def __post_init__(self):
        if not 32 <= self.min_side <= self.max_side:
            raise ValueError(f"need 32 <= min_side ({self.min_side}) <= max_side ({self.max_side})")
        if self.train < 0 or self.val < 0:
            raise ValueError("train and val counts must be >= 0")


def _texture(rng: np.random.Generator, h: int, w: int, color, kind: str) -> np.ndarray:
    """An (h, w, 3) float texture around ``color``."""
    base = np.asarray(color, np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "sky":
        shade = 1.0 - 0.35 * yy / max(h, 1)
        img = base * shade[..., None]
    elif kind == "wall":
        brick = ((yy // 12).astype(int) % 2 == 0) ^ (((xx + 12 * ((yy // 12) % 2)) // 24).astype(int) % 2 == 0)
        img = base * (0.85 + 0.15 * brick[..., None])
    elif kind == "water":
        img = base * (0.85 + 0.15 * np.sin(xx / 6.0 + 0.5 * np.sin(yy / 4.0)))[..., None]
    elif kind == "stripes":
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(5, 11)
        s = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
        img = base * (0.8 + 0.2 * s)[..., None]
    else:  # grainy ground (grass, sand) and plain things
        img = np.broadcast_to(base, (h, w, 3)).copy()
    noise = rng.normal(0, 9 if kind in ("grass", "sand") else 4, size=(h, w, 1)).astype(np.float32)
    return img + noise


def _shape_mask(rng: np.random.Generator, name: str, h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if name == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif name == "box":
        a = r * rng.uniform(0.7, 1.0)
        b = r * rng.uniform(0.7, 1.0)
        draw.rectangle([cx - a, cy - b, cx + a, cy + b], fill=1)
    elif name == "triangle":
        t = rng.uniform(0, 2 * np.pi)
        pts = [(cx + r * np.cos(t + k * 2 * np.pi / 3), cy + r * np.sin(t + k * 2 * np.pi / 3)) for k in range(3)]
        draw.polygon(pts, fill=1)
    elif name == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        ri = r * 0.5
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif name == "star":
        t = rng.uniform(0, 2 * np.pi)
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * np.cos(t + k * np.pi / 5), cy + rr * np.sin(t + k * np.pi / 5)))
        draw.polygon(pts, fill=1)
    elif name == "bar":
        t = rng.uniform(0, np.pi)
        dx, dy = np.cos(t), np.sin(t)
        L, T = r * 1.3, r * 0.28
        pts = [(cx + L * dx - T * dy, cy + L * dy + T * dx), (cx + L * dx + T * dy, cy + L * dy - T * dx),
               (cx - L * dx + T * dy, cy - L * dy - T * dx), (cx - L * dx - T * dy, cy - L * dy + T * dx)]
        draw.polygon(pts, fill=1)
    else:
        raise ValueError(f"unknown shape {name!r}")
    return np.asarray(canvas, dtype=bool)


def render_scene(rng: np.random.Generator, cfg: SynthSettings):
    """Return ``(rgb uint8 (H,W,3), ids uint32 (H,W), segments_info)`` for one scene."""
    h = int(rng.integers(cfg.min_side, cfg.max_side + 1))
    w = int(rng.integers(cfg.min_side, cfg.max_side + 1))
    img = np.zeros((h, w, 3), np.float32)
    owner = np.zeros((h, w), np.int32)  # index into `segs` + 1; 0 = VOID
    segs: list[dict] = []

    def add_segment(category: Category, mask: np.ndarray, iscrowd: int = 0) -> None:
        segs.append({"category": category, "iscrowd": iscrowd})
        owner[mask] = len(segs)

    # Stuff: top (sky or wall) / bottom (grass or sand) split by a wavy horizon, maybe water.
    by_name = {c.name: c for c in CATEGORIES}
    top = by_name["sky"] if rng.random() < 0.6 else by_name["wall"]
    bottom = by_name["grass"] if rng.random() < 0.5 else by_name["sand"]
    xs = np.arange(w)
    wave = np.sin(xs / w * 2 * np.pi * rng.uniform(0.5, 2) + rng.uniform(0, 6))
    horizon = h * rng.uniform(0.35, 0.6) + h * 0.05 * wave
    yy = np.arange(h)[:, None]
    top_mask = yy < horizon[None, :]
    bottom_mask = ~top_mask
    img[top_mask] = _texture(rng, h, w, top.color, top.name)[top_mask]
    img[bottom_mask] = _texture(rng, h, w, bottom.color, bottom.name)[bottom_mask]
    add_segment(top, top_mask)
    add_segment(bottom, bottom_mask)
    if rng.random() < 0.4:
        y0 = horizon.max() + h * rng.uniform(0.05, 0.15)
        water = (yy > y0) & (yy < y0 + h * rng.uniform(0.08, 0.2)) & np.ones((1, w), bool)
        if water.any():
            wc = by_name["water"]
            img[water] = _texture(rng, h, w, wc.color, wc.name)[water]
            add_segment(wc, water)
    # VOID band along the horizon (annotators leave boundaries unlabeled).
    owner[np.abs(yy - horizon[None, :]) < rng.uniform(1.0, 2.5)] = 0

    # Things, painted back to front so later ones occlude earlier ones.
    n_things = int(rng.integers(1, cfg.max_things + 1))
    short = min(h, w)
    for _ in range(n_things):
        cat = THING_CATEGORIES[int(rng.integers(len(THING_CATEGORIES)))]
        r = short * rng.uniform(0.07, 0.22)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        mask = _shape_mask(rng, cat.name, h, w, cx, cy, r)
        if not mask.any():
            continue
        color = np.clip(np.asarray(cat.color) + rng.integers(-20, 21, 3), 0, 255)
        kind = "stripes" if rng.random() < 0.5 else "plain"
        img[mask] = _texture(rng, h, w, color, kind)[mask]
        add_segment(cat, mask)

    # A crowd: a clump of small objects of one category, annotated as one segment.
    if rng.random() < cfg.crowd_prob:
        cat = THING_CATEGORIES[int(rng.integers(len(THING_CATEGORIES)))]
        cx, cy = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)
        crowd = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(5, 10))):
            m = _shape_mask(rng, cat.name, h, w, cx + rng.normal(0, short * 0.06),
                            cy + rng.normal(0, short * 0.06), short * rng.uniform(0.02, 0.04))
            crowd |= m
        if crowd.any():
            img[crowd] = _texture(rng, h, w, cat.color, "plain")[crowd]
            add_segment(cat, crowd, iscrowd=1)

    # An unlabeled patch: pixels nobody annotated (VOID), painted grey noise.
    if rng.random() < 0.3:
        ph, pw = int(rng.integers(8, max(9, h // 6))), int(rng.integers(8, max(9, w // 6)))
        py, px = int(rng.integers(0, h - ph)), int(rng.integers(0, w - pw))
        img[py:py + ph, px:px + pw] = 128 + rng.normal(0, 30, (ph, pw, 3))
        owner[py:py + ph, px:px + pw] = 0

    # Segment ids: distinct values in [1, 256**3), as in COCO (where they encode colours).
    ids = np.zeros((h, w), np.uint32)
    segments_info = []
    used: set[int] = set()
    counts = np.bincount(owner.ravel(), minlength=len(segs) + 1)
    for k, seg in enumerate(segs, start=1):
        mask = owner == k
        if counts[k] < MIN_SEGMENT_AREA:
            continue  # too little left visible: its pixels stay VOID
        seg_id = int(rng.integers(1, 256**3))
        while seg_id in used:
            seg_id = int(rng.integers(1, 256**3))
        used.add(seg_id)
        ids[mask] = seg_id
        segments_info.append({"id": seg_id, "category_id": seg["category"].id, "iscrowd": seg["iscrowd"],
                              "bbox": bbox_of(mask), "area": int(counts[k])})
    rgb = np.clip(img, 0, 255).astype(np.uint8)
    return rgb, ids, segments_info


def _write_scene(job: tuple) -> tuple[dict, dict]:
    """Render scene ``i`` of a split and write its JPEG and PNG; its own RNG, so any process can."""
    out, split, i, cfg = job
    rng = np.random.default_rng([cfg.seed, SPLITS[split], i])
    rgb, ids, segments_info = render_scene(rng, cfg)
    image_id = (VAL_ID_OFFSET if split == "val2017" else 0) + i + 1
    stem = f"{image_id:012d}"
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=cfg.jpeg_quality)
    storage.write_bytes(image_uri(out, split, f"{stem}.jpg"), buf.getvalue())
    storage.write_bytes(png_uri(out, split, f"{stem}.png"), encode_png(ids))
    return ({"id": image_id, "file_name": f"{stem}.jpg", "height": rgb.shape[0], "width": rgb.shape[1]},
            {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments_info})


def generate_split(out: str, split: str, count: int, cfg: SynthSettings, progress: bool = True,
                   workers: int = 0) -> dict:
    """Write ``count`` scenes of ``split`` under ``out`` and return the split's JSON dict.

    ``workers`` > 1 renders in that many processes; the files are the same whatever the number.
    """
    jobs = [(out, split, i, cfg) for i in range(count)]
    bar = progress_bar(total=count, desc=f"synth {split}", unit="img", enabled=progress)
    results = []
    if workers > 1 and count > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            for result in pool.map(_write_scene, jobs, chunksize=max(1, min(16, count // (4 * workers)))):
                results.append(result)
                bar.update(1)
    else:
        for job in jobs:
            results.append(_write_scene(job))
            bar.update(1)
    bar.close()
    images = [image for image, _ in results]
    annotations = [ann for _, ann in results]
    doc = {
        "info": {"description": "synthetic COCO-panoptic-format dataset", "seed": cfg.seed, "split": split},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [c.to_json() for c in CATEGORIES],
    }
    storage.write_text(annotation_json_uri(out, split),
                       json.dumps(doc, sort_keys=True, separators=(",", ":")))
    return doc


def generate(out: str, cfg: SynthSettings, progress: bool = True, workers: int = 0) -> dict[str, int]:
    """Write the train and val splits (``workers`` processes; same files whatever the number).
    Returns image counts per split."""
    counts = {}
    for split, n in (("train2017", cfg.train), ("val2017", cfg.val)):
        if n > 0:
            generate_split(out, split, n, cfg, progress=progress, workers=workers)
            counts[split] = n
    return counts
