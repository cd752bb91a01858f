"""`survey-infer export`: onnx.checker, then ONNX Runtime against PyTorch float32 on random inputs and, with
--check-store, on real rows of a store prepared as a run prepares them (issue 13)."""

from __future__ import annotations

import json
import shutil

import pytest

from deploy import export as export_module
from survey_infer.cli import main


def test_export_checks_on_real_rows(tiny_bundle, small_store, tmp_path, capsys):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    assert main(["export", str(bundle), "--check-store", str(small_store), "--check-rows", "100"]) == 0
    onnx = json.loads((bundle / "bundle.json").read_text())["onnx"]
    real = onnx["checked_on_real_rows"]
    assert real["rows"] == 100 and real["store"] == str(small_store)
    assert 0 <= real["max_abs_diff"] <= onnx["tolerance"]
    assert onnx["check_batches"] == [3, 64] and onnx["max_abs_diff"] <= onnx["tolerance"]


def test_export_refuses_a_model_that_differs_from_torch(tiny_bundle, small_store, tmp_path, monkeypatch):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    monkeypatch.setattr(export_module, "EXPORTERS", export_module.EXPORTERS[:1])  # torchscript only: quicker
    monkeypatch.setattr(export_module, "_check", lambda *args: 0.0)  # the random-input check passes...
    monkeypatch.setattr(export_module, "TOLERANCE", -1.0)  # ...and the real-row one cannot: it really compares
    with pytest.raises(export_module.ExportError, match="on 64 rows of .* differs from torch float32"):
        export_module.export_onnx(bundle, check_store=small_store, check_rows=64)
    assert not (bundle / "model.onnx").exists()
