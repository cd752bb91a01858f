"""Bad input is refused before any work: a clear message naming what is wrong, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from survey_infer.cli import main
from survey_infer.store import create_cutouts_store, write_block
from tests.conftest import make_tiny_bundle, tree_snapshot


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def refused(capsys, store: Path, out: Path, bundle: Path, *extra: str, task: str = "mass_to_light") -> str:
    """Run the CLI, assert exit 2 and that nothing under ``out`` changed; return the message."""
    before = tree_snapshot(out)
    code, message = run_cli(capsys, "run", task, "--input", str(store), "--output", str(out), "--bundle",
                            str(bundle), "--engine", "torch", "--no-progress", *extra)  # fmt: skip
    assert code == 2, message
    assert "refused" in message
    assert tree_snapshot(out) == before
    return message


def cutouts_store(path: Path, n: int = 8, shape=(1, 69, 69), dtype="float32", **extra_columns) -> zarr.Group:
    group = create_cutouts_store(path, n, shape, {}, survey={"bands": ["g"]}, rows_per_unit=4, rows_per_batch=2,
                                 image_dtype=dtype)  # fmt: skip
    write_block(group, 0, np.zeros((n, *shape), dtype=dtype),
                {"object_id": np.arange(n), "ra": np.zeros(n), "dec": np.zeros(n)})  # fmt: skip
    return group


def test_store_path_that_does_not_exist(capsys, tmp_path, tiny_bundle):
    message = refused(capsys, tmp_path / "nowhere.zarr", tmp_path / "out", tiny_bundle)
    assert "nowhere.zarr does not exist" in message


def test_zarr_group_that_is_no_survey_infer_store(capsys, tmp_path, tiny_bundle):
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", zarr_format=3).attrs["hello"] = 1
    message = refused(capsys, tmp_path / "plain.zarr", tmp_path / "out", tiny_bundle)
    assert "not a survey-infer store" in message


def test_directory_that_is_no_zarr_group(capsys, tmp_path, tiny_bundle):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    message = refused(capsys, tmp_path / "junk", tmp_path / "out", tiny_bundle)
    assert "junk" in message and "Zarr group" in message


def test_store_of_the_wrong_kind(capsys, tmp_path, tiny_bundle):
    group = zarr.open_group(str(tmp_path / "ifu.zarr"), mode="w", zarr_format=3)
    group.attrs["survey_infer"] = {"format": 1, "kind": "ifu"}
    message = refused(capsys, tmp_path / "ifu.zarr", tmp_path / "out", tiny_bundle)
    assert "reads cutouts or tiles stores" in message and "'ifu' store" in message


def test_tiles_store_without_sources(capsys, tmp_path, tiny_bundle):
    group = zarr.open_group(str(tmp_path / "tiles.zarr"), mode="w", zarr_format=3)
    group.attrs["survey_infer"] = {"format": 1, "kind": "tiles"}
    message = refused(capsys, tmp_path / "tiles.zarr", tmp_path / "out", tiny_bundle)
    assert "has no 'sources' group" in message


def test_store_of_another_format_version(capsys, tmp_path, tiny_bundle):
    group = cutouts_store(tmp_path / "v9.zarr")
    group.attrs["survey_infer"] = {"format": 9, "kind": "cutouts"}
    message = refused(capsys, tmp_path / "v9.zarr", tmp_path / "out", tiny_bundle)
    assert "format 9" in message


def test_missing_images_array(capsys, tmp_path, tiny_bundle):
    cutouts_store(tmp_path / "s.zarr")
    shutil.rmtree(tmp_path / "s.zarr" / "images")
    message = refused(capsys, tmp_path / "s.zarr", tmp_path / "out", tiny_bundle)
    assert "no 'images' array" in message


def test_wrong_image_shape_for_the_bundle(capsys, tmp_path, tiny_bundle):
    cutouts_store(tmp_path / "big.zarr", shape=(1, 128, 128))
    message = refused(capsys, tmp_path / "big.zarr", tmp_path / "out", tiny_bundle)
    assert "(1, 128, 128)" in message and "(1, 69, 69)" in message and "'images'" in message


def test_integer_images(capsys, tmp_path, tiny_bundle):
    cutouts_store(tmp_path / "int.zarr", dtype="int16")
    message = refused(capsys, tmp_path / "int.zarr", tmp_path / "out", tiny_bundle)
    assert "dtype int16" in message and "float32" in message


def test_mismatched_column_lengths(capsys, tmp_path, tiny_bundle):
    group = cutouts_store(tmp_path / "s.zarr")
    group.create_array("lum_g", shape=(5,), dtype="float64")
    message = refused(capsys, tmp_path / "s.zarr", tmp_path / "out", tiny_bundle)
    assert "column 'lum_g'" in message and "(8,)" in message


@pytest.mark.parametrize("column, value", [("ra", np.nan), ("dec", np.inf), ("dec", 91.0)])
def test_rows_without_a_sky_position(capsys, tmp_path, tiny_bundle, column, value):
    group = cutouts_store(tmp_path / "s.zarr")
    group[column][5] = value
    message = refused(capsys, tmp_path / "s.zarr", tmp_path / "out", tiny_bundle)
    assert f"column '{column}'" in message and "first rows [5]" in message


def test_missing_required_column(capsys, tmp_path, tiny_bundle):
    cutouts_store(tmp_path / "s.zarr")
    shutil.rmtree(tmp_path / "s.zarr" / "ra")
    message = refused(capsys, tmp_path / "s.zarr", tmp_path / "out", tiny_bundle)
    assert "no 'ra' column" in message


def test_unknown_task(capsys, small_store, tmp_path, tiny_bundle):
    message = refused(capsys, small_store, tmp_path / "out", tiny_bundle, task="galaxy_zoo")
    assert "unknown task 'galaxy_zoo'" in message and "mass_to_light" in message


def test_unknown_engine(capsys, small_store, tmp_path, tiny_bundle):
    before = tree_snapshot(tmp_path)
    code, message = run_cli(capsys, "run", "mass_to_light", "--input", str(small_store), "--output",
                            str(tmp_path / "out"), "--bundle", str(tiny_bundle), "--engine", "warp-drive")  # fmt: skip
    assert code == 2 and "unknown engine 'warp-drive'" in message
    assert tree_snapshot(tmp_path) == before


def test_bundle_with_a_wrong_sha256(capsys, small_store, tmp_path):
    bundle = make_tiny_bundle(tmp_path / "tampered")
    with open(bundle / "weights.safetensors", "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")
    message = refused(capsys, small_store, tmp_path / "out", bundle)
    assert "weights.safetensors" in message and "sha256" in message


def test_bundle_for_another_task(capsys, small_store, tmp_path):
    bundle = make_tiny_bundle(tmp_path / "other")
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["task"] = "sfh"
    (bundle / "bundle.json").write_text(json.dumps(meta))
    message = refused(capsys, small_store, tmp_path / "out", bundle)
    assert "for task 'sfh'" in message


def test_output_path_that_is_a_file(capsys, small_store, tmp_path, tiny_bundle):
    target = tmp_path / "out.txt"
    target.write_text("keep me")
    message = refused(capsys, small_store, target, tiny_bundle)
    assert "is a file" in message
    assert target.read_text() == "keep me"


def test_rows_per_unit_that_splits_a_block(capsys, small_store, tmp_path, tiny_bundle):
    message = refused(capsys, small_store, tmp_path / "out", tiny_bundle, "--rows-per-unit", "100")
    assert "not a multiple" in message and "128" in message


def test_non_positive_worker_count(capsys, small_store, tmp_path, tiny_bundle):
    message = refused(capsys, small_store, tmp_path / "out", tiny_bundle, "--workers", "0")
    assert "--workers must be a positive integer" in message


@pytest.mark.parametrize("argv", [["run"], ["mock", "spheres", "x.zarr"]])
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_a_directory_another_run_is_setting_up_is_refused_as_locked(tmp_path):
    """Between taking the lock and writing run.json a run's directory holds no run.json: a second run must say
    that another run is writing there, while the run holding the lock still sees the usual rules."""
    from filelock import FileLock

    from survey_infer.errors import RefusedError
    from survey_infer.outputs import check_output_dir, output_lock

    out = tmp_path / "out"
    (out / "parts").mkdir(parents=True)
    with FileLock(out / "run.lock"):
        with pytest.raises(RefusedError, match="another survey-infer run is writing"):
            check_output_dir(out, {"input": "x"}, overwrite=True)
    with output_lock(out):
        assert check_output_dir(out, {"input": "x"}, overwrite=True) is False
        with pytest.raises(RefusedError, match="holds no run.json"):
            check_output_dir(out, {"input": "x"}, overwrite=False)
