"""The batch job: validate, plan the units, stream them through a Dask cluster, record the run.

`run_pipeline(config, client)` takes a `distributed.Client`, so the same code runs in tests, on a GPU node
and on a batch cluster. Everything that can refuse the job (task, engine, bundle, store, output directory)
is checked before anything is written. Units that already have a done marker are skipped, so a killed run
started again finishes with every input row exactly once.
"""

from __future__ import annotations

import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from distributed import Client, as_completed
from tqdm import tqdm

import survey_infer
from survey_infer import paths
from survey_infer.array_outputs import create_group_store, create_row_arrays, remove_temp_groups
from survey_infer.bundle import Bundle, default_bundle_path, load_bundle
from survey_infer.config import RunConfig
from survey_infer.errors import RefusedError, StoreError
from survey_infer.outputs import (
    check_output_dir,
    output_lock,
    prepare_output_dir,
    read_done_marker,
    remove_stale_temp_files,
    write_run_record,
)
from survey_infer.store import CutoutStoreInfo, check_positions, open_cutouts, store_kind
from survey_infer.tasks import Task, get_task
from survey_infer.kinematics import KinematicsStoreInfo, open_kinematics
from survey_infer.tiles import TilesStoreInfo, cutting_summary, open_tiles
from survey_infer.trust import resolve_threshold
from survey_infer.worker import PLUGIN_NAME, EngineKey, EnginePlugin, UnitSpec, process_unit

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED = 0, 1
TILE_ROWS_PER_READ = 256  # sources cut per batch from a tile
InputStore = CutoutStoreInfo | TilesStoreInfo | KinematicsStoreInfo


@dataclass
class RunPlan:
    """A validated job: its bundle, store, units and which of them are already done."""

    config: RunConfig
    bundle: Bundle
    store: InputStore
    spec: UnitSpec
    identity: dict[str, str]
    resume: bool
    n_units: int
    task: Task | None = None
    trust: dict[str, Any] = field(default_factory=dict)
    done: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def todo(self) -> list[int]:
        return [u for u in range(self.n_units) if u not in self.done]


@dataclass
class RunResult:
    exit_code: int
    record: dict[str, Any]


def _rows_per_unit(config: RunConfig, info: CutoutStoreInfo) -> int:
    rows = config.rows_per_unit or info.rows_per_block
    if rows % info.rows_per_block:
        raise RefusedError(
            f"--rows-per-unit {rows} is not a multiple of the store's {info.rows_per_block}-row blocks "
            f"(array 'images' in {info.path}); units must not share a block"
        )
    return rows


def open_input(config: RunConfig, task: Task) -> InputStore:
    """Open and validate the run's input store, of a kind the task can read (a cutout task also reads tiles)."""
    kind = store_kind(config.input)
    readable = {"cutouts": ("cutouts", "tiles")}.get(task.store_kind, (task.store_kind,))
    if kind not in readable:
        raise StoreError(f"task {task.name} reads {' or '.join(readable)} stores; {config.input} is a {kind!r} store")
    if kind == "cutouts":
        info = open_cutouts(config.input)
        check_positions(info)
        return info
    if kind == "tiles":
        if config.rows_per_unit:
            raise RefusedError("--rows-per-unit does not apply to a tiles store: one unit is one tile")
        return open_tiles(config.input)
    if kind == "kinematics":  # rows are galaxies; a unit is a block of them (--rows-per-unit galaxies)
        return open_kinematics(config.input)
    if kind == "ifu":  # rows are cubes; a unit is one cube
        if config.rows_per_unit:
            raise RefusedError("--rows-per-unit does not apply to an ifu store: one unit is one cube")
        from survey_infer.ifu import open_ifu

        return open_ifu(config.input)
    raise StoreError(f"task {task.name} needs a {kind!r} store, which this version cannot read")


def _units(config: RunConfig, info: InputStore) -> tuple[tuple[tuple[int, int], ...], int]:
    """Each unit's row range, and the rows read per batch."""
    if info.unit_bounds is not None:
        return info.unit_bounds, getattr(info, "batch_rows", TILE_ROWS_PER_READ)
    rows_per_unit = _rows_per_unit(config, info)
    starts = range(0, info.n_rows, rows_per_unit)
    return tuple((s, min(s + rows_per_unit, info.n_rows)) for s in starts), min(info.rows_per_read, rows_per_unit)


