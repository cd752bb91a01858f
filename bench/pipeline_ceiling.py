"""The highest pipeline_vs_engine ratio any pipeline can reach on this machine, task by task: the work every
row must get, added one step at a time to the bare engine, without Dask, Parquet or the run's bookkeeping.

    python bench/pipeline_ceiling.py --task mass_to_light --store STORE --engine onnxruntime --precision int8
    python bench/pipeline_ceiling.py --task property_maps --store STORE --engine torch --batch 64

One 1-thread engine session per core, each driven by its own thread (the pipeline's worker threads run the engine
so, and it is the fastest bare mode of both tasks' engines here: bench/million.py, bench/throughput_property_maps.py).
The threads take the store's batches in turn and run, per batch, one of these levels:

1. ``engine``: the engine alone on prepared in-memory batches (the benches' reference);
2. ``+ read``: read the batch from the Zarr store as float32 (the array opened once, as a unit opens it), then the task's ``prepare`` (NaN/empty flags,
   scaling, metadata), then the engine;
3. ``+ row work``: then what every row of a run gets after the engine (``worker.batch_results``: the task's
   ``postprocess``, its input statistics and the trust score);
4. ``+ outputs``: then the task's row arrays (e.g. maps.zarr) written chunk by chunk, where the task has any.

Each level runs twice, interleaved with the engine alone (the VM drifts); the ratio is a level's mean rows/s over
the engine's mean. A pipeline does at least level 4's work, so level 4's ratio bounds the pipeline's from above.
The table goes to ``bench/results/pipeline_ceiling_<task>.txt``.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import zarr

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from survey_infer.bundle import default_bundle_path, load_bundle  # noqa: E402
from survey_infer.config import available_cores  # noqa: E402
from survey_infer.engines import make_engine  # noqa: E402
from survey_infer.store import IMAGE_ARRAY, open_cutouts, read_columns  # noqa: E402
from survey_infer.tasks import get_task  # noqa: E402
from survey_infer.trust import bundle_trust  # noqa: E402
from survey_infer.worker import batch_results, keep_freed_memory, limit_blas_threads  # noqa: E402

RESULTS = REPO / "bench" / "results"
LEVELS = ("engine", "+ read", "+ row work", "+ outputs")
IN_MEMORY_BATCHES = 16  # the engine level cycles through this many prepared batches


class Ceiling:
    """The store, bundle, task and engines of one measurement, and one batch's work at each level."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.task = get_task(args.task)
        self.bundle = load_bundle(args.bundle or default_bundle_path(args.task))
        self.store, self.batch = args.store, args.batch
        info = open_cutouts(self.store)
        self.images = zarr.open_group(str(self.store), mode="r")[IMAGE_ARRAY]  # opened once, as a unit does
        self.n_rows = min(args.rows or info.n_rows, info.n_rows) // self.batch * self.batch
        wanted = [c for c in self.task.input_columns(self.bundle) if c in info.columns]
        self.columns = read_columns(self.store, 0, self.n_rows, wanted)
        for name in self.task.input_columns(self.bundle):
            self.columns.setdefault(name, np.full(self.n_rows, np.nan))
        self.trust = bundle_trust(self.bundle)
        precision = {"precision": args.precision} if args.precision != "fp32" else {}
        self.engines = [make_engine(args.engine, self.bundle, threads=1, device="cpu", **precision)
                        for _ in range(args.sessions)]  # fmt: skip
        self.in_memory = [self._prepared(s)[0] for s in range(0, IN_MEMORY_BATCHES * self.batch, self.batch)]
        self.arrays_store = self._create_array_outputs(workdir)

    def _create_array_outputs(self, workdir: Path) -> Path | None:
        from survey_infer.array_outputs import create_row_arrays

        outputs = self.task.array_outputs(self.bundle) if self.task.array_store else []
        if not outputs:
            return None
        store = workdir / self.task.array_store
        bounds = tuple((s, s + self.batch) for s in range(0, self.n_rows, self.batch))
        create_row_arrays(store, outputs, self.n_rows, bounds, {}, rows_per_read=self.batch)
        return store

    def _batch_columns(self, start: int) -> dict[str, np.ndarray]:
        return {k: v[start : start + self.batch] for k, v in self.columns.items()}

    def _prepared(self, start: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        images = np.ascontiguousarray(self.images[start : start + self.batch], dtype=np.float32)
        inputs, flags = self.task.prepare(images, self._batch_columns(start), self.bundle)
        return inputs, flags, images

    def step(self, level: str, engine, index: int) -> None:
        """One batch (the ``index``-th of the store) at ``level``."""
        if level == "engine":
            engine.run(self.in_memory[index % len(self.in_memory)])
            return
        start = index * self.batch
        inputs, flags, images = self._prepared(start)
        outputs = engine.run(inputs)
        if level == "+ read":
            return
        columns = self._batch_columns(start)
        results, _ = batch_results(self.task, self.bundle, self.trust, images, columns, outputs, flags, None)
        if level == "+ outputs" and self.arrays_store is not None:
            from survey_infer.array_outputs import RowArrayWriter

            streamed = self.task.batch_row_arrays(self.bundle)
            writer = RowArrayWriter(self.arrays_store, start, start + self.batch)
            writer.add(columns["object_id"] if "object_id" in columns else np.arange(start, start + self.batch),
                       {k: results[k] for k in streamed})  # fmt: skip
            writer.close()

    def rows_per_second(self, level: str) -> float:
        """All of the store's batches at ``level``, shared out to one thread per engine session."""
        batches = itertools.count()
        n_batches = self.n_rows // self.batch
        errors: list[BaseException] = []

        def drive(engine) -> None:
            try:
                while (index := next(batches)) < n_batches:
                    self.step(level, engine, index)
            except BaseException as exc:  # re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=drive, args=(engine,)) for engine in self.engines]
        tick = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return self.n_rows / (time.perf_counter() - tick)


def measure(ceiling: Ceiling, rounds: int, report: Callable[[str], None]) -> dict[str, list[float]]:
    """Rows/s of each level, ``rounds`` times, each level preceded by the engine alone."""
    for engine in ceiling.engines:  # warm-up: allocations, kernel selection
        engine.run(ceiling.in_memory[0])
    levels = [lv for lv in LEVELS if lv != "+ outputs" or ceiling.arrays_store is not None]
    measured: dict[str, list[float]] = {level: [] for level in levels}
    for _ in range(rounds):
        for level in levels[1:]:
            for current in ("engine", level):
                measured[current].append(ceiling.rows_per_second(current))
                report(f"  {current:<12} {measured[current][-1]:9.1f} rows/s")
    measured["engine"].append(ceiling.rows_per_second("engine"))
    return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--store", type=Path, required=True, help="a cutouts store of the task (e.g. the benches' mocks)")
    parser.add_argument("--bundle", type=Path, default=None, help="default: the task's shipped bundle")
    parser.add_argument("--engine", default="onnxruntime", choices=["onnxruntime", "torch"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    parser.add_argument("--batch", type=int, default=256, help="rows a batch (the pipeline's read batch)")
    parser.add_argument("--rows", type=int, default=None, help="rows of the store to use (default: all)")
    parser.add_argument("--sessions", type=int, default=available_cores(), help="1-thread sessions side by side")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()  # the workers' allocator and BLAS settings (survey_infer.worker)
    limit_blas_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="survey-infer-ceiling-"))
    try:
        ceiling = Ceiling(args, workdir)
        print(f"{args.task}: {ceiling.n_rows} rows of {args.store}, batch {args.batch}, {args.engine} {args.precision}, "
              f"{args.sessions} x 1-thread sessions")  # fmt: skip
        measured = measure(ceiling, args.rounds, print)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = table(args, ceiling, measured)
    print("\n" + text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"pipeline_ceiling_{args.task}.txt").write_text(text + "\n")
    return 0


def table(args: argparse.Namespace, ceiling: Ceiling, measured: dict[str, list[float]]) -> str:
    """The levels' rows/s, their ratio to the engine alone and the CPU a row each adds; the ceiling last."""
    reference = float(np.mean(measured["engine"]))
    lines = [f"{args.task}: {ceiling.n_rows} rows of {args.store}, batch {args.batch}, {args.engine} {args.precision}, "
             f"{args.sessions} x 1-thread sessions ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
             f"command: python bench/pipeline_ceiling.py {' '.join(shlex.quote(a) for a in args.argv)}", "",
             f"{'level':<12} {'rows/s':>9} {'vs engine':>10} {'CPU us a row':>13}  (on {args.sessions} cores, "
             f"beyond the engine's)"]  # fmt: skip
    for level, values in measured.items():
        rate = float(np.mean(values))
        extra = 1e6 * args.sessions * (1 / rate - 1 / reference)
        lines.append(f"{level:<12} {rate:9.1f} {rate / reference:10.3f} {extra:13.1f}")
    lines.append(f"ceiling {float(np.mean(list(measured.values())[-1])) / reference:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
