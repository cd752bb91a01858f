"""Export a bundle's network to ONNX and check it against PyTorch float32.

``export_onnx(bundle_dir)`` writes ``model.onnx`` with a dynamic batch axis and the input and output names of
the bundle's ``engine_io``, checks ONNX Runtime against PyTorch on random inputs of two batch sizes (neither
the one traced), records the exporter in ``bundle.json["onnx"]`` and the file's sha256 in ``files``.

The TorchScript exporter (``dynamo=False``) is tried first: it gives a small, plain graph that every runtime
(ONNX Runtime, TensorRT) reads. Where it is gone or fails, the dynamo exporter with ``dynamic_shapes`` is used.
Whichever is used must pass the same check, or nothing is written.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from survey_infer.bundle import BUNDLE_JSON, ONNX_FILE, load_bundle, record_file, write_json_atomic
from survey_infer.errors import BundleError

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17  # TorchScript exporter; TensorRT 8.6+ and every recent ONNX Runtime read it
TOLERANCE = 1e-4  # absolute, ONNX Runtime vs PyTorch float32
CHECK_BATCHES = (3, 64)
BATCH_AXIS = "batch"


class ExportError(RuntimeError):
    """No exporter produced an ONNX file that matches PyTorch."""


def _export_torchscript(model, args, path: Path, inputs, outputs, opset: int | None) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice
        torch.onnx.export(
            model, args, str(path), dynamo=False, input_names=list(inputs), output_names=list(outputs),
            dynamic_axes={n: {0: BATCH_AXIS} for n in [*inputs, *outputs]}, opset_version=opset or DEFAULT_OPSET,
            do_constant_folding=True, export_params=True,
        )  # fmt: skip
    return {"exporter": "torchscript", "opset": opset or DEFAULT_OPSET}


def _export_dynamo(model, args, path: Path, inputs, outputs, opset: int | None) -> dict[str, Any]:
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    dynamic_shapes = tuple({0: batch} for _ in args)
    program = torch.onnx.export(
        model, args, dynamo=True, input_names=list(inputs), output_names=list(outputs),
        dynamic_shapes=dynamic_shapes, opset_version=opset, optimize=True, external_data=False, verbose=False,
    )  # fmt: skip
    program.save(str(path), external_data=False)
    import onnx

    used = next((o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx")), opset)
    return {"exporter": "dynamo", "opset": used}


EXPORTERS = (("torchscript", _export_torchscript), ("dynamo", _export_dynamo))


def _check(path: Path, model, bundle, inputs, outputs) -> float:
    """Largest |ONNX Runtime - torch| over every output and check batch; raises if names or shapes differ."""
    import onnx
    import onnxruntime as ort

    from survey_infer.tasks import get_task

    onnx.checker.check_model(str(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    got_in = [i.name for i in session.get_inputs()]
    got_out = [o.name for o in session.get_outputs()]
    if got_in != list(inputs) or got_out != list(outputs):
        raise ExportError(f"ONNX names {got_in} -> {got_out}; engine_io wants {list(inputs)} -> {list(outputs)}")
    task = get_task(bundle.task)
    worst = 0.0
    for seed, n in enumerate(CHECK_BATCHES, start=1):
        feed = task.example_inputs(bundle, n, seed=seed)
        feed = {k: feed[k] for k in inputs}
        with torch.inference_mode():
            expected = model(*(torch.from_numpy(feed[k]) for k in inputs))
        actual = session.run(list(outputs), feed)
        for name, want, got in zip(outputs, expected, actual):
            want = want.numpy()
            if got.shape != want.shape:
                raise ExportError(f"output {name}: ONNX shape {got.shape}, torch {want.shape} (batch {n})")
            diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
            worst = max(worst, diff)
    if not worst <= TOLERANCE:
        raise ExportError(f"ONNX Runtime differs from torch float32 by {worst:.3g} > {TOLERANCE}")
    return worst


def _check_real(path: Path, model, bundle, inputs, outputs, store: Path, rows: int) -> dict[str, Any]:
    """Largest |ONNX Runtime - torch| on ``rows`` real rows of a cutouts store, prepared as a run prepares them."""
    import onnxruntime as ort

    from deploy.quantize import calibration_inputs

    feed = calibration_inputs(bundle, Path(store), rows, seed=1)
    feed = {k: feed[k] for k in inputs}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for start in range(0, rows, 64):
        piece = {k: v[start : start + 64] for k, v in feed.items()}
        with torch.inference_mode():
            expected = model(*(torch.from_numpy(piece[k]) for k in inputs))
        for want, got in zip(expected, session.run(list(outputs), piece)):
            worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - want.numpy().astype(np.float64)))))
    if not worst <= TOLERANCE:
        raise ExportError(f"on {rows} rows of {store}, ONNX Runtime differs from torch float32 by {worst:.3g} > {TOLERANCE}")
    return {"store": str(store), "rows": rows, "max_abs_diff": worst}


def export_onnx(bundle_dir: Path, *, opset: int | None = None, check_store: Path | None = None,
                check_rows: int = 256) -> Path:  # fmt: skip
    """Write ``<bundle_dir>/model.onnx`` (dynamic batch), check it against torch, record it; returns its path.

    ``check_store``: also compare ONNX Runtime with torch on ``check_rows`` real rows of this cutouts store.
    """
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir)
    io = bundle.meta.get("engine_io")
    if not io or not io.get("inputs") or not io.get("outputs"):
        raise BundleError(f"bundle {bundle_dir}: {BUNDLE_JSON} has no engine_io inputs/outputs")
    inputs, outputs = list(io["inputs"]), list(io["outputs"])
    model = bundle.build_torch_model().float().eval()

    from survey_infer.tasks import get_task

    example = get_task(bundle.task).example_inputs(bundle, 4, seed=0)
    args = tuple(torch.from_numpy(example[n]) for n in inputs)
    target = bundle_dir / ONNX_FILE
    tmp = bundle_dir / f".{ONNX_FILE}.tmp"
    failures = []
    for label, exporter in EXPORTERS:
        try:
            if tmp.exists():
                tmp.unlink()
            info = exporter(model, args, tmp, inputs, outputs, opset)
            worst = _check(tmp, model, bundle, inputs, outputs)
            real = _check_real(tmp, model, bundle, inputs, outputs, check_store, check_rows) if check_store else None
        except Exception as exc:  # noqa: BLE001 - try the next exporter, report all at the end
            log.warning("ONNX export with %s failed: %s", label, exc)
            failures.append(f"{label}: {type(exc).__name__}: {exc}")
            continue
        break
    else:
        if tmp.exists():
            tmp.unlink()
        raise ExportError(f"bundle {bundle_dir}: no exporter gave a valid ONNX file: " + " | ".join(failures))

    os.replace(tmp, target)
    meta_path = bundle_dir / BUNDLE_JSON
    meta = json.loads(meta_path.read_text())
    meta["onnx"] = {
        **info,
        "dynamic_axes": {n: {"0": BATCH_AXIS} for n in [*inputs, *outputs]},
        "torch_version": torch.__version__,
        "checked_against": "torch float32 (CPU), onnxruntime CPUExecutionProvider",
        "check_batches": list(CHECK_BATCHES),
        "max_abs_diff": worst,
        "tolerance": TOLERANCE,
    }
    if real is not None:
        meta["onnx"]["checked_on_real_rows"] = real
    if failures:
        meta["onnx"]["fallback_from"] = failures
    write_json_atomic(meta_path, meta)
    record_file(bundle_dir, ONNX_FILE)
    load_bundle(bundle_dir)  # every sha256 still matches
    return target
