"""A task's array outputs (``maps.zarr``, ``sfh.zarr``), written by units exactly once, like the catalog parts.

Two layouts, both Zarr v3 under the run's output directory (the store's name is the task's ``array_store``):

- **row arrays** ``<store>/<name>`` of shape (N, *per_row_shape), row i = input row i, with an ``object_id``
  array beside them so that rows can be joined to the (re-partitioned) catalog. The client creates them before
  any unit runs, chunked so that every unit owns whole chunks (chunk rows = the rows of a read batch when units
  start on multiples of it, else the greatest common divisor of the unit boundaries): no two units ever write one
  chunk, a unit writes its batches as they come (`RowArrayWriter`), and a unit that is redone rewrites its region.
- **group arrays** ``<store>/<group>/<name>`` of any shape, one group per unit key (e.g. a cube id): written
  into a temporary group beside the store and renamed into place, so a group is either whole or absent.

A unit writes its arrays before its Parquet part and its done marker, so a unit marked done has its arrays.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from survey_infer.errors import RefusedError
from survey_infer.tasks.base import ArrayOutput

ID_ARRAY = "object_id"
# Blosc LZ4 with byte shuffle: as small as zarr's default zstd on 64 x 64 property maps (52 vs 51 kB a map
# stack) at less than half its cost (0.38 vs 0.83 ms a row on this VM), which the workers pay on every row.
ROW_ARRAY_CODEC = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
TEMP_GROUPS_DIR = ".array-groups.tmp"  # beside the array store; emptied when the run ends
# Units write whole chunks of their own, so zarr's test of each chunk against the fill value (to skip writing an
# empty one) only costs: 64 x 64 property maps and errors took 0.407 ms a row to write with it, 0.359 without it
# (bench/throughput_property_maps.py, 64-row chunks; 0.38 -> 0.25 with 256-row chunks). Every chunk of a unit is
# then on disk, NaN-filled or not.
WRITE_EVERY_CHUNK = {"write_empty_chunks": True}


def unit_chunk_rows(unit_bounds: tuple[tuple[int, int], ...], rows_per_read: int = 0) -> int:
    """Rows per chunk such that every unit starts and ends on a chunk boundary (the array end excepted): the
    rows read per batch when every unit starts on a multiple of them (each batch then fills whole chunks and is
    written as it comes), else the greatest common divisor of the unit starts."""
    inner = [start for start, _ in unit_bounds[1:]]
    if rows_per_read > 0 and all(start % rows_per_read == 0 for start in inner):
        return rows_per_read
    if not inner:
        return max(1, unit_bounds[0][1] - unit_bounds[0][0]) if unit_bounds else 1
    return math.gcd(*inner)


def create_row_arrays(
    store: Path, outputs: list[ArrayOutput], n_rows: int, unit_bounds: tuple[tuple[int, int], ...],
    attrs: dict[str, Any], rows_per_read: int = 0,
) -> None:
    """Create (or, on a resume, keep) the row arrays and the ``object_id`` array; refuse a mismatched one."""
    group = zarr.open_group(str(store), mode="a", zarr_format=3)
    group.attrs.update({"survey_infer": {"format": 1, "layout": "rows", **attrs}})
    chunk = min(unit_chunk_rows(unit_bounds, rows_per_read), max(n_rows, 1))
    wanted = [ArrayOutput(ID_ARRAY, (), "int64", "", "object identifier of the row (the catalog's object_id)")]
    for out in wanted + list(outputs):
        shape = (n_rows, *out.per_row_shape)
        if out.name in group:
            existing = group[out.name]
            if existing.shape != shape or existing.dtype != np.dtype(out.dtype):
                raise RefusedError(f"array '{out.name}' in {store} has shape {existing.shape} {existing.dtype}; "
                                 f"this run writes {shape} {np.dtype(out.dtype)}")  # fmt: skip
            continue
        fill = -1 if np.dtype(out.dtype).kind in "iu" else np.nan
        group.create_array(
            out.name, shape=shape, chunks=(chunk, *out.per_row_shape), dtype=out.dtype, fill_value=fill,
            compressors=ROW_ARRAY_CODEC, attributes={"unit": out.unit, "description": out.description, **out.attrs},
        )  # fmt: skip


def create_group_store(store: Path, attrs: dict[str, Any]) -> None:
    """Create (or keep) the root group under which units write one group each."""
    group = zarr.open_group(str(store), mode="a", zarr_format=3)
    group.attrs.update({"survey_infer": {"format": 1, "layout": "groups", **attrs}})


def write_row_arrays(store: Path, start: int, stop: int, object_ids: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
    """Write one unit's rows [start, stop) of each row array (the unit owns these chunks)."""
    writer = RowArrayWriter(store, start, stop)
    writer.add(object_ids, arrays)
    writer.close()


