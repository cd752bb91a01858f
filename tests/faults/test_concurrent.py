"""Two `survey-infer run` processes started at once on one output directory: one runs, the other refuses.

The units of both runs are held at a gate in the workers (a file the test creates) until the loser has
exited, so the two really overlap whichever wins the lock: the loser must refuse (exit 2, naming the lock)
and write nothing, the winner finishes every row exactly once, and a third run finds nothing left to do.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.faults.helpers import (
    assert_rows_exactly_once,
    case_params,
    install_worker_fault,
    n_units,
    record,
    run_argv,
    run_cli,
    store_ids,
    wait_for,
)


@pytest.mark.parametrize("case", case_params(), indirect=True)
def test_two_runs_started_at_once_one_refuses(client, case, tmp_path):
    out, gate = tmp_path / "out", tmp_path / "gate"
    client.run(install_worker_fault, "gate", -1, str(gate))
    argv = run_argv(case, out, "--no-catalog", "--scheduler", client.scheduler.address)
    runs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        wait_for(lambda: any(p.poll() is not None for p in runs), 120, "one of the two runs to end")
        loser = next(p for p in runs if p.poll() is not None)
        winner = next(p for p in runs if p is not loser)
        assert winner.poll() is None, "both runs ended while the units were held"
        loser_err = loser.communicate()[1]
        assert loser.returncode == 2, loser_err
        assert f"refused: another survey-infer run is writing to {out}" in loser_err
        assert record(out)["status"] == "running"  # the winner's record, untouched by the loser
    except BaseException:
        gate.touch()
        for run in runs:  # a failed check must not leave a run going on into the next test's cluster
            run.kill()
            run.wait()
        raise
    gate.touch()  # let the winner's units through
    winner_out, winner_err = winner.communicate(timeout=240)
    assert winner.returncode == 0, winner_err
    assert record(out)["units"]["done"] == n_units(case) and record(out)["failures"] == []
    assert_rows_exactly_once(out, store_ids(case.store))

    third = run_cli(argv)
    assert third.returncode == 0, third.stderr
    assert record(out)["units"]["skipped"] == n_units(case) and record(out)["units"]["ran"] == 0
    assert_rows_exactly_once(out, store_ids(case.store))
