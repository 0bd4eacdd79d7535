"""The COCO panoptic format: segment-id PNGs, the annotation JSON, categories and id maps.

Facts this module relies on (COCO panoptic, Kirillov et al. 2019):

* A panoptic PNG is RGB; the segment id of a pixel is ``R + 256*G + 256**2*B``; id 0 is VOID.
* ``annotations/panoptic_{split}.json`` has ``images``, ``annotations`` (one per image, with
  ``file_name`` of its PNG and ``segments_info``) and ``categories`` (``id``, ``name``,
  ``isthing``, ``color``). Category ids are not contiguous (things 1-90, stuff 92-200).
* Images live in ``{root}/{split}/``; PNGs in ``{root}/annotations/panoptic_{split}/``.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from components.common import storage
from components.common.filenames import UnsafeFileName, file_name_problem  # noqa: F401 (part of the format)

VOID = 0
IGNORE_LABEL = 255
# Index of the single "things" class in the semantic branch (detectron2's convention:
# things -> 0, stuff -> 1..S). Keeping it makes detectron2 checkpoints load without
# permuting the semantic head's output channels.
SEM_THINGS_CLASS = 0


try:  # libspng decodes PNGs several times faster than PIL; PIL stays the fallback
    import pyspng
except ImportError:  # pragma: no cover - pyspng is in requirements.lock
    pyspng = None


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) uint32 segment ids."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {rgb.shape}")
    h, w, _ = rgb.shape
    if rgb.dtype == np.uint8 and rgb.flags.c_contiguous and h * w >= 2:
        # Each pixel's 3 bytes, read as a little-endian uint32 starting at that pixel (an
        # unaligned strided view; the 4th byte is the next pixel's R and is masked off), written
        # into a contiguous array: one pass, no per-channel copies.
        n = h * w
        view = np.ndarray((n - 1,), dtype="<u4", buffer=rgb, strides=(3,))
        out = np.empty(n, np.uint32)
        np.bitwise_and(view, 0xFFFFFF, out=out[:-1])
        r, g, b = (int(v) for v in rgb.reshape(-1, 3)[-1])
        out[-1] = r + (g << 8) + (b << 16)
        return out.reshape(h, w)
    rgb = rgb.astype(np.uint32)
    return rgb[..., 0] + (rgb[..., 1] << 8) + (rgb[..., 2] << 16)


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) integer segment ids -> (H, W, 3) uint8 RGB."""
    ids = np.asarray(ids)
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= 256**3:
        raise ValueError("segment ids must be in [0, 256**3)")
    ids = ids.astype(np.uint32)
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)


