"""What runs on the workers: the engine plugin and the processing of one unit of work.

A unit reads its rows from the store, runs them through the task and the engine batch by batch (the read of
the next batch overlaps inference of the current one), writes its Parquet part atomically, then its done
marker, and returns a small summary: no data ever goes back to the client.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
from distributed import WorkerPlugin, get_worker

from survey_infer.array_outputs import RowArrayWriter, write_group_atomic, write_row_arrays
from survey_infer.bundle import Bundle, load_bundle
from survey_infer.config import available_cores
from survey_infer.engines import Engine, make_engine
from survey_infer.flags import FLAG_BITS, NO_ESTIMATE, flag_reasons
from survey_infer.outputs import arrow_column, catalog_schema, write_done_marker, write_part_atomic
from survey_infer.store import iter_image_batches, read_columns
from survey_infer.kinematics import iter_star_batches
from survey_infer.tiles import CutSpec, iter_tile_batches
from survey_infer.tasks import get_task
from survey_infer.tasks.base import Task, UnitResult
from survey_infer.trust import SCORE_COLUMN, TrustModel, bundle_trust, score_rows

PLUGIN_NAME = "survey-infer-engines"


@dataclass(frozen=True)
class EngineKey:
    bundle_path: str
    engine: str
    threads: int
    device: str
    precision: str = "fp32"


# One loaded (bundle, engine) per key per worker process, shared by the worker's threads.
_LOADED: dict[EngineKey, tuple[Bundle, Engine]] = {}
_LOAD_LOCK = threading.Lock()
ENGINE_LOADS: Counter[EngineKey] = Counter()  # how often each engine was built in this process


def loaded_engine(key: EngineKey, worker_threads: int | None = None) -> tuple[Bundle, Engine]:
    """The worker's engine for ``key``, loading it (and verifying the bundle) the first time only."""
    with _LOAD_LOCK:
        if key not in _LOADED:
            bundle = load_bundle(key.bundle_path)
            threads = key.threads or max(1, available_cores() // (worker_threads or _worker_threads()))
            limit_blas_threads(threads)
            keep_freed_memory()
            _LOADED[key] = (bundle, make_engine(key.engine, bundle, threads=threads, device=key.device, precision=key.precision))
            ENGINE_LOADS[key] += 1
        return _LOADED[key]


def limit_blas_threads(threads: int) -> None:
    """Give numpy's BLAS (the tasks' aperture sums, the trust score's projections) the same threads per call as
    the engine. Left at all cores, OpenBLAS's idle threads spin after every small matrix product: ~0.8 ms of
    CPU a row taken from the engine of a 64 px U-Net on 2 cores (bench/README.md, 2026-11-24)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=max(1, int(threads)), user_api="blas")


# glibc mallopt parameters: large blocks from the heap, not fresh mmaps, and freed memory kept for the next batch.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
ALLOCATOR_KEEP_BYTES = 256 * 2**20


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse the batches' large temporaries instead of mapping and unmapping them each time
    (Dask's workers trim freed memory at 64 kB). Every batch allocates the same few MB of arrays; a fresh mapping
    faults in every page again, which on this VM doubled the trust statistics' cost (bench/README.md,
    2026-11-24). Memory stays flat: the heap holds one batch's working set. False where the C
    library is not glibc (nothing changed)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, ALLOCATOR_KEEP_BYTES) and mallopt(_M_TRIM_THRESHOLD, 4 * ALLOCATOR_KEEP_BYTES))


def _worker_threads() -> int:
    """Threads of the worker running this task (1 outside a worker)."""
    try:
        return get_worker().state.nthreads
    except ValueError:
        return 1


class EnginePlugin(WorkerPlugin):
    """Loads the run's engine once when a worker starts (or joins later), before any unit arrives."""

    name = PLUGIN_NAME

    def __init__(self, key: EngineKey):
        self.key = key

    def setup(self, worker) -> None:
        loaded_engine(self.key, worker.state.nthreads)


@dataclass(frozen=True)
class UnitSpec:
    """Everything a worker needs to process units of one run (sent once per task, small).

    ``unit_bounds`` holds each unit's row range. For a `tiles` store, ``unit_tiles`` names each unit's tile
    and ``cut`` says how to cut and prepare its cutouts.
    """

    task: str
    store: str
    store_kind: str
    columns_path: str
    out_dir: str
    engine_key: EngineKey
    unit_bounds: tuple[tuple[int, int], ...]
    rows_per_read: int
    columns: tuple[str, ...]
    available_columns: tuple[str, ...]
    unit_tiles: tuple[int, ...] = ()
    cut: CutSpec | None = None
    id_column: str = "object_id"  # the store's row id column, written as the catalog's object_id
    task_options: tuple[tuple[str, str], ...] = ()  # Task.with_options
    ood_threshold: float | None = None  # the run's ood_score threshold (None: the bundle's own)
    array_store: str | None = None  # where the task's array outputs go (survey_infer.array_outputs), if any

    def rows(self, unit_index: int) -> tuple[int, int]:
        return self.unit_bounds[unit_index]


def unit_batches(spec: UnitSpec, unit_index: int, stats: dict[str, Any]) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(offset, images (n, C, H, W) float32, flags (n,)) for one unit, read or cut from its store."""
    start, stop = spec.rows(unit_index)
    store = Path(spec.store)
    if spec.store_kind == "tiles":
        yield from iter_tile_batches(store, spec.unit_tiles[unit_index], start, stop, spec.cut, spec.rows_per_read, stats)
        return
    if spec.store_kind == "kinematics":  # ragged stars per galaxy (survey_infer.kinematics.StarBatch)
        yield from iter_star_batches(store, start, stop, spec.rows_per_read)
        return
    if spec.store_kind == "ifu":  # one cube per unit; the engine's rows are its spaxels
        from survey_infer.ifu import iter_spaxel_batches

        yield from iter_spaxel_batches(store, start, stop, spec.rows_per_read)
        return
    for offset, images in iter_image_batches(store, start, stop, spec.rows_per_read):
        yield offset, images, np.zeros(len(images), np.int32)


def prefetched(items: Iterable[Any], depth: int = 1) -> Iterator[Any]:
    """Iterate ``items`` produced in a background thread, ``depth`` ahead of the consumer."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(entry: tuple) -> bool:
        """Hand one entry over; False once the consumer has gone (so this thread never blocks forever)."""
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((None, item)):
                    return
            put((None, done))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put((exc, None))

    thread = threading.Thread(target=produce, daemon=True, name="survey-infer-prefetch")
    thread.start()
    try:
        while True:
            error, item = buffer.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()


def process_unit(spec: UnitSpec, unit_index: int) -> dict[str, Any]:
    """Process one unit end to end; return its summary (rows, flags, engine, timings)."""
    started = time.perf_counter()
    task = get_task(spec.task)
    if spec.task_options:
        task = task.with_options(dict(spec.task_options))
    bundle, engine = loaded_engine(spec.engine_key)
    trust = bundle_trust(bundle)
    start, stop = spec.rows(unit_index)
    wanted = [spec.id_column, "ra", "dec"] + [c for c in spec.columns if c in spec.available_columns]
    columns = read_columns(Path(spec.columns_path), start, stop, wanted)
    columns["object_id"] = columns.pop(spec.id_column)
    for name in spec.columns:
        columns.setdefault(name, np.full(stop - start, np.nan))

    pieces: list[dict[str, np.ndarray]] = []
    infer_seconds = 0.0
    reader_stats: dict[str, Any] = {}
    streamed = task.batch_row_arrays(bundle) if spec.array_store else set()
    row_writer = (RowArrayWriter(Path(spec.out_dir) / spec.array_store, start, stop, background=True)
                  if streamed else None)  # fmt: skip
    try:
        for offset, images, store_flags in prefetched(unit_batches(spec, unit_index, reader_stats)):
            batch_columns = {k: v[offset : offset + len(images)] for k, v in columns.items()}
            tick = time.perf_counter()
            inputs, flags = task.prepare(images, batch_columns, bundle)
            outputs = engine.run(inputs)
            infer_seconds += time.perf_counter() - tick
            flags |= store_flags
            results, score = batch_results(task, bundle, trust, images, batch_columns, outputs, flags, spec.ood_threshold)
            if row_writer is not None:  # written in the background while the next batch runs
                row_writer.add(batch_columns["object_id"], {k: results.pop(k) for k in streamed})
            pieces.append({**results, SCORE_COLUMN: score, "flag": flags})
    except BaseException:
        if row_writer is not None:
            row_writer.abandon()
        raise
    if row_writer is not None:
        row_writer.close()
    merged = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
    result = task.finish_unit(merged, columns, bundle)
    merged = result.rows
    write_unit_arrays(spec, unit_index, columns["object_id"], result)
    schema = catalog_schema(task.output_columns(bundle), bundle.id, task.name, ood_score=True)
    data = {"object_id": columns["object_id"], "ra": columns["ra"], "dec": columns["dec"], **merged,
            "flag_reason": flag_reasons(merged["flag"]), "bundle_id": [bundle.id] * (stop - start)}  # fmt: skip
    table = pa.Table.from_pydict({f.name: arrow_column(data[f.name], f.type) for f in schema}, schema=schema)
    write_part_atomic(Path(spec.out_dir), unit_index, table)
    summary = {
        "unit": unit_index,
        "rows": stop - start,
        "flagged": int(np.count_nonzero(merged["flag"])),
        "ood": int(np.count_nonzero(merged["flag"] & FLAG_BITS["ood"])),
        "engine": engine.describe(),
        "seconds": round(time.perf_counter() - started, 4),
        "infer_seconds": round(infer_seconds, 4),
        **({"cutting": reader_stats} if reader_stats else {}),
    }
    write_done_marker(Path(spec.out_dir), unit_index, summary)
    return summary


def batch_results(task: Task, bundle: Bundle, trust: TrustModel | None, images: Any, columns: dict[str, np.ndarray],
                  outputs: dict[str, np.ndarray], flags: np.ndarray,
                  ood_threshold: float | None) -> tuple[dict[str, np.ndarray], np.ndarray]:  # fmt: skip
    """What every row of a batch gets after the engine: the task's results and the trust score (``ood_score``;
    ``flags`` gain the task's and the ood bits in place)."""
    results = task.postprocess(outputs, columns, flags, bundle)
    statistics = task.input_statistics(images, bundle) if trust is not None and trust.n_statistics else None
    return results, score_rows(trust, outputs, flags, ood_threshold, NO_ESTIMATE, FLAG_BITS["ood"], statistics)


def write_unit_arrays(spec: UnitSpec, unit_index: int, object_ids: np.ndarray, result: UnitResult) -> None:
    """Write a unit's row arrays and array groups (before its part and done marker: done means whole)."""
    if not (result.row_arrays or result.groups):
        return
    if spec.array_store is None:
        raise RuntimeError(f"task {spec.task} returned array outputs but declares no array_store")
    store = Path(spec.out_dir) / spec.array_store
    if result.row_arrays:
        start, stop = spec.rows(unit_index)
        write_row_arrays(store, start, stop, object_ids, result.row_arrays)
    for name, arrays in result.groups.items():
        write_group_atomic(store, name, arrays, result.group_attrs.get(name, {}))
