"""Helpers of the fault-injection suite: stores, CLI runs, checks, and faults injected into Dask workers.

The injected faults are installed in the worker processes with ``client.run`` (they replace a function of
`survey_infer.worker` in that process only); the runtime has no test-only code path. A worker restarted by its
nanny after a SIGKILL imports the runtime afresh, without the fault.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import zarr



@dataclass(frozen=True)
class FaultCase:
    """One store kind under test: its store, the task that reads it, the bundle, and run options."""

    kind: str
    store: Path
    task: str
    bundle: Path
    options: tuple[str, ...] = ()  # extra `survey-infer run` arguments (e.g. a cheaper --task-option)

    def argv(self, out: Path, *extra: str) -> list[str]:
        """`survey-infer run` arguments (without the program) for this case into ``out``."""
        return ["run", self.task, "--input", str(self.store), "--output", str(out), "--bundle", str(self.bundle),
                "--engine", "torch", "--no-progress", *self.options, *extra]  # fmt: skip

    def with_store(self, store: Path) -> "FaultCase":
        return FaultCase(self.kind, Path(store), self.task, self.bundle, self.options)


# ------------------------------------------------------------------------------------------------ stores


def write_noise_store(path: Path, n_rows: int, rows_per_unit: int = 64, seed: int = 0) -> Path:
    """A `cutouts` store of Gaussian blobs on noise: much faster to write than the mock universe."""
    from survey_infer.store import create_cutouts_store, write_block

    rng = np.random.default_rng(seed)
    group = create_cutouts_store(path, n_rows, (1, 69, 69), {"distance_mpc": "float64", "lum_g": "float64",
                                 "size_kpc": "float64"}, survey={"name": "noise", "bands": ["g"], "pixel_scale": 0.396},
                                 rows_per_unit=rows_per_unit, rows_per_batch=rows_per_unit)  # fmt: skip
    yy, xx = np.mgrid[:69, :69] - 34.0
    for start in range(0, n_rows, rows_per_unit):
        n = min(rows_per_unit, n_rows - start)
        width = rng.uniform(2, 8, n)[:, None, None]
        images = np.exp(-(xx**2 + yy**2) / (2 * width**2)) + rng.normal(0, 0.02, (n, 69, 69))
        columns = {"object_id": np.arange(start, start + n), "ra": rng.uniform(150, 151, n),
                   "dec": rng.uniform(2, 3, n), "distance_mpc": rng.uniform(100, 300, n),
                   "lum_g": 10 ** rng.uniform(9, 11, n), "size_kpc": rng.uniform(1, 8, n)}  # fmt: skip
        write_block(group, start, images[:, None].astype(np.float32), columns)
    return Path(path)


# Parametrisations of the ``case`` fixture (tests/faults/conftest.py): the fast kinds by default, cutouts `slow`.
def case_params():
    import pytest

    return ["tiles", "kinematics", "ifu", pytest.param("cutouts", marks=pytest.mark.slow)]


ID_ARRAYS = ("sources/object_id", "galaxies/galaxy_id", "catalog/object_id", "object_id")  # tiles, kinematics, ifu, cutouts


def _id_array(store: Path) -> zarr.Array:
    group = zarr.open_group(str(store), mode="r")
    return next(group[name] for name in ID_ARRAYS if name in group)


def store_ids(store: Path) -> np.ndarray:
    """Every row id of a store (the catalog's object_id), sorted."""
    return np.sort(np.asarray(_id_array(store)[:]))


def _plan(case: FaultCase):
    from survey_infer.config import RunConfig
    from survey_infer.pipeline import plan_run

    return plan_run(RunConfig(task=case.task, input=case.store, output=case.store.parent / "_probe_out"))


def n_units(case: FaultCase) -> int:
    return _plan(case).n_units


# ---------------------------------------------------------------------------------------------- CLI runs


def run_argv(case: FaultCase, out: Path, *extra: str) -> list[str]:
    """The `survey-infer run` command line of ``case`` as a subprocess."""
    return [sys.executable, "-m", "survey_infer.cli", *case.argv(out, *extra)]


def run_cli(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    """Poll ``condition`` (a file appearing, a count reached); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended (exit {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def done_units(out: Path) -> set[int]:
    return {int(p.stem.split("-")[1]) for p in (out / "done").glob("unit-*.json")}


def record(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


# ------------------------------------------------------------------------------------------------ checks


def assert_parts_sound(out: Path) -> list[Path]:
    """Every part file is a whole Parquet file that pyarrow reads, with as many rows as its done marker says."""
    parts = sorted((out / "parts").glob("*.parquet"))
    for part in parts:
        table = pq.read_table(part)  # raises on a truncated or corrupt file
        marker = out / "done" / f"{part.stem}.json"
        if marker.is_file():
            assert json.loads(marker.read_text())["rows"] == table.num_rows, part
    return parts


def part_ids(out: Path) -> np.ndarray:
    parts = assert_parts_sound(out)
    if not parts:
        return np.array([], np.int64)
    return np.sort(pq.read_table(parts, columns=["object_id"])["object_id"].to_numpy())


def assert_rows_exactly_once(out: Path, expected_ids: np.ndarray) -> None:
    ids = part_ids(out)
    assert len(ids) == len(expected_ids), f"{len(ids)} rows in parts, {len(expected_ids)} expected"
    np.testing.assert_array_equal(ids, np.sort(expected_ids))


def assert_arrays_whole(case: FaultCase, out: Path) -> None:
    """A task's array store (sfh.zarr) holds one whole group per input row, named by its object id, and no
    temporary group is left behind."""
    if case.task != "sfh":
        return
    root = zarr.open_group(str(out / "sfh.zarr"), mode="r")
    assert sorted(int(k) for k in root.group_keys()) == sorted(store_ids(case.store).tolist())
    for key in root.group_keys():
        assert "sfh" in root[key] and root[key]["sfh"].shape[0] == 16
    assert not any((out / ".array-groups.tmp").glob("*")) if (out / ".array-groups.tmp").exists() else True


def temp_files(out: Path) -> list[Path]:
    return sorted((out / "parts").glob(".*.tmp"))


def truncate_in_half(path: Path) -> bytes:
    """Cut a file to half its size on disk; return the original bytes (to repair it later)."""
    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 2])
    return original


# ------------------------------------------------------------------------- faults injected into workers


def _claim(flag: str) -> bool:
    """True exactly once across processes: whoever creates ``flag`` first."""
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def install_worker_fault(point: str, unit: int, flag: str, once: bool = True, object_id: int = -1) -> str:
    """Run in a worker process (``client.run``): make unit ``unit`` fail at ``point``.

    points: ``kill_reading`` (SIGKILL after the unit read its first batch), ``kill_writing_part`` (a half-written
    temp part, then SIGKILL, as a unit killed inside the Parquet writer leaves it), ``kill_before_marker``
    (the part renamed into place, SIGKILL before the done marker), ``raise`` (RuntimeError in the task's
    post-processing of the batch holding ``object_id``), ``gate`` (wait for the file ``flag`` before the unit starts: a run held open).
    With ``once``, only the first process to reach the point fails (a flag file decides), so a retry succeeds.
    """
    import survey_infer.worker as worker

    originals = worker.__dict__.setdefault("_fault_originals", {})
    for name in ("unit_batches", "write_part_atomic", "write_done_marker", "get_task"):
        originals.setdefault(name, getattr(worker, name))

    def fire() -> bool:
        return _claim(flag) if once else True

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "kill_reading":
        def unit_batches(spec, unit_index, stats):
            for i, batch in enumerate(originals["unit_batches"](spec, unit_index, stats)):
                yield batch
                if unit_index == unit and i == 0 and fire():
                    die()
        worker.unit_batches = unit_batches
    elif point == "kill_writing_part":
        def write_part_atomic(out_dir, unit_index, table):
            if unit_index == unit and fire():
                part = Path(out_dir) / "parts" / f"unit-{unit_index:07d}.parquet"
                tmp = part.with_name(f".{part.name}.killed.tmp")
                pq.write_table(table, tmp)
                tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
                die()
            return originals["write_part_atomic"](out_dir, unit_index, table)
        worker.write_part_atomic = write_part_atomic
    elif point == "kill_before_marker":
        def write_done_marker(out_dir, unit_index, summary):
            if unit_index == unit and fire():
                die()
            return originals["write_done_marker"](out_dir, unit_index, summary)
        worker.write_done_marker = write_done_marker
    elif point == "raise":
        def get_task(name):
            return _RaisingTask(originals["get_task"](name), object_id, fire)
        worker.get_task = get_task
    elif point == "gate":
        def unit_batches(spec, unit_index, stats):
            while not os.path.exists(flag):
                time.sleep(0.01)
            yield from originals["unit_batches"](spec, unit_index, stats)
        worker.unit_batches = unit_batches
    else:
        raise ValueError(point)
    return point


def remove_worker_faults() -> None:
    import survey_infer.worker as worker

    for name, original in worker.__dict__.pop("_fault_originals", {}).items():
        setattr(worker, name, original)


class _RaisingTask:
    """The real task, whose post-processing raises for the batch holding object ``object_id``."""

    def __init__(self, task, object_id, fire):
        self._task, self._object_id, self._fire = task, object_id, fire

    def __getattr__(self, name):
        return getattr(self._task, name)

    def with_options(self, options):  # the run's --task-option: the configured task still raises
        return _RaisingTask(self._task.with_options(options), self._object_id, self._fire)

    def postprocess(self, outputs, columns, flags, bundle):
        if self._object_id in np.asarray(columns["object_id"]) and self._fire():
            raise RuntimeError(f"injected fault in the unit holding object {self._object_id}")
        return self._task.postprocess(outputs, columns, flags, bundle)


def set_file_size_limit(limit: int | None) -> None:
    """Run in a worker (``client.run``): a full disk, as the process sees it: writes past ``limit`` bytes fail
    with EFBIG (Python ignores SIGXFSZ). ``None`` lifts the limit again."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard if limit is None else limit, hard))


def unit_rows(case: FaultCase, unit: int) -> tuple[int, int]:
    return _plan(case).spec.rows(unit)


def object_id_at(store: Path, row: int) -> int:
    return int(_id_array(store)[row])