def encode_png(ids: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(id2rgb(ids), mode="RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


MAX_PIXELS = 1 << 26        # 8192 x 8192: a larger image or PNG is refused before it is decoded
MIN_SIDE, MAX_ASPECT = 4, 64  # thinner images cannot be resized for training or inference


class ImageTooLarge(ValueError):
    """An image whose header declares more pixels than ``MAX_PIXELS`` (refused undecoded)."""


def check_pixels(h: int, w: int, name: str) -> None:
    if h * w > MAX_PIXELS:
        raise ImageTooLarge(f"{name}: {h}x{w} (HxW) pixels, more than the {MAX_PIXELS} an image may have; "
                            f"refused before decoding")


def shape_problem(h: int, w: int) -> tuple[str, str] | None:
    """(problem kind, message) when an image of this size cannot be trained on or predicted."""
    if h * w > MAX_PIXELS:
        return "image_too_large", f"{h}x{w} (HxW) is more than {MAX_PIXELS} pixels"
    if min(h, w) < MIN_SIDE or max(h, w) > MAX_ASPECT * min(h, w):
        return "degenerate_shape", f"{h}x{w} (HxW): a side under {MIN_SIDE} px or an aspect ratio over {MAX_ASPECT}:1"
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a PNG's IHDR chunk, or None when the header is not there."""
    if len(data) >= 24 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return h, w
    return None


def decode_png(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Panoptic PNG bytes -> (H, W) uint32 ids. Raises ValueError naming ``name`` when corrupt."""
    return rgb2id(decode_png_rgb(data, name))


def decode_png_rgb(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Panoptic PNG bytes -> (H, W, 3) uint8. Raises ValueError naming ``name`` when corrupt,
    ``ImageTooLarge`` (before decoding) when its header declares too many pixels."""
    size = _png_size(data)
    if size is not None:
        check_pixels(*size, name)
    if pyspng is not None and data[:8] == b"\x89PNG\r\n\x1a\n":
        try:
            arr = pyspng.load(data)
            if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] in (3, 4):
                return arr[..., :3] if arr.shape[2] == 4 else arr
        except Exception:
            pass  # let PIL decide, and word the error
    try:
        with Image.open(io.BytesIO(data)) as im:
            check_pixels(im.size[1], im.size[0], name)
            arr = np.asarray(im.convert("RGB"))
    except ImageTooLarge:
        raise
    except Exception as e:  # PIL raises several types for corrupt data
        raise ValueError(f"{name}: cannot decode panoptic PNG ({e})") from e
    return arr


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """JPEG/PNG bytes -> (H, W, 3) uint8 RGB. Raises ValueError naming ``name`` when corrupt or of
    a shape nothing can be made of (too many pixels: refused before decoding; too thin)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            problem = shape_problem(im.size[1], im.size[0])
            if problem:
                raise ImageTooLarge(f"{name}: {problem[1]}; refused before decoding")
            arr = np.asarray(im.convert("RGB"))
    except ImageTooLarge:
        raise
    except Exception as e:
        raise ValueError(f"{name}: cannot decode image ({e})") from e
    return arr


def check_image_decodes(data: bytes, name: str = "<bytes>") -> tuple[int, int]:
    """Decode an image fully enough to prove it is whole; returns (height, width).

    JPEGs are decoded at 1/8 scale (libjpeg's DCT scaling): every entropy-coded byte is still
    read, so truncated or corrupt files fail, at a fraction of a full decode's cost.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            check_pixels(h, w, name)
            if im.format == "JPEG":
                im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            im.load()
    except ImageTooLarge:
        raise
    except Exception as e:
        raise ValueError(f"{name}: cannot decode image ({e})") from e
    return h, w


def image_size(data: bytes, name: str = "<bytes>") -> tuple[int, int]:
    """(height, width) read from an image header, without decoding the pixels."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Exception as e:
        raise ValueError(f"{name}: cannot read image header ({e})") from e
    return h, w


def bbox_of(mask: np.ndarray) -> list[int]:
    """COCO ``[x, y, w, h]`` of a boolean mask (as panopticapi's converters compute it)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0, 0, 0, 0]
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    return [x0, y0, x1 - x0 + 1, y1 - y0 + 1]


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    isthing: bool
    color: tuple[int, int, int] = (0, 0, 0)
    supercategory: str = ""

    def to_json(self) -> dict:
        return {"id": self.id, "name": self.name, "supercategory": self.supercategory,
                "isthing": int(self.isthing), "color": list(self.color)}

    @staticmethod
    def from_json(d: dict) -> "Category":
        return Category(id=int(d["id"]), name=str(d["name"]), isthing=bool(d["isthing"]),
                        color=tuple(d.get("color", (0, 0, 0))), supercategory=d.get("supercategory", ""))


@dataclass(frozen=True)
class CategoryMaps:
    """Contiguous ids for the two branches of Panoptic FPN.

    * instance branch: thing category ids (sorted) -> ``0..T-1``;
    * semantic branch: ``0`` = all things, stuff category ids (sorted) -> ``1..S``,
      255 = ignore (VOID). ``num_sem_classes = S + 1``.
    """

    categories: tuple[Category, ...]
    by_id: dict = field(init=False, repr=False, compare=False)
    thing_ids: tuple[int, ...] = field(init=False)
    stuff_ids: tuple[int, ...] = field(init=False)

    def __post_init__(self):
        by_id = {}
        for c in self.categories:
            if c.id in by_id:
                raise ValueError(f"category id {c.id} is listed twice")
            if c.id <= 0:
                raise ValueError(f"category id {c.id} must be positive (0 is VOID)")
            by_id[c.id] = c
        object.__setattr__(self, "by_id", by_id)
        object.__setattr__(self, "thing_ids", tuple(sorted(c.id for c in self.categories if c.isthing)))
        object.__setattr__(self, "stuff_ids", tuple(sorted(c.id for c in self.categories if not c.isthing)))

    @staticmethod
    def from_json(categories: list[dict]) -> "CategoryMaps":
        return CategoryMaps(tuple(Category.from_json(c) for c in categories))

    def to_json(self) -> list[dict]:
        return [c.to_json() for c in sorted(self.categories, key=lambda c: c.id)]

    @property
    def num_things(self) -> int:
        return len(self.thing_ids)

    @property
    def num_stuff(self) -> int:
        return len(self.stuff_ids)

    @property
    def num_sem_classes(self) -> int:
        return self.num_stuff + 1

    def is_thing(self, category_id: int) -> bool:
        return self.by_id[category_id].isthing

    def thing_contiguous(self, category_id: int) -> int:
        return self.thing_ids.index(category_id)

    def stuff_contiguous(self, category_id: int) -> int:
        return self.stuff_ids.index(category_id)

    def semantic_id(self, category_id: int) -> int:
        """Semantic-branch class of a category: 0 for any thing, 1..S for stuff."""
        if self.by_id[category_id].isthing:
            return SEM_THINGS_CLASS
        return 1 + self.stuff_ids.index(category_id)

    def thing_from_contiguous(self, index: int) -> int:
        return self.thing_ids[index]

    def stuff_from_semantic(self, sem_class: int) -> int:
        """Category id of a semantic class 1..S (0 is 'things' and has no single category)."""
        if sem_class == SEM_THINGS_CLASS:
            raise ValueError("semantic class 0 is the merged 'things' class")
        return self.stuff_ids[sem_class - 1]


@dataclass
class PanopticSplit:
    """A COCO panoptic split: its JSON loaded, with the URIs of its images and PNGs."""

    root: str
    split: str
    images: list[dict]
    annotations: dict[int, dict]  # image_id -> annotation
    categories: CategoryMaps
    raw: dict

    @property
    def json_uri(self) -> str:
        return annotation_json_uri(self.root, self.split)

    def image_uri(self, image: dict) -> str:
        return image_uri(self.root, self.split, image["file_name"])

    def png_uri(self, annotation: dict) -> str:
        return png_uri(self.root, self.split, annotation["file_name"])


def _confined(name) -> str:
    problem = file_name_problem(name)
    if problem:
        raise UnsafeFileName(f"{name!r}: file name leaves the dataset folder: {problem}")
    return name


def image_uri(root: str, split: str, file_name: str) -> str:
    """Where COCO keeps an image: ``ROOT/SPLIT/FILE``. Refuses a ``file_name`` that would leave
    ``ROOT/SPLIT`` (``UnsafeFileName``)."""
    return storage.join(root, split, _confined(file_name))


def png_uri(root: str, split: str, file_name: str) -> str:
    """Where COCO keeps a panoptic PNG: ``ROOT/annotations/panoptic_SPLIT/FILE`` (confined likewise)."""
    return storage.join(root, "annotations", f"panoptic_{split}", _confined(file_name))


MAX_SIDE = 65535          # pixels; a larger height or width is a broken entry, not an image
MAX_SEGMENT_ID = 256**3 - 1
MAX_SEGMENTS = 10_000     # per image; COCO's most crowded has a few hundred


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def structure_problems(raw) -> list[str]:
    """Every way the annotation JSON's structure is broken (types, required keys, ranges, unique
    ids), as ``path: what`` lines. File names are checked per sample, not here."""
    if not isinstance(raw, dict):
        return [f"top level: expected an object, got {type(raw).__name__}"]
    out = []
    for key in ("images", "annotations", "categories"):
        if not isinstance(raw.get(key), list):
            out.append(f"{key}: missing or not a list (not a COCO panoptic file?)")
    if out:
        return out
    seen_cats = set()
    for i, c in enumerate(raw["categories"]):
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str) \
                or c.get("isthing") not in (0, 1, True, False):
            out.append(f"categories[{i}]: needs an integer id, a string name and isthing 0 or 1")
        elif c["id"] in seen_cats:
            out.append(f"categories[{i}]: category id {c['id']} is listed twice")
        else:
            seen_cats.add(c["id"])
    seen_images = set()
    for i, im in enumerate(raw["images"]):
        if not isinstance(im, dict) or not _is_int(im.get("id")):
            out.append(f"images[{i}]: needs an integer id")
            continue
        if im["id"] in seen_images:
            out.append(f"images[{i}]: image id {im['id']} is listed twice")
        seen_images.add(im["id"])
        if not isinstance(im.get("file_name"), str):
            out.append(f"images[{i}] (id {im['id']}): file_name must be a string")
        for side in ("height", "width"):
            if not _is_int(im.get(side)) or not 1 <= im[side] <= MAX_SIDE:
                out.append(f"images[{i}] (id {im['id']}): {side} must be an integer in 1..{MAX_SIDE}, "
                           f"not {str(im.get(side))[:40]}")
    seen_anns = set()
    for i, a in enumerate(raw["annotations"]):
        if not isinstance(a, dict) or not _is_int(a.get("image_id")):
            out.append(f"annotations[{i}]: needs an integer image_id")
            continue
        if a["image_id"] in seen_anns:
            out.append(f"annotations[{i}]: a second annotation for image {a['image_id']}")
        seen_anns.add(a["image_id"])
        if not isinstance(a.get("file_name"), str):
            out.append(f"annotations[{i}] (image {a['image_id']}): file_name must be a string")
        segs = a.get("segments_info")
        if not isinstance(segs, list):
            out.append(f"annotations[{i}] (image {a['image_id']}): segments_info must be a list")
            continue
        if len(segs) > MAX_SEGMENTS:
            out.append(f"annotations[{i}] (image {a['image_id']}): {len(segs)} segments, more than the "
                       f"{MAX_SEGMENTS} an image may have")
            continue
        for j, sg in enumerate(segs):
            where = f"annotations[{i}].segments_info[{j}]"
            if not isinstance(sg, dict) or not _is_int(sg.get("id")) or not 1 <= sg["id"] <= MAX_SEGMENT_ID:
                out.append(f"{where}: needs an integer id in 1..{MAX_SEGMENT_ID}")
            elif not _is_int(sg.get("category_id")):
                out.append(f"{where}: category_id must be an integer")
            elif sg.get("iscrowd", 0) not in (0, 1, True, False):
                out.append(f"{where}: iscrowd must be 0 or 1")
            elif "area" in sg and not (_is_num(sg["area"]) and 0 <= sg["area"] <= MAX_SIDE * MAX_SIDE):
                out.append(f"{where}: area must be a number in 0..{MAX_SIDE * MAX_SIDE}")
            elif "bbox" in sg and not (isinstance(sg["bbox"], list) and len(sg["bbox"]) == 4
                                       and all(_is_num(v) and abs(v) <= MAX_SIDE for v in sg["bbox"])):
                out.append(f"{where}: bbox must be 4 finite numbers [x, y, w, h]")
    return out


def annotation_json_uri(root: str, split: str) -> str:
    return storage.join(root, "annotations", f"panoptic_{split}.json")


LAYOUT = ("ROOT/{split}/ (the images), ROOT/annotations/panoptic_{split}.json and "
          "ROOT/annotations/panoptic_{split}/ (the panoptic PNGs)")


def layout_problems(root: str, splits: tuple[str, ...] = ("train2017", "val2017")) -> list[str]:
    """What a local COCO panoptic folder lacks of the layout the pipeline reads (nothing opened
    but the folder listing): [] when every split has its images, annotation JSON and PNG folder."""
    import os

    if not os.path.isdir(root):
        return [f"{root} is not a folder"]
    missing = []
    for split in splits:
        for rel, want_dir in ((split, True), (os.path.join("annotations", f"panoptic_{split}.json"), False),
                              (os.path.join("annotations", f"panoptic_{split}"), True)):
            path = os.path.join(root, rel)
            if not (os.path.isdir(path) if want_dir else os.path.isfile(path)):
                missing.append(rel + ("/" if want_dir else ""))
    return missing


def load_split(root: str, split: str) -> PanopticSplit:
    """Load ``{root}/annotations/panoptic_{split}.json``. ``root`` may be local or ``s3://``."""
    uri = annotation_json_uri(root, split)
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"{uri}: annotation file not found. Expected the COCO panoptic layout "
            f"{{root}}/annotations/panoptic_{split}.json (make one with `panoptic data synth`)")
    raw = storage.read_json(uri, "annotation")   # bounded in size and depth; NaN and bad UTF-8 refused
    problems = structure_problems(raw)
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ValueError(f"{uri}: {len(problems)} problem(s) in the structure of the annotation file; fix them "
                         f"(or re-export it):\n  {shown}")
    return PanopticSplit(
        root=root, split=split, images=list(raw["images"]),
        annotations={int(a["image_id"]): a for a in raw["annotations"]},
        categories=CategoryMaps.from_json(raw["categories"]), raw=raw)


def segment_index_map(ids: np.ndarray, segment_ids) -> np.ndarray:
    """(H, W) segment ids -> (H, W) int32 positions in ``segment_ids``; -1 where VOID or unlisted.

    A ``searchsorted`` over the few listed ids instead of a sort of every pixel
    (``np.unique``), so it costs O(pixels * log(segments)).
    """
    seg = np.asarray(list(segment_ids), dtype=np.int64)
    if len(seg) == 0:
        return np.full(ids.shape, -1, np.int32)
    order = np.argsort(seg, kind="stable")
    sorted_ids = seg[order]
    flat = ids.astype(np.int64, copy=False).ravel()
    pos = np.minimum(np.searchsorted(sorted_ids, flat), len(seg) - 1)
    found = (sorted_ids[pos] == flat) & (flat != VOID)
    return np.where(found, order[pos], -1).astype(np.int32).reshape(ids.shape)


def _row_runs(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts (flat indices) and ids of runs of equal ids along the rows of an (H, W) id map or an
    (H, W, 3) uint8 panoptic RGB image. Runs never cross a row end; a long run may come split in
    two (harmless: every caller sums or takes extremes over runs)."""
    h, w = pixels.shape[:2]
    n = h * w
    head = np.empty(n, bool)
    head[0] = True
    if pixels.ndim == 3 and pixels.dtype == np.uint8 and pixels.flags.c_contiguous and n >= 2:
        # Compare each pixel's bytes read as a uint32 (its RGB and the next pixel's R; see
        # rgb2id): equal words mean equal pixels, and a spurious inequality only splits a run.
        words = np.ndarray((n - 1,), dtype="<u4", buffer=pixels, strides=(3,))
        np.not_equal(words[1:], words[:-1], out=head[1:n - 1])
        head[n - 1] = True
        head[::w] = True
        starts = np.flatnonzero(head)
        run_ids = np.empty(len(starts), np.uint32)
        np.bitwise_and(words[starts[:-1]], 0xFFFFFF, out=run_ids[:-1])
        r, g, b = (int(v) for v in pixels.reshape(-1, 3)[-1])
        run_ids[-1] = r + (g << 8) + (b << 16)
        return starts, run_ids
    flat = rgb2id(pixels).ravel() if pixels.ndim == 3 else np.ascontiguousarray(pixels).ravel()
    np.not_equal(flat[1:], flat[:-1], out=head[1:])
    head[::w] = True
    starts = np.flatnonzero(head)
    return starts, flat[starts].astype(np.uint32, copy=False)


def segment_stats(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every id present in an (H, W) id map (or an (H, W, 3) panoptic RGB image), with its pixel
    count and COCO box ``[x, y, w, h]``.

    Returns ``(present (n,) sorted, areas (n,), boxes (n, 4))``; VOID (0) is included when
    present. Works on the row runs of equal ids (a panoptic PNG has a few thousand of them, not
    a few hundred thousand pixels), so it costs one comparison pass over the pixels.
    """
    h, w = pixels.shape[:2]
    if h == 0 or w == 0:
        return np.zeros(0, np.uint32), np.zeros(0, np.int64), np.zeros((0, 4), np.int64)
    starts, run_ids = _row_runs(pixels)
    lengths = np.diff(starts, append=h * w)
    ys, x0 = np.divmod(starts, w)
    present, inverse = np.unique(run_ids, return_inverse=True)
    k = len(present)
    areas = np.bincount(inverse, weights=lengths, minlength=k).astype(np.int64)
    xmin, ymin = np.full(k, w, np.int64), np.full(k, h, np.int64)
    xmax, ymax = np.zeros(k, np.int64), np.zeros(k, np.int64)
    np.minimum.at(xmin, inverse, x0)
    np.maximum.at(xmax, inverse, x0 + lengths - 1)
    np.minimum.at(ymin, inverse, ys)
    np.maximum.at(ymax, inverse, ys)
    boxes = np.stack([xmin, ymin, xmax - xmin + 1, ymax - ymin + 1], 1).astype(np.int64)
    return present, areas, boxes