def plan_run(config: RunConfig) -> RunPlan:
    """Check everything that can refuse the job and decide which units are left; writes nothing."""
    task = get_task(config.task)
    if config.task_options:
        task = task.with_options(config.task_options)
    bundle = load_bundle(config.bundle or default_bundle_path(task.name), task=task.name)
    info = open_input(config, task)
    cut = task.check_store(info, bundle)
    unit_bounds, rows_per_read = _units(config, info)
    trust = resolve_threshold(bundle, config.ood_threshold)
    identity = {"input": info.fingerprint(), "bundle": bundle.sha256()}
    if config.ood_threshold is not None:  # parts flagged at another threshold must not be mixed in by a resume
        identity["ood_threshold"] = repr(config.ood_threshold)
    if config.task_options:  # parts written with other options must not be mixed in by a resume
        identity["task_options"] = repr(sorted(config.task_options.items()))
    resume = check_output_dir(config.output, identity, config.overwrite)
    engine_key = EngineKey(str(bundle.path.resolve()), config.engine, config.resolved_engine_threads(), config.device,
                           config.precision)  # fmt: skip
    spec = UnitSpec(
        task=task.name, store=str(info.path.resolve()), store_kind=info.kind,
        columns_path=str(info.columns_path.resolve()), out_dir=str(config.output.resolve()), engine_key=engine_key,
        unit_bounds=unit_bounds, rows_per_read=rows_per_read, columns=tuple(task.input_columns(bundle)),
        available_columns=tuple(info.columns), unit_tiles=getattr(info, "unit_tiles", ()), cut=cut,
        id_column=getattr(info, "id_column", "object_id"),
        task_options=tuple(sorted((config.task_options or {}).items())),
        ood_threshold=trust.get("threshold"), array_store=task.array_store,
    )  # fmt: skip
    plan = RunPlan(config, bundle, info, spec, identity, resume, len(unit_bounds), task=task, trust=trust)
    if resume:
        for unit in range(plan.n_units):
            marker = read_done_marker(config.output, unit)
            if marker is not None and marker.get("rows") == spec.rows(unit)[1] - spec.rows(unit)[0]:
                plan.done[unit] = marker
    return plan


def _base_record(plan: RunPlan, started: float) -> dict[str, Any]:
    config = plan.config
    return {
        "status": "running",
        "task": plan.spec.task,
        "identity": plan.identity,
        "bundle": {"id": plan.bundle.id, "sha256": plan.identity["bundle"], "path": str(plan.bundle.path.resolve()),
                   "files": plan.bundle.meta["files"]},
        "input": {"path": str(plan.store.path.resolve()), "kind": plan.store.kind, "rows": plan.store.n_rows,
                  **plan.store.describe(), "fingerprint": plan.identity["input"]},
        "config": config.to_record(),
        "code_version": survey_infer.__version__,
        "python": sys.version.split()[0],
        "host": platform.node(),
        "started": datetime.fromtimestamp(started, timezone.utc).isoformat(),
    }  # fmt: skip


def _submit_bounded(
    client: Client, plan: RunPlan, on_done: Callable[[int, dict | None, str | None], None]
) -> None:
    """Submit the units left with at most ``max_in_flight`` unfinished; report each as it ends."""
    todo = iter(plan.todo)
    limit = plan.config.resolved_max_in_flight()
    token = plan.identity["input"][:8] + plan.identity["bundle"][:8]

    def submit(unit: int):
        future = client.submit(process_unit, plan.spec, unit, key=f"survey-infer-{token}-{paths.unit_name(unit)}",
                               retries=plan.config.retries, pure=False)  # fmt: skip
        future.unit = unit
        return future

    pending = as_completed([submit(u) for _, u in zip(range(limit), todo)], with_results=False)
    for future in pending:
        if future.status == "finished":
            on_done(future.unit, future.result(), None)
        else:
            error = future.exception()
            on_done(future.unit, None, f"{type(error).__name__}: {error}")
        future.release()
        next_unit = next(todo, None)
        if next_unit is not None:
            pending.add(submit(next_unit))


def run_pipeline(config: RunConfig, client: Client, plan: RunPlan | None = None) -> RunResult:
    """Run the job on ``client``; return the exit code (0 done, 1 some unit failed) and the run record.

    ``plan``, from an earlier `plan_run(config)`, says the job was already checked (the CLI checks before it
    starts a cluster); without it, the job is checked here before the output directory is touched.
    """
    started = time.time()
    if plan is None:
        plan_run(config)
    with output_lock(config.output):
        # Plan again under the lock: another run may have finished units since ``plan`` was made.
        return _run_locked(config, client, plan_run(config), started)


