"""The user-facing commands: mock, bundles, demo."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import zarr

from survey_infer.cli import main
from survey_infer.store import open_cutouts


def test_mock_writes_a_valid_store_with_truth(tmp_path, capsys):
    store = tmp_path / "m.zarr"
    assert main(["mock", "cutouts", str(store), "--n", "300", "--size", "128", "--seed", "2",
                 "--rows-per-unit", "128", "--rows-per-batch", "64"]) == 0  # fmt: skip
    info = open_cutouts(store)
    assert info.n_rows == 300 and info.image_shape == (1, 128, 128) and info.rows_per_block == 128
    assert {"distance_mpc", "lum_g", "size_kpc"} <= set(info.columns)
    images = zarr.open_group(str(store), mode="r")["images"][:]
    assert images.min() >= -1.0 and images.max() <= 1.0 and np.isfinite(images).all()
    truth = pq.read_table(f"{store}.truth.parquet").to_pandas()
    assert len(truth) == 300 and (truth["object_id"].to_numpy() == np.arange(300)).all()
    assert truth["ml_g"].between(0.01, 20).all() and truth["ml_g"].quantile(0.95) < 6  # 0.01: ongoing starbursts


def test_same_seed_same_mock(tmp_path):
    for name in ("a.zarr", "b.zarr"):
        main(["mock", "cutouts", str(tmp_path / name), "--n", "50", "--seed", "9"])
    a = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")["images"][:]
    b = zarr.open_group(str(tmp_path / "b.zarr"), mode="r")["images"][:]
    np.testing.assert_array_equal(a, b)


def test_bundles_lists_the_shipped_bundle(capsys):
    assert main(["bundles"]) == 0
    out = capsys.readouterr().out
    assert "mass_to_light-img69-v3" in out and "mass_to_light-img128-meta-v3" in out and "model.onnx" in out


def test_demo_runs_the_main_job_on_the_mock_survey(tmp_path):
    result = subprocess.run([sys.executable, "-m", "survey_infer.cli", "demo", "--output", str(tmp_path / "demo"),
                             "--n", "600"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "mass_to_light" in result.stdout and "complete" in result.stdout
    assert "RMSE" in result.stdout
    record = json.loads((tmp_path / "demo" / "mass_to_light" / "run.json").read_text())
    assert record["rows"] == {"in": 600, "out": 600, "flagged": record["rows"]["flagged"]}
    assert record["status"] == "complete"


def test_train_writes_a_bundle_that_run_uses(tmp_path, small_store):
    assert main(["train", "mass_to_light", "--output", str(tmp_path / "bundles"), "--n-train", "128", "--n-val",
                 "64", "--epochs", "1", "--width", "4", "--name", "unit", "--batch-size", "32", "--images-only"]) == 0  # fmt: skip
    bundle = tmp_path / "bundles" / "mass_to_light-unit-v1"
    assert {"bundle.json", "weights.safetensors", "model.onnx"} <= {p.name for p in bundle.iterdir()}
    meta = json.loads((bundle / "bundle.json").read_text())
    assert "meta" not in meta["input_spec"] and meta["engine_io"]["inputs"] == ["image"]
    assert meta["training"]["training_data"]["versions"]["bagpipes"]
    code = main(["run", "mass_to_light", "--input", str(small_store), "--output", str(tmp_path / "out"),
                 "--bundle", str(bundle), "--engine", "onnxruntime", "--no-progress", "--no-catalog"])  # fmt: skip
    assert code == 0
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["bundle"]["id"] == "mass_to_light-unit-v1" and record["engine"]["name"] == "onnxruntime"
    assert record["rows"]["out"] == 600


def test_in_process_cluster_gives_the_same_rows(tmp_path, small_store, tiny_bundle):
    argv = ["run", "mass_to_light", "--input", str(small_store), "--bundle", str(tiny_bundle), "--engine", "torch",
            "--no-progress", "--no-catalog"]  # fmt: skip
    assert main(argv + ["--output", str(tmp_path / "procs")]) == 0
    assert main(argv + ["--output", str(tmp_path / "inproc"), "--in-process"]) == 0
    by_process = pq.read_table(tmp_path / "procs" / "parts").to_pandas().sort_values("object_id")
    in_process = pq.read_table(tmp_path / "inproc" / "parts").to_pandas().sort_values("object_id")
    assert len(in_process) == 600
    np.testing.assert_allclose(in_process["ml_g"], by_process["ml_g"], rtol=1e-6)
    record = json.loads((tmp_path / "inproc" / "run.json").read_text())
    assert record["config"]["in_process"] is True
