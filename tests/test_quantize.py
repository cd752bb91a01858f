"""INT8 quantization of a bundle (deploy.quantize) and `--precision int8` through engines and the pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from survey_infer.bundle import default_bundle_path, load_bundle
from survey_infer.cli import main
from survey_infer.engines import EngineUnavailable, make_engine
from survey_infer.engines.base import INT8_ONNX_FILE
from survey_infer.errors import BundleError, RefusedError
from tests.conftest import assert_exactly_once

pytest.importorskip("onnxruntime.quantization", reason="onnxruntime's quantization tools are not installed")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, small_store) -> Path:
    bundle_dir = tmp_path_factory.mktemp("quant") / "mass_to_light-img69-v3"
    shutil.copytree(default_bundle_path("mass_to_light"), bundle_dir)
    assert main(["quantize", str(bundle_dir), "--calibration", str(small_store), "--rows", "256", "--check-rows", "256"]) == 0
    return bundle_dir


def test_quantize_writes_a_recorded_int8_model_close_to_fp32(quantized, small_store):
    bundle = load_bundle(quantized)  # the sha256 of model.int8.onnx is checked like every file
    assert INT8_ONNX_FILE in bundle.meta["files"]
    report = bundle.meta["int8"]["vs_fp32_on_held_out_rows"]
    assert report["rows"] >= 256 and report["ml_g"]["median_abs_diff"] < 0.05
    fp32 = make_engine("onnxruntime", bundle, threads=1)
    int8 = make_engine("onnxruntime", bundle, threads=1, precision="int8")
    assert int8.describe()["precision"] == "int8"
    from survey_infer.store import iter_image_batches

    images = next(iter_image_batches(small_store, 0, 64, 64))[1]
    a, b = fp32.run({"image": images})["ml_g"], int8.run({"image": images})["ml_g"]
    assert not np.array_equal(a, b)  # really another model
    assert np.median(np.abs(a - b) / a) < 0.05


def test_int8_is_refused_where_it_cannot_run(quantized, tiny_bundle):
    with pytest.raises(EngineUnavailable, match="has no model.int8.onnx"):
        make_engine("onnxruntime", load_bundle(tiny_bundle), precision="int8")
    with pytest.raises(EngineUnavailable, match="torch engine runs fp32"):
        make_engine("torch", load_bundle(quantized), precision="int8")
    with pytest.raises(RefusedError, match="unknown precision"):
        make_engine("onnxruntime", load_bundle(quantized), precision="int4")


def test_run_with_precision_int8(quantized, small_store, tmp_path):
    out = tmp_path / "out"
    assert main(["run", "mass_to_light", "--input", str(small_store), "--output", str(out), "--bundle",
                 str(quantized), "--precision", "int8", "--in-process", "--no-progress", "--no-catalog"]) == 0  # fmt: skip
    record = json.loads((out / "run.json").read_text())
    assert record["engine"]["precision"] == "int8" and record["config"]["precision"] == "int8"
    assert_exactly_once(out, 600)


def test_tampered_int8_model_is_refused(quantized, tmp_path):
    copy = tmp_path / quantized.name
    shutil.copytree(quantized, copy)
    with open(copy / INT8_ONNX_FILE, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match="model.int8.onnx has sha256"):
        load_bundle(copy)
