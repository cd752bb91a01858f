"""SIGKILL of a Dask worker process inside a unit, at named points and at random times.

Whatever the point, the run ends with exit 0, every input row exactly once, every part whole, and no temp
file left: the killed unit is redone on the restarted (or the other) worker.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from survey_infer.config import RunConfig
from survey_infer.pipeline import run_pipeline
from tests.faults.helpers import (
    FaultCase,
    assert_arrays_whole,
    assert_rows_exactly_once,
    done_units,
    install_worker_fault,
    store_ids,
    temp_files,
    wait_for,
    write_noise_store,
)


def config_for(case: FaultCase, out, **kwargs) -> RunConfig:
    options = dict(o.split("=", 1) for o in case.options[1::2]) if case.options else None  # --task-option K=V
    return RunConfig(task=case.task, input=case.store, output=out, bundle=case.bundle, engine="torch", progress=False,
                     build_catalog=False, task_options=options, **kwargs)  # fmt: skip


POINTS = ("kill_reading", "kill_writing_part", "kill_before_marker")
# Every point on tiles; on the other kinds one point by default (the others `slow`, to keep the suite short).
KILL_CASES = [("tiles", p) for p in POINTS] + [
    (kind, p) if kind != "cutouts" and p == "kill_writing_part" else pytest.param(kind, p, marks=pytest.mark.slow)
    for kind in ("kinematics", "ifu", "cutouts") for p in POINTS
]  # fmt: skip


@pytest.mark.parametrize("case, point", KILL_CASES, indirect=["case"])
def test_worker_sigkilled_inside_a_unit(client, case, tmp_path, point):
    out, flag = tmp_path / "out", tmp_path / "fired"
    pids = set(client.run(os.getpid).values())
    client.run(install_worker_fault, point, 1, str(flag))
    result = run_pipeline(config_for(case, out, max_in_flight=2), client)
    assert flag.exists(), "the fault never fired"
    client.wait_for_workers(2, timeout=60)
    assert set(client.run(os.getpid).values()) != pids, "no worker was killed"
    record = result.record
    assert result.exit_code == 0, record["failures"]
    assert record["units"]["failed"] == 0 and record["units"]["done"] == record["units"]["total"]
    assert_rows_exactly_once(out, store_ids(case.store))
    assert_arrays_whole(case, out)
    assert temp_files(out) == []  # the half-written temp part of kill_writing_part was cleared


@pytest.mark.parametrize("seed", [0, *[pytest.param(s, marks=pytest.mark.slow) for s in range(1, 6)]])
def test_worker_sigkilled_at_a_random_time(client, tiny_bundle, tmp_path, seed):
    rng = random.Random(seed)
    store = write_noise_store(tmp_path / "noise.zarr", 1920, rows_per_unit=64, seed=seed)  # 30 units
    out = tmp_path / "out"
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(r=run_pipeline(
        config_for(FaultCase("cutouts", store, "mass_to_light", tiny_bundle), out, max_in_flight=2), client)))  # fmt: skip
    thread.start()
    after = rng.randrange(0, 15)
    wait_for(lambda: len(done_units(out)) >= after or not thread.is_alive(), 120, f"{after} units done")
    time.sleep(rng.uniform(0.0, 0.05))  # where inside the next units the kill lands: the random part
    busy: list[str] = []
    wait_for(lambda: busy.extend(a for a, keys in client.processing().items() if keys) or busy
             or not thread.is_alive(), 60, "a worker busy with a unit")  # fmt: skip
    assert thread.is_alive(), "the run ended before the kill"
    victim = rng.choice(sorted(busy))
    os.kill(client.run(os.getpid, workers=[victim])[victim], signal.SIGKILL)
    thread.join(timeout=240)
    assert not thread.is_alive()
    record = result["r"].record
    assert result["r"].exit_code == 0, record["failures"]
    assert record["units"] == {"total": 30, "done": 30, "failed": 0, "skipped": 0, "ran": 30}
    assert_rows_exactly_once(out, store_ids(store))
    assert temp_files(out) == []