class RowArrayWriter:
    """Writes one unit's rows [start, stop) of the row arrays as its batches arrive, whenever the rows received
    end on a chunk boundary (or the unit's end): each write fills whole chunks that only this unit owns, and when
    batches are chunk-sized (`unit_chunk_rows`) no batch is ever copied into a unit-sized buffer first.

    With ``background`` the writes (compression, file I/O) run in one thread of their own while the unit goes on
    with its next batch, at most MAX_PENDING_WRITES behind (memory stays bounded). `close` waits for them and
    raises their error; `abandon` (a failed unit) waits too, so that no write of a failed attempt lands after
    the unit has been given up and is redone elsewhere.
    """

    MAX_PENDING_WRITES = 2

    def __init__(self, store: Path, start: int, stop: int, background: bool = False):
        self.store, self.start, self.stop = Path(store), start, stop
        self.written = start  # rows [start, written) are written or being written
        self.pending: list[dict[str, np.ndarray]] = []
        self.pending_rows = 0
        self._targets: dict[str, zarr.Array] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="survey-infer-write") if background else None
        self._writes: deque[Future] = deque()

    def _target(self, name: str) -> zarr.Array:
        if name not in self._targets:
            self._targets[name] = zarr.open_array(str(self.store / name), mode="r+").with_config(WRITE_EVERY_CHUNK)
        return self._targets[name]

    def add(self, object_ids: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        """Queue one batch's rows (the next ones of the unit; not modified afterwards by the caller); write what
        now ends on a chunk boundary."""
        batch = {ID_ARRAY: np.asarray(object_ids), **arrays}
        rows = len(batch[ID_ARRAY])
        for name, values in batch.items():
            if len(values) != rows:
                raise ValueError(f"array output '{name}' has {len(values)} rows for a batch of {rows}")
        if self.written + self.pending_rows + rows > self.stop:
            raise ValueError(f"array outputs got {self.pending_rows + rows} rows past row {self.written}; the unit "
                             f"ends at {self.stop}")  # fmt: skip
        self.pending.append(batch)
        self.pending_rows += rows
        end = self.written + self.pending_rows
        if end == self.stop or end % self._target(ID_ARRAY).chunks[0] == 0:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        start, end = self.written, self.written + self.pending_rows
        region = {}
        for name in self.pending[0]:
            pieces = [batch[name] for batch in self.pending]
            region[name] = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        self.written, self.pending, self.pending_rows = end, [], 0
        if self._executor is None:
            self._write(start, end, region)
            return
        while len(self._writes) >= self.MAX_PENDING_WRITES:
            self._writes.popleft().result()
        self._writes.append(self._executor.submit(self._write, start, end, region))

    def _write(self, start: int, end: int, region: dict[str, np.ndarray]) -> None:
        for name, values in region.items():
            target = self._target(name)
            target[start:end] = np.asarray(values, dtype=target.dtype)

    def _wait(self) -> None:
        try:
            while self._writes:
                self._writes.popleft().result()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        """Write what is left and wait for every write; refuse a unit whose batches did not add up to its rows."""
        try:
            self._flush()
        finally:
            self._wait()
        if self.written != self.stop:
            raise ValueError(f"array outputs got rows [{self.start}, {self.written}) for a unit of [{self.start}, "
                             f"{self.stop})")  # fmt: skip

    def abandon(self) -> None:
        """A failed unit: drop what is queued, wait for the writes already running (their errors are moot)."""
        self.pending, self.pending_rows = [], 0
        try:
            self._wait()
        except Exception:  # noqa: BLE001 - the unit's own error is the one reported
            pass


def write_group_atomic(store: Path, group_name: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> Path:
    """Write one unit's group into a temporary group, then rename it into ``store/group_name``."""
    if not group_name or "/" in group_name or group_name.startswith("."):
        raise ValueError(f"array group name {group_name!r} must be non-empty, without '/' and not start with '.'")
    final = store / group_name
    tmp = store.parent / TEMP_GROUPS_DIR / f"{group_name}.{uuid.uuid4().hex}"
    try:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        group.attrs.update(attrs)
        for name, values in arrays.items():
            values = np.asarray(values)
            group.create_array(name, data=values)
        if final.exists():  # a unit killed after its rename but before its done marker: redo whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def remove_temp_groups(out_dir: Path) -> None:
    """Remove what units killed mid-write left in the temporary groups folder (called under the run lock)."""
    shutil.rmtree(Path(out_dir) / TEMP_GROUPS_DIR, ignore_errors=True)
