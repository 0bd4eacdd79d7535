"""Checks of the COCO panoptic format, one sample at a time.

``check_sample`` is the single definition of a good sample: ``panoptic data validate`` runs
it over a split and prints a report; the preprocessing data-quality gate runs it on every
sample and quarantines the bad ones with the same reasons.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from components.common import storage
from components.common.coco_panoptic import (
    VOID,
    CategoryMaps,
    ImageTooLarge,
    PanopticSplit,
    UnsafeFileName,
    check_image_decodes,
    check_pixels,
    decode_png_rgb,
    file_name_problem,
    load_split,
    segment_stats,
    shape_problem,
)
from components.common.jpeg_check import JpegStructureError, check_jpeg_structure
from components.common.logs import progress as progress_bar

# What each kind of problem means for the user: how to fix it.
FIXES = {
    "file_name_outside_dataset": "use the plain file name relative to the split's folder (no '..', no absolute path)",
    "file_outside_dataset": "the file is a link to somewhere outside the split's folder: copy the real file in",
    "not_a_regular_file": "put a regular image file there (not a FIFO, device or socket)",
    "image_too_large": "downscale the image: it is larger than any training image may be",
    "degenerate_shape": "crop or drop the image: its sides must be at least 4 px and at most 64 times each other",
    "missing_annotation": "add an entry to `annotations` for this image, or drop the image from `images`",
    "annotation_without_image": "add the image to `images`, or drop this annotation",
    "missing_image": "restore the image file, or drop the image from the JSON",
    "corrupt_image": "re-export or re-download the image; it does not decode",
    "missing_png": "restore the panoptic PNG named by the annotation's file_name",
    "corrupt_png": "re-export the panoptic PNG; it does not decode",
    "size_mismatch": "image, PNG and JSON height/width must agree; re-export the PNG at the image's size",
    "id_not_in_segments_info": "every non-zero id in the PNG needs a segments_info entry (or paint those pixels "
                               "0 = VOID)",
    "segment_not_in_png": "drop segments_info entries whose id has no pixel in the PNG",
    "duplicate_segment_id": "segment ids must be unique within an image",
    "unknown_category": "use a category id listed in `categories`, or add the category",
    "area_mismatch": "set `area` to the segment's pixel count in the PNG",
    "bbox_mismatch": "set `bbox` to the segment's [x, y, w, h] in the PNG",
}


@dataclass
class Problem:
    image_id: int | None
    file: str
    kind: str
    message: str

    @property
    def fix(self) -> str:
        return FIXES.get(self.kind, "")

    def __str__(self) -> str:
        return f"{self.file}: {self.kind}: {self.message} (fix: {self.fix})"

    def to_json(self) -> dict:
        return {**asdict(self), "fix": self.fix}


def check_sample(image: dict, annotation: dict | None, image_bytes: bytes | None, png_bytes: bytes | None,
                 categories: CategoryMaps, image_name: str, png_name: str,
                 check_geometry: bool = True) -> tuple[list[Problem], np.ndarray | None]:
    """Check one sample. Returns ``(problems, rgb)``; ``rgb`` is the decoded (H, W, 3) panoptic
    PNG (``rgb2id`` turns it into ids) or None.

    ``check_geometry`` also compares each segment's area and bbox with the PNG (the
    validator does; the quarantine gate may skip it since area/bbox are recomputed later).
    """
    image_id = image.get("id")
    problems: list[Problem] = []

    def bad(file, kind, message):
        problems.append(Problem(image_id, file, kind, message))

    for what, entry in (("image", image), ("panoptic PNG", annotation)):
        problem = file_name_problem(entry.get("file_name")) if entry is not None else None
        if problem:  # never opened: the caller reads nothing for such a name (sample_uris)
            bad(repr(entry.get("file_name")), "file_name_outside_dataset", f"{what} file_name: {problem}")
    if problems:
        return problems, None
    if annotation is None:
        bad(image_name, "missing_annotation", f"image {image_id} has no entry in `annotations`")
        return problems, None
    shape = shape_problem(image["height"], image["width"])
    if shape:   # nothing is decoded for such a sample
        bad(image_name, shape[0], f"the JSON says {shape[1]}")
        return problems, None
    if isinstance(image_bytes, Refused):
        bad(image_name, image_bytes.kind, image_bytes.message.split(": ", 1)[-1])
    elif image_bytes is None:
        bad(image_name, "missing_image", "file not found")
    else:
        try:
            h_img, w_img = image_decodable_size(image_bytes, image_name)
            if (h_img, w_img) != (image.get("height"), image.get("width")):
                bad(image_name, "size_mismatch", f"image is {h_img}x{w_img} (HxW) but the JSON says "
                                                 f"{image.get('height')}x{image.get('width')}")
        except ImageTooLarge as e:
            bad(image_name, "image_too_large", str(e).split(": ", 1)[-1])
        except ValueError as e:
            bad(image_name, "corrupt_image", str(e).split(": ", 1)[-1])
    if isinstance(png_bytes, Refused):
        bad(png_name, png_bytes.kind, png_bytes.message.split(": ", 1)[-1])
        return problems, None
    if png_bytes is None:
        bad(png_name, "missing_png", "file not found")
        return problems, None
    try:
        rgb = decode_png_rgb(png_bytes, png_name)
    except ImageTooLarge as e:
        bad(png_name, "image_too_large", str(e).split(": ", 1)[-1])
        return problems, None
    except ValueError as e:
        bad(png_name, "corrupt_png", str(e).split(": ", 1)[-1])
        return problems, None
    if rgb.shape[:2] != (image.get("height"), image.get("width")):
        bad(png_name, "size_mismatch", f"PNG is {rgb.shape[0]}x{rgb.shape[1]} (HxW) but the image is "
                                       f"{image.get('height')}x{image.get('width')}")

    segments = annotation.get("segments_info", [])
    seg_ids = [int(s["id"]) for s in segments]
    for seg_id, n in Counter(seg_ids).items():
        if n > 1:
            bad(png_name, "duplicate_segment_id", f"segment id {seg_id} is listed {n} times")
    present, areas, boxes = segment_stats(rgb)
    listed = set(seg_ids)
    for seg_id, n in zip(present.tolist(), areas.tolist()):
        if seg_id != VOID and seg_id not in listed:
            bad(png_name, "id_not_in_segments_info", f"id {seg_id} covers {n} px but is not in segments_info")
    where = {seg_id: k for k, seg_id in enumerate(present.tolist())}
    for s in segments:
        seg_id, cat = int(s["id"]), s.get("category_id")
        if cat not in categories.by_id:
            bad(png_name, "unknown_category", f"segment {seg_id} has category_id {cat}, not in `categories`")
        k = where.get(seg_id) if seg_id != VOID else None
        if k is None:
            bad(png_name, "segment_not_in_png", f"segment {seg_id} (category {cat}) has no pixel in the PNG")
            continue
        if check_geometry:
            if "area" in s and int(s["area"]) != int(areas[k]):
                bad(png_name, "area_mismatch", f"segment {seg_id}: area {s['area']} in JSON, {int(areas[k])} px in PNG")
            if "bbox" in s and [int(round(v)) for v in s["bbox"]] != boxes[k].tolist():
                bad(png_name, "bbox_mismatch",
                    f"segment {seg_id}: bbox {s['bbox']} in JSON, {boxes[k].tolist()} in PNG")
    return problems, rgb


def image_decodable_size(data: bytes, name: str) -> tuple[int, int]:
    """(height, width) of an image that decodes; ValueError naming ``name`` otherwise.

    JPEGs get the structural parse first (~0.06 ms); only a file it cannot vouch for is decoded,
    so the verdict on a doubtful file is the decoder's own (see components/common/jpeg_check.py).
    """
    try:
        h, w = check_jpeg_structure(data)
    except JpegStructureError:
        return check_image_decodes(data, name)
    check_pixels(h, w, name)
    return h, w


def sample_uris(data: PanopticSplit, image: dict, annotation: dict | None) -> tuple[str, str]:
    """The image's and the PNG's URIs; "" for a missing annotation or a file name that would leave
    the dataset folder (``check_sample`` reports it; nothing is read)."""
    try:
        return data.image_uri(image), data.png_uri(annotation) if annotation else ""
    except UnsafeFileName:
        return "", ""


MAX_SAMPLE_BYTES = 256 << 20    # an image or panoptic PNG; COCO's largest is ~1 MB


@dataclass(frozen=True)
class Refused:
    """A sample file that was not read, and why (a ``Problem`` kind and its message)."""
    kind: str
    message: str


def read_or_none(uri: str, within: str | None = None) -> bytes | Refused | None:
    """A sample file's bytes; None when it is missing; ``Refused`` when it must not be read: a
    link out of ``within`` (its split's folder), something other than a regular file, or a
    file larger than any image."""
    try:
        return storage.read_bytes(uri, within=within, max_bytes=MAX_SAMPLE_BYTES)
    except FileNotFoundError:
        return None
    except storage.UnsafePath as e:
        return Refused("file_outside_dataset" if e.kind == "leaves_folder" else "not_a_regular_file", str(e))
    except IsADirectoryError as e:
        return Refused("not_a_regular_file", str(e))
    except storage.FileTooLarge as e:
        return Refused("image_too_large", str(e))


def sample_folders(root: str, split: str) -> tuple[str | None, str | None]:
    """The folders a split's images and PNGs must stay in (None for S3: no links there)."""
    if storage.is_remote(root):
        return None, None
    return storage.join(root, split), storage.join(root, "annotations", f"panoptic_{split}")


@dataclass
class ValidationReport:
    split: str
    images: int = 0
    annotations: int = 0
    bad_images: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(p.kind for p in self.problems).items()))

    def render(self, max_lines: int = 50) -> str:
        lines = [f"split {self.split}: {self.images} images, {self.annotations} annotations, "
                 f"{self.images - self.bad_images} ok, {self.bad_images} with problems"]
        if self.problems:
            lines.append("problems by kind:")
            lines += [f"  {k:26s} {n}" for k, n in self.counts().items()]
            lines.append("details:")
            lines += [f"  {p}" for p in self.problems[:max_lines]]
            if len(self.problems) > max_lines:
                lines.append(f"  ... and {len(self.problems) - max_lines} more (use --json for all)")
        else:
            lines.append("OK: every check passed")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"split": self.split, "images": self.images, "annotations": self.annotations,
                "bad_images": self.bad_images, "ok": self.ok, "counts": self.counts(),
                "problems": [p.to_json() for p in self.problems]}


