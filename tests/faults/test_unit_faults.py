"""Faults inside units and on disk: a unit that raises, a truncated Zarr chunk, a full disk, a read-only output
directory, Parquet parts left half written.

After each: exit 1 with exactly the failed units in run.json `failures` and on stderr (or exit 2 for what can
be refused before any work), every part whole, and the same command again finishes the job exactly once.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from survey_infer.cli import main
from tests.conftest import tree_snapshot
from tests.faults.helpers import (
    FaultCase,
    assert_arrays_whole,
    assert_parts_sound,
    assert_rows_exactly_once,
    case_params,
    install_worker_fault,
    n_units,
    object_id_at,
    part_ids,
    record,
    remove_worker_faults,
    set_file_size_limit,
    store_ids,
    temp_files,
    truncate_in_half,
    unit_rows,
)


def _argv(case: FaultCase, out: Path, client, *extra: str) -> list[str]:
    return case.argv(out, "--no-catalog", "--scheduler", client.scheduler.address, *extra)


def _assert_only_unit_failed(case: FaultCase, out: Path, unit: int, error: str, stderr: str, intact: Path | None = None) -> None:
    """Only ``unit`` failed, said in run.json and on stderr; every other row is in the parts exactly once.
    ``intact``: an undamaged copy of the case's store to read the object ids from."""
    rows = list(unit_rows(case, unit))
    failed = record(out)
    assert failed["status"] == "failed"
    assert failed["units"]["failed"] == 1 and failed["units"]["done"] == n_units(case) - 1
    assert [f["unit"] for f in failed["failures"]] == [unit] and failed["failures"][0]["rows"] == rows
    assert error in failed["failures"][0]["error"]
    assert f"FAILED unit {unit} rows {rows}: " in stderr and error in stderr
    intact = intact or case.store
    ids = store_ids(intact)
    lost = set(int(object_id_at(intact, r)) for r in range(*rows))
    assert set(part_ids(out).tolist()) == set(ids.tolist()) - lost  # every other row exactly once


@pytest.mark.parametrize("case", case_params(), indirect=True)
def test_a_unit_that_raises_is_recorded_then_finished_by_the_same_command(client, case, tmp_path, capsys):
    out, unit = tmp_path / "out", 1
    marker = object_id_at(case.store, unit_rows(case, unit)[0])
    client.run(install_worker_fault, "raise", unit, str(tmp_path / "flag"), False, marker)
    argv = _argv(case, out, client, "--retries", "1")
    assert main(argv) == 1
    _assert_only_unit_failed(case, out, unit, f"RuntimeError: injected fault in the unit holding object {marker}",
                             capsys.readouterr().err)  # fmt: skip
    client.run(remove_worker_faults)  # the cause is gone: the same command finishes the job
    assert main(argv) == 0
    assert record(out)["units"]["ran"] == 1 and record(out)["units"]["skipped"] == n_units(case) - 1
    assert_rows_exactly_once(out, store_ids(case.store))


@pytest.mark.parametrize("case", case_params(), indirect=True)
def test_a_unit_that_raises_once_is_retried(client, case, tmp_path):
    out, flag = tmp_path / "out", tmp_path / "flag"
    marker = object_id_at(case.store, unit_rows(case, 1)[0])
    client.run(install_worker_fault, "raise", 1, str(flag), True, marker)
    assert main(_argv(case, out, client, "--retries", "1")) == 0
    assert flag.exists() and record(out)["failures"] == []
    assert_rows_exactly_once(out, store_ids(case.store))


def _chunk_of_unit_1(case: FaultCase) -> Path:
    """A chunk only unit 1 reads: tile 1's image, cube 1's flux, or the object_id column's block of rows 64-127."""
    if case.kind == "tiles":
        return case.store / "tiles" / "tile-00001" / "image" / "c" / "0" / "0" / "0"
    if case.kind == "ifu":
        return case.store / "cubes" / "mock0001" / "flux" / "c" / "0" / "0" / "0"
    return case.store / "object_id" / "c" / "1"


@pytest.mark.parametrize("case", ["tiles", "ifu", "cutouts"], indirect=True)
def test_a_truncated_chunk_fails_its_unit_then_a_repaired_store_finishes(client, case, tmp_path, capsys):
    copy = case.with_store(Path(shutil.copytree(case.store, tmp_path / case.store.name)))
    chunk = _chunk_of_unit_1(copy)
    original = truncate_in_half(chunk)
    out = tmp_path / "out"
    argv = _argv(copy, out, client, "--retries", "0")
    assert main(argv) == 1
    err = capsys.readouterr().err
    _assert_only_unit_failed(copy, out, 1, "Error", err, intact=case.store)  # a codec's error: "...decompression..."
    assert_parts_sound(out)
    chunk.write_bytes(original)  # repaired (the store's identity is its metadata, so this is a resume)
    assert main(argv) == 0
    assert record(out)["units"]["ran"] == 1
    assert_rows_exactly_once(out, store_ids(case.store))


