"""The engine interface and the factory that picks one."""

from __future__ import annotations

import importlib
import logging
import os
from typing import TYPE_CHECKING

import numpy as np

from survey_infer.errors import RefusedError

if TYPE_CHECKING:
    from survey_infer.bundle import Bundle

log = logging.getLogger(__name__)

ENGINE_NAMES = ("auto", "tensorrt", "onnxruntime", "torch")
# `auto` tries these (engine, device) pairs in order and keeps the first that is installed, loads and runs a
# probe batch: fastest first. A GPU pair is tried only where torch sees a CUDA device (and not with --device
# cpu); a CPU pair not with --device cuda. Every pair passed over is recorded with its reason (run.json).
AUTO_ORDER = (("tensorrt", "cuda"), ("torch", "cuda"), ("onnxruntime", "cuda"), ("onnxruntime", "cpu"), ("torch", "cpu"))
_IMPLEMENTATIONS = {
    "torch": "survey_infer.engines.torch_engine:TorchEngine",
    "onnxruntime": "survey_infer.engines.onnx_engine:OnnxRuntimeEngine",
    "tensorrt": "survey_infer.engines.tensorrt_engine:TensorRTEngine",
}


PRECISIONS = ("fp32", "fp16", "int8")  # fp16: TensorRT or torch on a CUDA GPU; int8: ONNX Runtime or a TensorRT plan
INT8_ONNX_FILE = "model.int8.onnx"  # written by `survey-infer quantize` (deploy.quantize), ONNX Runtime only


class EngineUnavailable(RuntimeError):
    """This engine cannot run here (not installed, no GPU, no ONNX file in the bundle...)."""


class Engine:
    """Takes named float32 batches (N, ...) and returns named outputs (N, ...) as numpy arrays."""

    name: str = "engine"

    def __init__(self, bundle: Bundle):
        io = bundle.meta["engine_io"]
        self.bundle = bundle
        self.input_names: list[str] = list(io["inputs"])
        self.output_names: list[str] = list(io["outputs"])

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @property
    def uses_gpu(self) -> bool:
        return False

    selection: dict | None = None  # set by make_engine("auto"): what was tried and why each was passed over

    def info(self) -> dict:
        """This engine's own description (name, device, precision, versions)."""
        return {"name": self.name}

    def describe(self) -> dict:
        """What the run record says about this engine (with the ``auto`` selection, when it chose)."""
        return {**self.info(), **({"auto": self.selection} if self.selection else {})}


def default_threads() -> int:
    """Cores this process may run on (its CPU affinity, which batch schedulers set)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _load_class(name: str):
    module_name, class_name = _IMPLEMENTATIONS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def make_engine(
    name: str, bundle: Bundle, *, threads: int | None = None, device: str = "auto", precision: str = "fp32"
) -> Engine:
    """Build engine ``name`` for ``bundle``; ``auto`` picks the fastest that is installed and works.

    ``precision`` int8 runs the bundle's quantized ONNX model (ONNX Runtime; `survey-infer quantize`) or an
    int8 TensorRT plan (`survey-infer build-engine --precision int8`); fp16 runs TensorRT or torch on a GPU.
    An ``auto`` engine's ``selection`` (and so its ``describe()``) says which pairs were passed over and why.
    """
    if name not in ENGINE_NAMES:
        raise RefusedError(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}")
    if precision not in PRECISIONS:
        raise RefusedError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    threads = threads or default_threads()
    if name != "auto":
        return _load_class(name)(bundle, threads=threads, device=device, precision=precision)
    from survey_infer.tasks import get_task

    probe = get_task(bundle.task).example_inputs(bundle, 2)
    gpu = _cuda_visible() if device != "cpu" else False
    skipped: list[dict[str, str]] = []
    for candidate, where in AUTO_ORDER:
        label = f"{candidate}-{where}"
        reason = _not_here(where, device, gpu)
        if reason is None:
            try:
                on = device if where == "cuda" and device.startswith("cuda") else where  # keep cuda:N
                engine = _load_class(candidate)(bundle, threads=threads, device=on, precision=precision)
                engine.run(probe)
            except EngineUnavailable as exc:
                reason = str(exc)
            except Exception as exc:  # noqa: BLE001 - installed but failing (driver, plan, kernel): try the next
                reason = f"failed: {type(exc).__name__}: {exc}"
            else:
                engine.selection = {"chosen": label, "skipped": skipped, "order": [f"{n}-{w}" for n, w in AUTO_ORDER]}
                return engine
        skipped.append({"engine": label, "reason": reason})
        log.info("engine %s passed over: %s", label, reason)
    raise EngineUnavailable("no engine works here: " + "; ".join(f"{s['engine']}: {s['reason']}" for s in skipped))


def unavailable_reason(name: str, device: str = "auto", precision: str = "fp32") -> str | None:
    """Why engine ``name`` cannot run in this process (cheap: imports and device checks, no model), or None.

    For a refusal before any work where the workers run on this machine; the engine itself may still fail later.
    """
    if name == "auto":
        return None
    if name == "onnxruntime" and precision not in ("fp32", "int8"):
        return f"ONNX Runtime runs the fp32 or the int8 model here, not {precision}"
    if name == "torch" and precision == "int8":
        return "the torch engine runs fp32 or fp16 (on a GPU), not int8"
    wants_gpu = name == "tensorrt" or device.startswith("cuda") or (name == "torch" and precision == "fp16")
    if name == "tensorrt" and device == "cpu":
        return "TensorRT runs on an NVIDIA GPU; --device cpu was asked for"
    module = {"tensorrt": "tensorrt", "onnxruntime": "onnxruntime", "torch": "torch"}[name]
    try:
        imported = importlib.import_module(module)
    except ImportError:
        extra = " (pip install 'survey-infer[gpu]' on an NVIDIA GPU node)" if name == "tensorrt" else ""
        return f"{module} is not installed{extra}"
    if wants_gpu and not _cuda_visible():
        return "no CUDA GPU visible to torch"
    if name == "onnxruntime" and device.startswith("cuda") and "CUDAExecutionProvider" not in imported.get_available_providers():
        return "CUDA was asked for but onnxruntime has no CUDAExecutionProvider"
    return None


def _not_here(where: str, device: str, gpu: bool) -> str | None:
    """Why an (engine, device) pair of AUTO_ORDER is not tried with ``--device device``; None: try it."""
    if where == "cuda" and device == "cpu":
        return "--device cpu"
    if where == "cuda" and not gpu:
        return "no CUDA GPU visible to torch"
    if where == "cpu" and device.startswith("cuda"):
        return f"--device {device}"
    return None


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()