def _prepare_array_store(plan: RunPlan) -> dict[str, Any] | None:
    """Create the task's array store before any unit writes into it; what run.json says of it."""
    task, spec = plan.task, plan.spec
    if task is None or task.array_store is None:
        return None
    store = Path(spec.out_dir) / task.array_store
    outputs = task.array_outputs(plan.bundle)
    attrs = {"task": task.name, "bundle": plan.bundle.id}
    if outputs:
        create_row_arrays(store, outputs, plan.store.n_rows, spec.unit_bounds, attrs, spec.rows_per_read)
    else:
        create_group_store(store, attrs)
    return {"path": str(store), "layout": "rows" if outputs else "groups", "arrays": [o.name for o in outputs]}


def _run_locked(config: RunConfig, client: Client, plan: RunPlan, started: float) -> RunResult:
    prepare_output_dir(config.output, plan.resume, array_store=plan.spec.array_store)
    record = _base_record(plan, started)
    arrays = _prepare_array_store(plan)
    if arrays is not None:
        record["arrays"] = arrays
    write_run_record(config.output, record)

    client.register_plugin(EnginePlugin(plan.spec.engine_key), name=PLUGIN_NAME)
    summaries: dict[int, dict] = {}
    failures: list[dict[str, Any]] = []
    bar = tqdm(total=plan.n_units, initial=len(plan.done), unit="unit", desc=f"{plan.spec.task}",
               disable=not config.progress, file=sys.stderr, dynamic_ncols=True)  # fmt: skip

    def on_done(unit: int, summary: dict | None, error: str | None) -> None:
        if summary is not None:
            summaries[unit] = summary
        else:
            failures.append({"unit": unit, "rows": list(plan.spec.rows(unit)), "error": error})
            log.error("unit %s failed after %d retries: %s", unit, config.retries, error)
        bar.update(1)

    units_started = time.time()
    _submit_bounded(client, plan, on_done)
    bar.close()
    remove_stale_temp_files(config.output)  # left by units killed mid-write and then redone
    remove_temp_groups(config.output)
    units_seconds = time.time() - units_started

    catalog_seconds = 0.0
    catalog_error = None
    if config.build_catalog and not failures:
        from survey_infer.hats_catalog import build_hats_catalog

        tick = time.time()
        try:
            build_hats_catalog(config.output, client, progress=False)
        except Exception as exc:  # recorded, and the exit status says so
            catalog_error = f"{type(exc).__name__}: {exc}"
        catalog_seconds = time.time() - tick

    finished = {**plan.done, **summaries}
    rows_out = sum(s["rows"] for s in finished.values())
    engines = {s["engine"]["name"]: s["engine"] for s in summaries.values()}
    ok = not failures and catalog_error is None
    record.update(
        status="complete" if ok else "failed",
        engine=next(iter(engines.values())) if len(engines) == 1 else (list(engines.values()) or None),
        units={"total": plan.n_units, "done": len(finished), "failed": len(failures), "skipped": len(plan.done),
               "ran": len(summaries)},
        rows={"in": plan.store.n_rows, "out": rows_out, "flagged": sum(s["flagged"] for s in finished.values())},
        failures=failures,
        trust={**plan.trust, "rows_flagged_ood": sum(s.get("ood", 0) for s in finished.values())},
        catalog={"path": str(paths.catalog_path(config.output)) if config.build_catalog and ok else None,
                 "error": catalog_error},
        timings={"seconds": round(time.time() - started, 3), "units_seconds": round(units_seconds, 3),
                 "catalog_seconds": round(catalog_seconds, 3),
                 "rows_per_second": round(sum(s["rows"] for s in summaries.values()) / max(units_seconds, 1e-9), 1),
                 "worker_infer_seconds": round(sum(s["infer_seconds"] for s in summaries.values()), 3)},
        finished=datetime.now(timezone.utc).isoformat(),
    )  # fmt: skip
    if plan.spec.cut is not None:
        record["input"]["cutting"] = cutting_summary(plan.spec.cut, finished.values())
    write_run_record(config.output, record)
    return RunResult(EXIT_OK if ok else EXIT_FAILED, record)
