"""The pipeline's guarantees, end to end on a real LocalCluster of worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from distributed import Client, LocalCluster

from survey_infer.cli import main
from survey_infer.config import RunConfig
from survey_infer.pipeline import run_pipeline
from survey_infer.store import write_block
from tests.conftest import assert_exactly_once, make_tiny_bundle, read_parts
from training.mock import write_mock_cutouts


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            yield client


def config_for(store: Path, out: Path, bundle: Path, **kwargs) -> RunConfig:
    return RunConfig(task="mass_to_light", input=store, output=out, bundle=bundle, engine="torch", progress=False,
                     **kwargs)  # fmt: skip


def test_run_writes_every_row_once_with_record_and_hats_catalog(client, small_store, tmp_path, tiny_bundle):
    out = tmp_path / "out"
    result = run_pipeline(config_for(small_store, out, tiny_bundle), client)
    assert result.exit_code == 0
    assert_exactly_once(out, 600)
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete"
    assert record["units"] == {"total": 5, "done": 5, "failed": 0, "skipped": 0, "ran": 5}
    assert record["rows"]["in"] == record["rows"]["out"] == 600
    assert record["bundle"]["id"] == "mass_to_light-tiny-v1" and len(record["bundle"]["sha256"]) == 64
    assert record["engine"]["name"] == "torch"
    assert record["failures"] == [] and record["code_version"]
    assert record["timings"]["units_seconds"] > 0
    assert len(list((out / "done").glob("*.json"))) == 5

    schema = pq.read_schema(sorted((out / "parts").glob("*.parquet"))[0])
    assert schema.field("ml_g").metadata[b"unit"] == b"Msun/Lsun"
    assert schema.field("ra").metadata[b"unit"] == b"deg"
    table = read_parts(out)
    assert np.isfinite(table["ml_g"]).all() and (table["ml_g"] > 0).all()
    assert (table["bundle_id"] == "mass_to_light-tiny-v1").all()

    import lsdb

    catalog = lsdb.open_catalog(out / "catalog")
    everything = catalog.compute()
    assert len(everything) == 600 and set(everything["object_id"]) == set(range(600))
    ra, dec = table["ra"].to_numpy(), table["dec"].to_numpy()
    centre = (float(ra[0]), float(dec[0]))
    found = catalog.cone_search(centre[0], centre[1], radius_arcsec=1800).compute()
    separation = np.degrees(np.arccos(np.clip(
        np.sin(np.radians(dec)) * np.sin(np.radians(centre[1]))
        + np.cos(np.radians(dec)) * np.cos(np.radians(centre[1])) * np.cos(np.radians(ra - centre[0])), -1, 1)))
    assert set(found["object_id"]) == set(table["object_id"][separation < 0.5])  # fmt: skip
    assert 0 < len(found) < 600


def test_same_command_again_skips_finished_units(client, small_store, tmp_path, tiny_bundle):
    out = tmp_path / "out"
    assert run_pipeline(config_for(small_store, out, tiny_bundle), client).exit_code == 0
    (out / "done" / "unit-0000002.json").unlink()  # as if the run had died before unit 2 finished
    again = run_pipeline(config_for(small_store, out, tiny_bundle), client)
    assert again.exit_code == 0
    assert again.record["units"]["skipped"] == 4 and again.record["units"]["ran"] == 1
    assert_exactly_once(out, 600)


def test_nan_and_blank_cutouts_are_flagged_not_dropped(client, tmp_path, tiny_bundle):
    store = write_mock_cutouts(tmp_path / "bad.zarr", 256, seed=3, rows_per_unit=128, rows_per_batch=64)
    import zarr

    group = zarr.open_group(str(store), mode="r+")
    images = group["images"][0:128]
    images[5, 0, 10, 10] = np.nan  # one NaN pixel
    images[6] = np.nan  # all NaN
    images[7] = 0.0  # blank
    images[8] = 0.3  # constant
    write_block(group, 0, images, {})
    group["lum_g"][9] = np.nan  # no luminosity: ml_g is kept, log_mstar is null
    out = tmp_path / "out"
    assert run_pipeline(config_for(store, out, tiny_bundle), client).exit_code == 0
    table = read_parts(out).set_index("object_id")
    assert len(table) == 256
    assert table.loc[5, "flag_reason"] == "nan_pixels" and np.isnan(table.loc[5, "ml_g"])
    assert "nan_pixels" in table.loc[6, "flag_reason"] and "empty_cutout" in table.loc[6, "flag_reason"]
    assert table.loc[7, "flag_reason"] == "empty_cutout" and table.loc[8, "flag_reason"] == "empty_cutout"
    assert "no_luminosity" in table.loc[9, "flag_reason"] and np.isfinite(table.loc[9, "ml_g"])
    assert np.isnan(table.loc[9, "log_mstar"])
    assert (table.loc[[5, 6, 7, 8, 9], "flag"] != 0).all()
    assert (table.drop(index=[5, 6, 7, 8, 9])["flag"] == 0).all()
    record = json.loads((out / "run.json").read_text())
    assert record["rows"]["flagged"] == 5


def test_unreadable_chunk_is_retried_then_recorded_as_failed(client, tmp_path, tiny_bundle, capsys):
    store = write_mock_cutouts(tmp_path / "corrupt.zarr", 512, seed=4, rows_per_unit=128, rows_per_batch=64)
    shard = store / "images" / "c" / "2" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated file
    out = tmp_path / "out"
    code = main(["run", "mass_to_light", "--input", str(store), "--output", str(out), "--bundle", str(tiny_bundle),
                 "--engine", "torch", "--no-progress", "--retries", "1", "--scheduler", client.scheduler.address])  # fmt: skip
    assert code == 1
    assert "FAILED unit 2" in capsys.readouterr().err
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed"
    assert record["units"]["failed"] == 1 and record["units"]["done"] == 3
    assert record["failures"][0]["unit"] == 2 and record["failures"][0]["rows"] == [256, 384]
    assert "checksum" in record["failures"][0]["error"].lower() or record["failures"][0]["error"]
    ids = set(read_parts(out)["object_id"])
    assert ids == set(range(512)) - set(range(256, 384))


def test_output_of_another_run_is_refused_unless_overwrite(client, small_store, tmp_path, tiny_bundle, capsys):
    out = tmp_path / "out"
    assert run_pipeline(config_for(small_store, out, tiny_bundle), client).exit_code == 0
    other_bundle = make_tiny_bundle(tmp_path / "other", seed=1)
    argv = ["run", "mass_to_light", "--input", str(small_store), "--output", str(out), "--bundle", str(other_bundle),
            "--engine", "torch", "--no-progress", "--scheduler", client.scheduler.address]  # fmt: skip
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(argv) == 2
    assert "different bundle" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before

    other_store = write_mock_cutouts(tmp_path / "other.zarr", 300, seed=5, rows_per_unit=128, rows_per_batch=64)
    argv_store = list(argv)
    argv_store[argv.index("--input") + 1] = str(other_store)
    argv_store[argv.index("--bundle") + 1] = str(tiny_bundle)
    assert main(argv_store) == 2
    assert "different input" in capsys.readouterr().err

    assert main(argv + ["--overwrite"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["bundle"]["path"] == str(other_bundle.resolve())
    assert_exactly_once(out, 600)


def test_worker_killed_mid_run_still_every_row_once(tmp_path, tiny_bundle):
    store = write_mock_cutouts(tmp_path / "many.zarr", 2400, seed=6, rows_per_unit=64, rows_per_batch=64)
    out = tmp_path / "out"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            pids = client.run(os.getpid)
            result: dict = {}
            config = config_for(store, out, tiny_bundle, max_in_flight=2, build_catalog=False)
            thread = threading.Thread(target=lambda: result.update(r=run_pipeline(config, client)))
            thread.start()
            deadline = time.time() + 60
            while not list((out / "done").glob("*.json")) and time.time() < deadline:
                time.sleep(0.005)
            os.kill(next(iter(pids.values())), signal.SIGKILL)
            thread.join(timeout=120)
    assert not thread.is_alive()
    record = result["r"].record
    assert result["r"].exit_code == 0, record["failures"]
    assert record["units"]["done"] == 38 and record["units"]["failed"] == 0
    assert_exactly_once(out, 2400)


def test_client_killed_then_same_command_resumes_exactly_once(tmp_path, tiny_bundle):
    store = write_mock_cutouts(tmp_path / "many.zarr", 3200, seed=7, rows_per_unit=64, rows_per_batch=64)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "survey_infer.cli", "run", "mass_to_light", "--input", str(store), "--output",
            str(out), "--bundle", str(tiny_bundle), "--engine", "torch", "--no-progress", "--threads-per-worker", "1",
            "--max-in-flight", "1"]  # fmt: skip
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((out / "done").glob("*.json"))) < 3 and time.time() < deadline and first.poll() is None:
        time.sleep(0.005)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = len(list((out / "done").glob("*.json")))
    assert 3 <= done_before < 50, "the first run should have been killed part-way"
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    time.sleep(1.0)  # let orphaned worker processes notice their parent is gone

    second = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete"
    assert record["units"]["skipped"] >= done_before - 1 and record["units"]["done"] == 50
    assert_exactly_once(out, 3200)
    assert len(list((out / "catalog").rglob("*.parquet"))) >= 1


def test_second_run_into_a_locked_output_is_refused(client, small_store, tmp_path, tiny_bundle):
    from filelock import FileLock

    from survey_infer.errors import RefusedError

    out = tmp_path / "out"
    out.mkdir()
    with FileLock(out / "run.lock"):  # as if another run were writing there
        with pytest.raises(RefusedError, match="another survey-infer run"):
            run_pipeline(config_for(small_store, out, tiny_bundle), client)
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]
    assert run_pipeline(config_for(small_store, out, tiny_bundle, build_catalog=False), client).exit_code == 0
    assert_exactly_once(out, 600)
