"""Writing a run's outputs: Parquet parts (atomic), done markers, and the run record."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from survey_infer import paths
from survey_infer.bundle import write_json_atomic
from survey_infer.errors import RefusedError
from survey_infer.tasks.base import OutputColumn

TEMP_SUFFIX = ".tmp"
BASE_COLUMNS = [
    OutputColumn("object_id", "int64", "", "object identifier from the input store"),
    OutputColumn("ra", "float64", "deg", "right ascension (ICRS)"),
    OutputColumn("dec", "float64", "deg", "declination (ICRS)"),
]


OOD_SCORE_COLUMN = OutputColumn(
    "ood_score", "float32", "",
    "out-of-distribution score (Mahalanobis distance of the network's penultimate-layer features, and of the task's "
    "input statistics where the bundle names them, from its training mocks'); above the run's threshold the row is "
    "flagged ood; null where the bundle has no trust description",
)  # fmt: skip


def catalog_schema(task_columns: list[OutputColumn], bundle_id: str, task: str, ood_score: bool = False) -> pa.Schema:
    """The schema of every part: ids and position, the task's outputs, ``ood_score`` (when asked: the cutout
    tasks' units write it on every row, survey_infer.trust), flags, bundle id; units in metadata."""
    fields = [c.field() for c in BASE_COLUMNS + task_columns + ([OOD_SCORE_COLUMN] if ood_score else [])]
    fields += [
        pa.field("flag", pa.int32(), metadata={"unit": "", "description": "bit flags, see flag_reason"}),
        pa.field("flag_reason", pa.string(), metadata={"unit": "", "description": "comma-separated flag names"}),
        pa.field("bundle_id", pa.string(), metadata={"unit": "", "description": "model bundle that made the row"}),
    ]
    units = {f.name: (f.metadata or {}).get(b"unit", b"").decode() for f in fields}
    return pa.schema(fields, metadata={"survey_infer": json.dumps({"task": task, "bundle": bundle_id, "units": units})})


def arrow_column(values, arrow_type: pa.DataType):
    """A column for ``pa.Table.from_pydict``: a numpy array with more than one axis becomes nested lists
    (``(N, S, K)`` -> list of S fixed-size lists of K), matching a task's list column type."""
    if not isinstance(values, np.ndarray) or values.ndim < 2:
        return values
    flat = pa.array(values.reshape(-1))
    for size in reversed(values.shape[1:]):
        flat = pa.FixedSizeListArray.from_arrays(flat, size)
    return flat.cast(arrow_type) if flat.type != arrow_type else flat


def write_part_atomic(out_dir: Path, unit_index: int, table: pa.Table) -> Path:
    """Write a unit's Parquet part to a temp file and rename it into place (never a half-written part)."""
    final = paths.part_path(out_dir, unit_index)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, final)
    except BaseException:  # a full disk, a quota: leave no half-written temp file taking the space
        tmp.unlink(missing_ok=True)
        raise
    return final


def remove_stale_temp_files(out_dir: Path) -> int:
    """Delete the temp files that killed units left in ``parts/`` (never read: no ``.parquet`` suffix).

    Called under the run's lock, when no unit of this run is writing; returns how many were removed.
    """
    removed = 0
    for tmp in (Path(out_dir) / paths.PARTS_DIR).glob(f".*{TEMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def write_done_marker(out_dir: Path, unit_index: int, summary: dict[str, Any]) -> None:
    write_json_atomic(paths.done_marker_path(out_dir, unit_index), summary)


def read_done_marker(out_dir: Path, unit_index: int) -> dict[str, Any] | None:
    """A unit's done marker, or None when the unit must (re)run: no marker, unreadable, or no part file."""
    marker = paths.done_marker_path(out_dir, unit_index)
    if not marker.is_file() or not paths.part_path(out_dir, unit_index).is_file():
        return None
    try:
        summary = json.loads(marker.read_text())
        # A part damaged after its unit finished (a disk error, a partial copy) is redone, not trusted.
        if pq.read_metadata(paths.part_path(out_dir, unit_index)).num_rows != summary.get("rows"):
            return None
        return summary
    except (OSError, ValueError, AttributeError, pa.ArrowException):  # JSONDecodeError is a ValueError
        return None


def read_run_record(out_dir: Path) -> dict[str, Any] | None:
    record = paths.run_record_path(out_dir)
    if not record.is_file():
        return None
    try:
        return json.loads(record.read_text())
    except json.JSONDecodeError:
        return None


def write_run_record(out_dir: Path, record: dict[str, Any]) -> None:
    write_json_atomic(paths.run_record_path(out_dir), _jsonable(record))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def check_output_dir(out_dir: Path, identity: dict[str, str], overwrite: bool) -> bool:
    """Refuse an output path that is a file or holds another run; return True when resuming this run.

    ``identity`` names the input and bundle (their fingerprints). Nothing is changed here: clearing a
    directory for ``--overwrite`` happens in `prepare_output_dir`, after every other check has passed.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise RefusedError(f"output path {out_dir} is a file; a directory was expected")
    if not out_dir.exists() or not [p for p in out_dir.iterdir() if p.name != paths.RUN_LOCK]:
        return False
    previous = read_run_record(out_dir)
    if previous is None:
        _refuse_if_locked(out_dir)  # another run is setting the directory up: say so, not "not empty"
        if overwrite:
            return False
        raise RefusedError(f"output directory {out_dir} is not empty and holds no {paths.RUN_RECORD}; "
                           "give an empty or new directory, or --overwrite")  # fmt: skip
    same = previous.get("identity") == identity
    if same and not overwrite:
        return True
    if not same and not overwrite:
        differs = [k for k in identity if previous.get("identity", {}).get(k) != identity[k]]
        raise RefusedError(
            f"output directory {out_dir} holds a run of a different {' and '.join(differs)}; "
            "use another directory or --overwrite to replace it"
        )
    return False


_HELD_LOCKS: set[Path] = set()  # output directories whose run lock this process holds (output_lock)


def _refuse_if_locked(out_dir: Path) -> None:
    """Refuse (exit 2) while another run holds ``out_dir/run.lock``; checks without waiting or keeping it."""
    lock_path = out_dir / paths.RUN_LOCK
    if not lock_path.exists() or Path(out_dir).resolve() in _HELD_LOCKS:
        return
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout as exc:
        raise RefusedError(f"another survey-infer run is writing to {out_dir} (it holds {lock.lock_file})") from exc
    except OSError:
        return  # unreadable: the checks that follow say what is wrong
    lock.release()


@contextlib.contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir/run.lock`` for the run; refuse (exit 2) while another run holds it."""
    lock = FileLock(out_dir / paths.RUN_LOCK)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout as exc:
        raise RefusedError(f"another survey-infer run is writing to {out_dir} (it holds {lock.lock_file})") from exc
    except OSError as exc:  # read-only file system, no permission, a file in the way
        raise RefusedError(f"output directory {out_dir} cannot be written: {exc}") from exc
    held = Path(out_dir).resolve()
    _HELD_LOCKS.add(held)
    try:
        yield
    finally:
        _HELD_LOCKS.discard(held)
        lock.release()


def prepare_output_dir(out_dir: Path, resume: bool, array_store: str | None = None) -> None:
    """Create the output layout; without ``resume``, clear what a previous run left (its array store too)."""
    if not resume and out_dir.exists():
        for name in (paths.PARTS_DIR, paths.DONE_DIR, paths.CATALOG_DIR, paths.RUN_RECORD, array_store):
            if name is None:
                continue
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    for sub in (paths.PARTS_DIR, paths.DONE_DIR):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out_dir)
