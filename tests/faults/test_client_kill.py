"""SIGKILL of the client (`survey-infer run` in its own process) at random points, then the same command again.

The first run is killed after a random number of finished units (none included) or while it builds the HATS
catalog; its worker processes must not outlive it; the same command again ends with exit 0, every input row
exactly once, whole parts (and a catalog, for the runs that build one).
"""

from __future__ import annotations

import random
import subprocess
import time

import psutil
import pytest

from tests.faults.helpers import (
    assert_rows_exactly_once,
    done_units,
    n_units,
    record,
    run_argv,
    run_cli,
    store_ids,
    temp_files,
    wait_for,
)

CASES = [("tiles", 0), ("kinematics", 0), ("ifu", 0), pytest.param("tiles", "catalog", marks=pytest.mark.slow)] + [
    pytest.param(kind, seed, marks=pytest.mark.slow) for kind in ("cutouts", "tiles") for seed in (1, 2, 3)
] + [pytest.param("cutouts", "catalog", marks=pytest.mark.slow)]  # fmt: skip


@pytest.mark.parametrize("case, seed", CASES, indirect=["case"])
def test_client_sigkilled_then_the_same_command_finishes(case, seed, tmp_path):
    out = tmp_path / "out"
    # hats-import takes ~25 s for any catalog on one thread: only the runs killed while building it build one.
    no_catalog = [] if seed == "catalog" else ["--no-catalog"]
    argv = run_argv(case, out, "--threads-per-worker", "1", "--max-in-flight", "1", *no_catalog)
    total = n_units(case)
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if seed == "catalog":  # every unit done: the client is building the catalog
        wait_for(lambda: len(done_units(out)) == total, 180, "every unit done", first)
    else:
        rng = random.Random(seed)
        after = rng.randrange(0, total - 1)
        wait_for(lambda: len(done_units(out)) >= after, 180, f"{after} units done", first)
        time.sleep(rng.uniform(0.0, 0.05))  # the random part of the kill point, not a synchronisation
    workers = psutil.Process(first.pid).children(recursive=True)
    first.kill()
    assert first.wait() == -9
    done_before = done_units(out)
    if (out / "run.json").exists():
        assert record(out)["status"] == "running", "the first run finished before the kill"
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, f"worker processes outlived the killed client: {[p.pid for p in alive]}"

    second = run_cli(argv)
    assert second.returncode == 0, second.stderr
    finished = record(out)
    assert finished["status"] == "complete" and finished["failures"] == []
    assert finished["units"]["done"] == total and finished["units"]["skipped"] >= len(done_before) - 1
    assert_rows_exactly_once(out, store_ids(case.store))
    assert temp_files(out) == []
    if no_catalog:
        return
    import lsdb

    catalog = lsdb.open_catalog(out / "catalog").compute()
    assert sorted(catalog["object_id"]) == sorted(store_ids(case.store))
