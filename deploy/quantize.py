"""INT8 static quantization of a bundle's ONNX model for the CPU (ONNX Runtime), calibrated on a store.

``quantize_bundle(bundle_dir, store)`` writes ``model.int8.onnx`` beside ``model.onnx``: ONNX Runtime's
static quantization in QDQ form, weights int8 per output channel, activations uint8 with ranges calibrated
(min-max) on the store's cutouts prepared exactly as a run prepares them. It then runs both models on rows the
calibration did not see and records how far the int8 outputs are from fp32 in ``bundle.json["int8"]``, and
the file's sha256 in ``files``. `survey-infer run --precision int8` uses it. The accuracy change on held-out
mocks with truth is `bench/accuracy_mass_to_light.py --precision int8`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from survey_infer.bundle import BUNDLE_JSON, load_bundle, record_file, write_json_atomic
from survey_infer.engines.base import INT8_ONNX_FILE
from survey_infer.errors import BundleError
from survey_infer.flags import NO_ESTIMATE
from survey_infer.store import iter_image_batches, open_cutouts, read_columns
from survey_infer.tasks import get_task

CALIBRATION_BATCH = 64


def calibration_inputs(bundle, store: Path, rows: int, seed: int) -> dict[str, np.ndarray]:
    """``rows`` usable rows of the store, drawn from blocks across it, as the task prepares them for the engine."""
    info = open_cutouts(store)
    task = get_task(bundle.task)
    task.check_store(info, bundle)
    rng = np.random.default_rng(seed)
    starts = rng.permutation(np.arange(0, info.n_rows, info.rows_per_read))
    wanted = [c for c in task.input_columns(bundle) if c in info.columns]
    pieces: list[dict[str, np.ndarray]] = []
    kept = 0
    for start in starts:
        stop = min(start + info.rows_per_read, info.n_rows)
        images = next(iter_image_batches(info.path, start, stop, info.rows_per_read))[1]
        columns = read_columns(info.path, start, stop, wanted)
        for name in task.input_columns(bundle):
            columns.setdefault(name, np.full(stop - start, np.nan))
        inputs, flags = task.prepare(images, columns, bundle)
        usable = (flags & NO_ESTIMATE) == 0
        pieces.append({k: v[usable] for k, v in inputs.items()})
        kept += int(usable.sum())
        if kept >= rows:
            break
    if kept < rows:
        raise BundleError(f"store {store} has only {kept} usable rows; {rows} are needed to calibrate")
    return {k: np.concatenate([p[k] for p in pieces])[:rows].astype(np.float32) for k in pieces[0]}


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def quantize_bundle(bundle_dir: str | Path, store: str | Path, *, rows: int = 1024, check_rows: int = 1024,
                    seed: int = 0) -> Path:  # fmt: skip
    """Write and record ``model.int8.onnx`` for the bundle, calibrated on ``rows`` rows of ``store``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir)
    if bundle.onnx_path is None:
        raise BundleError(f"bundle {bundle_dir} has no model.onnx to quantize (run `survey-infer export`)")
    data = calibration_inputs(bundle, Path(store), rows + check_rows, seed)
    calibration = {k: v[:rows] for k, v in data.items()}
    held_out = {k: v[rows:] for k, v in data.items()}

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{k: v[i : i + CALIBRATION_BATCH] for k, v in calibration.items()}
                                 for i in range(0, rows, CALIBRATION_BATCH)])  # fmt: skip

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    target = bundle_dir / INT8_ONNX_FILE
    with tempfile.TemporaryDirectory(dir=bundle_dir) as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / INT8_ONNX_FILE
        quant_pre_process(str(bundle.onnx_path), str(prepared))
        quantize_static(str(prepared), str(quantized), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
        check = _compare(bundle.onnx_path, quantized, held_out)
        quantized.replace(target)
    import onnxruntime

    meta_path = bundle_dir / BUNDLE_JSON
    meta = json.loads(meta_path.read_text())
    meta["int8"] = {"method": "onnxruntime quantize_static, QDQ, weights int8 per channel, activations uint8, "
                              "min-max calibration", "onnxruntime": onnxruntime.__version__,
                    "calibration": {"store": str(Path(store).resolve()), "rows": rows, "seed": seed,
                                    "survey": _survey_summary(Path(store))},
                    "vs_fp32_on_held_out_rows": check}  # fmt: skip
    write_json_atomic(meta_path, meta)
    record_file(bundle_dir, INT8_ONNX_FILE)
    return target


def _survey_summary(store: Path) -> dict[str, Any]:
    """What the calibration store was (its name, simulator and seed for a mock), for provenance."""
    survey = open_cutouts(store).attrs.get("survey", {})
    return {k: survey[k] for k in ("name", "simulator", "seed") if k in survey}


def _compare(fp32: Path, int8: Path, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Median and largest |int8 - fp32| per output over rows the calibration did not see."""
    exact = _session(fp32).run(None, inputs)
    approx = _session(int8).run(None, inputs)
    names = [o.name for o in _session(fp32).get_outputs()]
    report: dict[str, Any] = {"rows": int(len(next(iter(inputs.values()))))}
    for name, a, b in zip(names, exact, approx):
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        report[name] = {"median_abs_diff": float(np.median(diff)), "max_abs_diff": float(diff.max())}
    return report
