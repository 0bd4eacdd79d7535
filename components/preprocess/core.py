"""Stage 2: the samples of a manifest -> sharded Parquet records, with a data-quality gate.

Output (local folder or ``s3://`` prefix):

* ``part-00000.parquet`` ... one shard per consecutive chunk of the manifest's image ids;
* ``_done/part-00000.json`` per shard: its sha256, rows and quarantined samples (the marker
  that lets a re-run skip a finished shard);
* ``quarantine.jsonl``: every sample that failed a check, with the reasons;
* ``index.json``: rows, bytes and sha256 per shard, schema version, source manifest hash,
  and the count identity ``images_in = rows_written + quarantined``.

Shards are planned from the manifest alone (not from the number of processes), so the same
inputs give byte-identical shards however the work is spread. Each file is written to a
temporary name and renamed (``storage.write_bytes``), so a crash leaves no half shard.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import queue
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from components.common import faults, storage
from components.common.cluster import usable_cpus
from components.common.coco_panoptic import (
    CategoryMaps,
    UnsafeFileName,
    bbox_of,
    encode_png,
    image_uri,
    load_split,
    png_uri,
    rgb2id,
)
from components.common.hashing import canonical_hash, sha256_bytes
from components.common.logs import progress as progress_bar
from components.common.manifests import load_manifest, subset_profile
from components.common.validation import check_sample, read_or_none, sample_folders
from components.data.records import COMPRESSION, SCHEMA, SCHEMA_VERSION

# Source reads in flight per shard writer: a few for local files (the page cache or a disk),
# more for S3, where each GET waits on the network.
IO_THREADS_LOCAL = 2
IO_THREADS_REMOTE = 16


class DataQualityError(RuntimeError):
    """Too many samples failed the data-quality gate."""


@dataclass(frozen=True)
class PreprocessSettings:
    """How to write the shards.

    Args:
        shard_images: images per shard (e.g. 500 for COCO: about 80 MB of JPEG+PNG).
        max_side: if set, images with a longer side are resized (JPEG re-encoded, PNG nearest).
        max_bad_fraction: fail the stage when more than this fraction of samples is quarantined.
        workers: shard writers working at once: this process and ``workers - 1`` spawned
            processes (0 or 1: this process alone; None: one per CPU this container may use, the
            default: the pod's CPU limit, not the node's core count).
        row_group_images: Parquet row-group size; the reader splits work by row group.
    """

    shard_images: int = 500
    max_side: int | None = None
    max_bad_fraction: float = 0.01
    workers: int | None = None
    row_group_images: int = 32
    jpeg_quality: int = 95

    def __post_init__(self):
        if self.shard_images < 1 or self.row_group_images < 1:
            raise ValueError("shard_images and row_group_images must be >= 1")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError("max_bad_fraction must be in [0, 1]")
        if self.workers is not None and not 0 <= self.workers <= 1024:
            raise ValueError(f"workers must be 0 (this process) to 1024, or unset (one per usable CPU), not "
                             f"{self.workers}")

    def content_params(self) -> dict:
        """The settings that change shard bytes (not workers)."""
        d = asdict(self)
        d.pop("workers")
        d.pop("max_bad_fraction")
        return d


@dataclass
class PreprocessResult:
    index_uri: str
    images_in: int
    rows_written: int
    quarantined: int
    shards: list[dict]
    skipped_shards: int


def shard_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


def _resize(image_bytes: bytes, ids: np.ndarray, segments: list[dict], max_side: int, quality: int):
    h, w = ids.shape
    scale = max_side / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    with Image.open(io.BytesIO(image_bytes)) as im:
        small = im.convert("RGB").resize((nw, nh), Image.BILINEAR)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=quality)
    ys = (np.arange(nh) * h / nh).astype(np.int64)
    xs = (np.arange(nw) * w / nw).astype(np.int64)
    new_ids = ids[ys[:, None], xs[None, :]]
    kept = []
    for s in segments:
        m = new_ids == s["id"]
        if m.any():
            kept.append({**s, "area": int(m.sum()), "bbox": bbox_of(m)})
    # segments that vanished at the smaller size become VOID pixels (there are none left)
    return buf.getvalue(), encode_png(new_ids), nh, nw, kept


def _source_uris(job: dict, image: dict | None, ann: dict | None) -> tuple[str, str]:
    """"" for what must not be read: no image, or a file name leaving the dataset folder (the
    quality gate quarantines it as such)."""
    if image is None:
        return "", ""
    try:
        return (image_uri(job["source"], job["split"], image["file_name"]),
                png_uri(job["source"], job["split"], ann["file_name"]) if ann else "")
    except UnsafeFileName:
        return "", ""


def _read_pair(uris: tuple[str, str], folders: tuple[str | None, str | None]):
    return tuple(read_or_none(u, within) if u else None for u, within in zip(uris, folders))


def _check_and_collect(job: dict, uris: list, contents) -> tuple[dict, list]:
    """Run the quality gate on each sample of a shard: returns the good ones as Parquet columns
    and the quarantine entries of the bad ones (``contents`` yields (image, PNG) bytes in order)."""
    cfg = PreprocessSettings(**job["cfg"])
    categories = CategoryMaps.from_json(job["categories"])
    rows = {k: [] for k in SCHEMA.names}
    quarantine = []
    for (image_id, image, ann), (image_file, png_file), (image_bytes, png_bytes) in zip(job["samples"], uris, contents):
        if image is None:
            quarantine.append({"image_id": image_id, "file": job["json_uri"], "reasons": [
                {"kind": "missing_image", "message": "image id from the manifest is not in the split's `images`",
                 "fix": "re-run `panoptic subset` against this annotation file"}]})
            continue
        problems, rgb = check_sample(image, ann, image_bytes, png_bytes, categories, image_file, png_file)
        if problems:
            quarantine.append({"image_id": image_id, "file": problems[0].file,
                               "reasons": [p.to_json() for p in problems]})
            continue
        segments = [{"id": int(s["id"]), "category_id": int(s["category_id"]), "iscrowd": int(s.get("iscrowd", 0)),
                     "area": int(s.get("area", 0)), "bbox": [float(v) for v in s.get("bbox", [0, 0, 0, 0])]}
                    for s in ann["segments_info"]]
        h, w = int(image["height"]), int(image["width"])
        if cfg.max_side and max(h, w) > cfg.max_side:
            image_bytes, png_bytes, h, w, segments = _resize(image_bytes, rgb2id(rgb), segments, cfg.max_side,
                                                             cfg.jpeg_quality)
        rows["image_id"].append(image_id)
        rows["file_name"].append(image["file_name"])
        rows["height"].append(h)
        rows["width"].append(w)
        rows["image"].append(image_bytes)
        rows["panoptic_png"].append(png_bytes)
        rows["segments_info"].append(segments)
    return rows, quarantine


def _write_shard(job: dict) -> dict:
    """Check, convert and write one shard (in this process or a worker process).

    The source files are read ahead by a few threads (file and S3 reads release the GIL), so
    the checks of one sample overlap the reads of the next ones.
    """
    cfg = PreprocessSettings(**job["cfg"])
    uris = [_source_uris(job, image, ann) for _, image, ann in job["samples"]]
    threads = IO_THREADS_REMOTE if storage.is_remote(job["source"]) else IO_THREADS_LOCAL
    io_pool = ThreadPoolExecutor(max_workers=threads)
    try:
        folders = sample_folders(job["source"], job["split"])
        rows, quarantine = _check_and_collect(job, uris, io_pool.map(lambda u: _read_pair(u, folders), uris))
    finally:
        io_pool.shutdown(cancel_futures=True)

    table = pa.Table.from_pydict(rows, schema=SCHEMA)
    buf = pa.BufferOutputStream()
    # page checksums: a flipped bit in a stored page is an error at read time, not a silently
    # different image or segment
    pq.write_table(table, buf, compression=COMPRESSION, row_group_size=cfg.row_group_images,
                   write_statistics=False, store_schema=True, write_page_checksum=True)
    payload = buf.getvalue().to_pybytes()
    name = shard_name(job["k"])
    storage.write_bytes(storage.join(job["out"], name), payload)
    faults.point("preprocess.shard_written")
    marker = {"shard": name, "plan_hash": job["plan_hash"], "rows": table.num_rows, "bytes": len(payload),
              "sha256": sha256_bytes(payload), "images_in": len(job["samples"]), "quarantine": quarantine}
    # The marker is written last: its presence means the shard is complete.
    storage.write_text(storage.join(job["out"], "_done", name.replace(".parquet", ".json")),
                       json.dumps(marker, sort_keys=True))
    faults.point("preprocess.marker_written")
    return marker


def _finished(out: str, job: dict) -> dict | None:
    """The marker of a shard already written by an earlier run with the same plan, else None."""
    name = shard_name(job["k"])
    marker_uri = storage.join(out, "_done", name.replace(".parquet", ".json"))
    shard_uri = storage.join(out, name)
    if not (storage.exists(marker_uri) and storage.exists(shard_uri)):
        return None
    try:
        marker = json.loads(storage.read_text(marker_uri))
    except ValueError:  # a marker torn by a machine crash: write the shard again
        return None
    if not isinstance(marker, dict) or marker.get("plan_hash") != job["plan_hash"]:
        return None
    if storage.size(shard_uri) != marker["bytes"] or sha256_bytes(storage.read_bytes(shard_uri)) != marker["sha256"]:
        return None
    return marker


def _remove_stale_temp_files(out: str) -> int:
    """Delete ``.tmp-*`` files a crashed run left behind (local output only; S3 PUTs are atomic)."""
    path = storage.local_path(out)
    removed = 0
    if path and os.path.isdir(path):
        for folder in (path, os.path.join(path, "_done")):
            if os.path.isdir(folder):
                for name in os.listdir(folder):
                    if name.startswith(".tmp-"):
                        os.remove(os.path.join(folder, name))
                        removed += 1
    return removed


def preprocess(cfg: PreprocessSettings, manifest_uri: str, out: str, source: str | None = None,
               progress: bool = True) -> PreprocessResult:
    """Write the shards of the manifest's images to ``out``. Idempotent; see module docstring.

    ``source`` overrides the dataset root recorded in the manifest (e.g. the same data
    mounted at another path inside a container).
    """
    manifest = load_manifest(manifest_uri)
    source = source or manifest["source"]["root"]
    split = manifest["source"]["split"]
    ids = list(manifest["image_ids"])
    data = load_split(source, split)
    images = {int(im["id"]): im for im in data.images}
    storage.makedirs(out)
    _remove_stale_temp_files(out)

    jobs = []
    for k, start in enumerate(range(0, len(ids), cfg.shard_images)):
        chunk = ids[start:start + cfg.shard_images]
        plan = {"manifest_hash": manifest["manifest_hash"], "k": k, "image_ids": chunk,
                "params": cfg.content_params(), "schema_version": SCHEMA_VERSION}
        jobs.append({"k": k, "plan_hash": canonical_hash(plan), "out": out, "source": source, "split": split,
                     "json_uri": data.json_uri, "categories": data.categories.to_json(), "cfg": asdict(cfg),
                     "samples": [(i, images.get(i), data.annotations.get(i)) for i in chunk]})

    markers: dict[int, dict] = {}
    todo = []
    for job in jobs:
        done = _finished(out, job)
        if done is not None:
            markers[job["k"]] = done
        else:
            todo.append(job)
    skipped = len(markers)

    bar = progress_bar(total=len(ids), desc="preprocess", unit="img", enabled=progress,
                       initial=sum(m["images_in"] for m in markers.values()))

    def finished(marker: dict) -> None:
        markers[marker_k[marker["shard"]]] = marker
        bar.update(marker["images_in"])

    marker_k = {shard_name(job["k"]): job["k"] for job in todo}
    _run_jobs(todo, usable_cpus() if cfg.workers is None else cfg.workers, finished)
    bar.close()

    shards = [markers[k] for k in sorted(markers)]
    quarantine = [q for m in shards for q in m["quarantine"]]
    rows = sum(m["rows"] for m in shards)
    if rows + len(quarantine) != len(ids):
        raise RuntimeError(f"count mismatch: {len(ids)} images in, {rows} rows + {len(quarantine)} quarantined")
    storage.write_text(storage.join(out, "quarantine.jsonl"),
                       "".join(json.dumps(q, sort_keys=True) + "\n" for q in quarantine))
    index = {
        "schema_version": SCHEMA_VERSION,
        "source_manifest_hash": manifest["manifest_hash"],
        "source_profile": subset_profile(manifest),
        "source": {"root": source, "split": split},
        "categories": data.categories.to_json(),
        "params": cfg.content_params(),
        "images_in": len(ids),
        "rows_written": rows,
        "quarantined": len(quarantine),
        "quarantine_by_kind": _count_kinds(quarantine),
        "shards": [{"file": m["shard"], "rows": m["rows"], "bytes": m["bytes"], "sha256": m["sha256"]}
                   for m in shards],
    }
    bad_fraction = len(quarantine) / max(len(ids), 1)
    failed = bad_fraction > cfg.max_bad_fraction
    message = (f"{len(quarantine)} of {len(ids)} samples ({bad_fraction:.1%}) failed the data-quality gate, "
               f"more than --max-bad-fraction {cfg.max_bad_fraction:.1%}. Reasons by kind: "
               f"{index['quarantine_by_kind']}. See {storage.join(out, 'quarantine.jsonl')}; fix the data "
               f"(`panoptic data validate`) or raise --max-bad-fraction.") if failed else ""
    # a failed gate leaves nothing that looks complete: the index says so (readers refuse it) and
    # the shards' completion markers go (a re-run rewrites the same bytes)
    index["quality_gate"] = {"passed": not failed, "bad_fraction": bad_fraction,
                             "max_bad_fraction": cfg.max_bad_fraction, **({"failure": message} if failed else {})}
    if failed:
        for m in shards:
            storage.delete(storage.join(out, "_done", m["shard"].replace(".parquet", ".json")))
    index_uri = storage.join(out, "index.json")
    storage.write_text(index_uri, json.dumps(index, indent=1, sort_keys=True))
    result = PreprocessResult(index_uri, len(ids), rows, len(quarantine), index["shards"], skipped)
    if failed:
        raise DataQualityError(message)
    return result


def _run_jobs(todo: list[dict], workers: int, finished) -> None:
    """Write the shards of ``todo``, ``workers`` at a time: this process is one of the writers
    (a thread, so it starts at once) and ``workers - 1`` spawned processes are the others. Jobs
    go to whichever writer is free; ``finished(marker)`` is called in this thread as each ends.
    """
    jobs = iter(todo)
    lock = threading.Lock()
    stop = threading.Event()  # set when a writer failed: hand out no more jobs

    def next_job():
        with lock:
            return None if stop.is_set() else next(jobs, None)

    if workers <= 1 or len(todo) <= 1:
        for job in jobs:
            finished(_write_shard(job))
        return
    # Everything that happens arrives on one queue: a spawned writer's finished future, or the
    # local writer's ("ok", marker) / ("error", exception) / ("end", None).
    events: queue.Queue = queue.Queue()

    def local_writer():
        try:
            while (job := next_job()) is not None:
                events.put(("ok", _write_shard(job)))
        except BaseException as e:  # handed to the main thread, which raises it
            events.put(("error", e))
        events.put(("end", None))

    thread = threading.Thread(target=local_writer, name="preprocess-local-writer", daemon=True)
    thread.start()
    try:
        with ProcessPoolExecutor(max_workers=workers - 1, mp_context=mp.get_context("spawn")) as pool:
            def submit() -> int:
                job = next_job()
                if job is None:
                    return 0
                pool.submit(_write_shard, job).add_done_callback(events.put)
                return 1

            running = sum(submit() for _ in range(workers - 1))
            local_running = True
            while running or local_running:
                event = events.get()
                if isinstance(event, tuple):
                    kind, value = event
                    if kind == "error":
                        raise value
                    if kind == "end":
                        local_running = False
                    else:
                        finished(value)
                else:  # a spawned writer's future
                    running -= 1
                    finished(event.result())
                    running += submit()
    except BaseException:
        stop.set()
        raise
    finally:
        thread.join()


def _count_kinds(quarantine: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for q in quarantine:
        for kind in sorted({r["kind"] for r in q["reasons"]}):
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))