def validate_split(root: str, split: str, workers: int = 4, progress: bool = True) -> ValidationReport:
    """Check every invariant of a COCO panoptic split; never raises for bad samples."""
    data: PanopticSplit = load_split(root, split)
    report = ValidationReport(split=split, images=len(data.images), annotations=len(data.annotations))
    image_ids = {int(im["id"]) for im in data.images}
    for image_id, ann in data.annotations.items():
        if image_id not in image_ids:
            try:
                where = data.png_uri(ann)
            except UnsafeFileName:
                where = repr(ann.get("file_name"))
            report.problems.append(Problem(image_id, where, "annotation_without_image",
                                           f"annotation for image_id {image_id}, which is not in `images`"))

    image_dir, png_dir = sample_folders(root, split)

    def one(image: dict) -> list[Problem]:
        ann = data.annotations.get(int(image["id"]))
        image_uri, png_uri = sample_uris(data, image, ann)
        problems, _ = check_sample(image, ann, read_or_none(image_uri, image_dir) if image_uri else None,
                                   read_or_none(png_uri, png_dir) if png_uri else None, data.categories, image_uri,
                                   png_uri)
        return problems

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for problems in progress_bar(pool.map(one, data.images), total=len(data.images), desc=f"validate {split}",
                                     enabled=progress, unit="img"):
            if problems:
                report.bad_images += 1
                report.problems.extend(problems)
    return report