# Chunks that the store's validation reads before any work: a damaged one is refused (exit 2) naming its column.
# (A kinematics store's validation reads every column, so any damaged chunk of it is refused so.)
DAMAGED_BEFORE_WORK = {
    "tiles": ("sources/tile/c/0", "column 'sources/tile' in"),
    "kinematics": ("galaxies/distance_mpc/c/1", "column 'distance_mpc' in group 'galaxies' of"),
    "kinematics-stars": ("stars/v_los/c/0", "column 'v_los' in group 'stars' of"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGED_BEFORE_WORK))
def test_a_truncated_index_chunk_is_refused_before_any_work(client, damage, tmp_path, capsys, request):
    case = request.getfixturevalue("case_" + damage.split("-")[0])
    copy = case.with_store(Path(shutil.copytree(case.store, tmp_path / case.store.name)))
    chunk, message = DAMAGED_BEFORE_WORK[damage]
    truncate_in_half(copy.store / chunk)
    out = tmp_path / "out"
    assert main(_argv(copy, out, client)) == 2
    err = capsys.readouterr().err
    assert message in err and "cannot be read" in err and "Traceback" not in err
    assert tree_snapshot(out) == {}


@pytest.mark.parametrize("case", case_params(), indirect=True)
def test_a_full_disk_fails_every_unit_without_leaving_temp_files(client, case, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _argv(case, out, client, "--retries", "0")
    client.run(set_file_size_limit, 1024)  # done markers fit, Parquet parts do not
    try:
        assert main(argv) == 1
    finally:
        client.run(set_file_size_limit, None)
    err = capsys.readouterr().err
    failed = record(out)
    assert sorted(f["unit"] for f in failed["failures"]) == list(range(n_units(case)))
    assert all("File too large" in f["error"] for f in failed["failures"])
    assert err.count("FAILED unit") == n_units(case)
    assert list((out / "parts").iterdir()) == [] and list((out / "done").iterdir()) == []  # no half parts, no tmp
    assert main(argv) == 0  # space again: the same command finishes the job
    assert_rows_exactly_once(out, store_ids(case.store))


def _writes_are_refused(directory: Path) -> bool:
    probe = directory / ".probe"
    try:
        probe.write_text("x")
    except PermissionError:
        return True
    probe.unlink()
    return False


def test_a_read_only_output_directory_is_refused(client, noise_store, tiny_bundle, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        if not _writes_are_refused(out):
            pytest.skip("running as root (or with CAP_DAC_OVERRIDE): chmod does not stop writes here; the "
                        "full-disk and unwritable-path tests cover a refused write")  # fmt: skip
        assert main(_argv(FaultCase("cutouts", noise_store, "mass_to_light", tiny_bundle), out, client)) == 2
        assert f"output directory {out} cannot be written" in capsys.readouterr().err
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o755)


def test_an_output_path_that_cannot_be_created_is_refused(client, noise_store, tiny_bundle, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = blocker / "out"
    assert main(_argv(FaultCase("cutouts", noise_store, "mass_to_light", tiny_bundle), out, client)) == 2
    assert f"output directory {out} cannot be written" in capsys.readouterr().err
    assert blocker.read_text() == "not a directory"


@pytest.mark.parametrize("case", case_params(), indirect=True)
def test_half_written_parts_are_redone(client, case, tmp_path):
    out = tmp_path / "out"
    argv = _argv(case, out, client)
    assert main(argv) == 0
    parts, done = out / "parts", out / "done"
    # unit 1 killed inside the Parquet writer: its temp file half written, no part, no marker
    whole = (parts / "unit-0000001.parquet").read_bytes()
    (parts / ".unit-0000001.parquet.0123abcd.tmp").write_bytes(whole[: len(whole) // 2])
    (parts / "unit-0000001.parquet").unlink()
    (done / "unit-0000001.json").unlink()
    # unit 2 written in place by a non-atomic copy, then killed: a half part, no marker
    truncate_in_half(parts / "unit-0000002.parquet")
    (done / "unit-0000002.json").unlink()
    # unit 3's part damaged after it finished (its marker says done)
    truncate_in_half(parts / "unit-0000003.parquet")
    assert main(argv) == 0
    finished = record(out)
    assert finished["units"]["ran"] == 3 and finished["units"]["skipped"] == n_units(case) - 3
    assert temp_files(out) == []
    assert_rows_exactly_once(out, store_ids(case.store))
    assert_arrays_whole(case, out)  # and every part reads whole
