"""A streaming ``IterableDataset`` over the Parquet shards (local or ``s3://``).

Work is split across DDP ranks and DataLoader workers without overlap or loss: the units of
work are the shards' row groups; each of the ``world_size * num_workers`` readers takes every
``total``-th unit of the epoch's order (or every ``total``-th row when there are fewer row
groups than readers). Training shuffles the unit order per epoch and the rows through a
buffer, both seeded, so a run is reproducible and can be resumed by skipping samples.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from components.common import storage
from components.common.coco_panoptic import CategoryMaps
from components.data.records import load_index
from components.data.targets import record_to_sample
from components.model.config import InputConfig

DONORS = 8   # rows kept as copy-paste donors


class ShardError(ValueError):
    """A shard is missing, truncated or not Parquet."""


@dataclass(frozen=True)
class Unit:
    shard: str        # URI of the shard
    row_group: int
    rows: int
    first_row: int    # global row number of the unit's first row in index order


def open_shard(uri: str, expected_bytes: int | None = None) -> pq.ParquetFile:
    fs, path = storage.resolve(uri)
    try:
        info = fs.get_file_info(path)
        if info.size is None:
            raise FileNotFoundError(uri)
        if expected_bytes is not None and info.size != expected_bytes:
            raise ShardError(f"{uri}: {info.size} bytes but index.json says {expected_bytes}: the shard is "
                             f"truncated or was replaced; re-run `panoptic preprocess` to rewrite it")
        return pq.ParquetFile(fs.open_input_file(path), page_checksum_verification=True)
    except ShardError:
        raise
    except FileNotFoundError as e:
        raise ShardError(f"{uri}: shard listed in index.json is missing; re-run `panoptic preprocess`") from e
    except Exception as e:  # pyarrow raises ArrowInvalid for a truncated/corrupt footer
        raise ShardError(f"{uri}: not a readable Parquet shard ({e}); re-run `panoptic preprocess`") from e


def list_units(shards_uri: str) -> list[Unit]:
    """Every row group of every shard in ``index.json``, in index order."""
    index = load_index(shards_uri)
    folder = shards_uri if not shards_uri.endswith(".json") else shards_uri.rsplit("/", 1)[0]
    units, row = [], 0
    for s in index["shards"]:
        uri = storage.join(folder, s["file"])
        meta = open_shard(uri, s["bytes"]).metadata
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            units.append(Unit(uri, g, n, row))
            row += n
    return units


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialised, else the torchrun env vars."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardDataset(IterableDataset):
    """Samples (dicts of tensors, see ``record_to_sample``) streamed from the shards.

    Args:
        shards: the shard folder (holding ``index.json``), local or ``s3://``.
        categories: the dataset's categories.
        aug: augmentation settings; ``train`` picks train or test behaviour.
        shuffle_buffer: rows held for shuffling (train only; 0 = no shuffle).
        seed: shuffling and augmentation seed.
        infinite: loop over epochs forever (iteration-based training).
        with_gt: also yield the original id map and segments_info (evaluation).
        rank / world_size: override the DDP position (default: from torch.distributed/env).
        raw: yield the decoded Parquet rows themselves, without decoding images (tests, tools).
    """

    def __init__(self, shards: str, categories: CategoryMaps, aug: InputConfig | None = None, *, train: bool = True,
                 shuffle_buffer: int = 64, seed: int = 0, infinite: bool = False, with_gt: bool = False,
                 rank: int | None = None, world_size: int | None = None, raw: bool = False):
        super().__init__()
        self.shards, self.categories, self.aug = shards, categories, aug or InputConfig()
        self.train, self.shuffle_buffer, self.seed = train, shuffle_buffer, seed
        self.infinite, self.with_gt, self.raw = infinite, with_gt, raw
        self._rank, self._world = rank, world_size
        self.units = list_units(shards)
        self.num_rows = sum(u.rows for u in self.units)
        if self.num_rows == 0:
            raise ValueError(f"{shards}: the shards hold no rows")
        self.skip = 0  # samples of this reader's stream to skip (resume)
        self.skip_batches = (0, 1)  # (batches already consumed from the DataLoader, batch size)
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_rows

    def resume_after(self, batches: int, batch_size: int) -> None:
        """Skip what a DataLoader over this dataset already yielded in ``batches`` batches.

        A DataLoader with W workers takes whole batches from each worker in turn, so worker w
        has produced ceil((batches - w) / W) of them; each worker skips its own share.
        """
        self.skip_batches = (batches, batch_size)

    def _skip_for(self, worker: int, num_workers: int) -> int:
        batches, size = self.skip_batches
        return self.skip + max(0, -(-(batches - worker) // num_workers)) * size

    def _reader_position(self) -> tuple[int, int]:
        rank, world = dist_info()
        rank = self._rank if self._rank is not None else rank
        world = self._world if self._world is not None else world
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        return rank * nw + wid, world * nw

    def _epoch_rows(self, epoch: int, reader: int, total: int):
        """This reader's rows of one epoch, as (unit, [row offsets in the unit])."""
        order = list(self.units)
        if self.train:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(order))
            order = [order[i] for i in perm]
        if len(order) >= total:
            for u in order[reader::total]:
                yield u, list(range(u.rows))
        else:
            pos = 0
            for u in order:
                rows = [i for i in range(u.rows) if (pos + i) % total == reader]
                pos += u.rows
                if rows:
                    yield u, rows

    def _rows(self, epoch: int, reader: int, total: int):
        files: dict[str, pq.ParquetFile] = {}
        for unit, rows in self._epoch_rows(epoch, reader, total):
            if unit.shard not in files:
                files[unit.shard] = open_shard(unit.shard)
            try:
                table = files[unit.shard].read_row_group(unit.row_group)
            except Exception as e:
                raise ShardError(f"{unit.shard}: row group {unit.row_group} cannot be read ({e}); "
                                 f"re-run `panoptic preprocess`") from e
            records = table.to_pylist()
            for i in rows:
                yield records[i]

    def __iter__(self):
        reader, total = self._reader_position()
        info = get_worker_info()
        epoch = self.epoch
        skip = self._skip_for(info.id if info else 0, info.num_workers if info else 1)
        while True:
            stream = self._rows(epoch, reader, total)
            if self.train and self.shuffle_buffer > 0:
                stream = _shuffled(stream, self.shuffle_buffer, np.random.default_rng([self.seed, epoch, reader]))
            pasting = self.train and self.aug.copy_paste_prob > 0
            recent: deque = deque(maxlen=DONORS)   # copy-paste donors: the rows just before this one
            for record in stream:
                key = [self.seed, epoch, reader, int(record["image_id"])]
                aug_rng = np.random.default_rng(key)
                donor = None
                if pasting and recent:
                    donor = recent[int(np.random.default_rng(key + [1]).integers(len(recent)))]
                if pasting:
                    recent.append(record)
                if skip > 0:   # skipped rows still pass through the donors: a resumed run pastes the same
                    skip -= 1
                    continue
                if self.raw:
                    yield record
                else:
                    yield record_to_sample(record, self.categories, self.aug, self.train, aug_rng, self.with_gt,
                                           donor)
            epoch += 1
            if not self.infinite:
                return


def _shuffled(stream, size: int, rng: np.random.Generator):
    buf = []
    for item in stream:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


def collate(batch: list[dict]) -> list[dict]:
    """Keep samples as a list (images differ in size), like detectron2's trivial collator."""
    return batch
