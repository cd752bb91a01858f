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
# `auto` tries these in order and keeps the first that loads and runs a probe batch: fastest first.
AUTO_ORDER = ("tensorrt", "onnxruntime", "torch")
_IMPLEMENTATIONS = {
    "torch": "survey_infer.engines.torch_engine:TorchEngine",
    "onnxruntime": "survey_infer.engines.onnx_engine:OnnxRuntimeEngine",
    "tensorrt": "survey_infer.engines.tensorrt_engine:TensorRTEngine",
}


PRECISIONS = ("fp32", "int8")
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

    def describe(self) -> dict:
        """What the run record says about this engine."""
        return {"name": self.name}


def require_fp32(engine: str, precision: str) -> None:
    """Refuse a precision an engine does not run (only ONNX Runtime runs the int8 model)."""
    if precision != "fp32":
        raise EngineUnavailable(f"the {engine} engine runs fp32 here; precision {precision} is an ONNX Runtime model")


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

    ``precision`` int8 runs the bundle's quantized ONNX model (ONNX Runtime only; `survey-infer quantize`).
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
    want_gpu = device != "cpu" and _cuda_visible()
    reasons, cpu_fallback = [], None
    for candidate in AUTO_ORDER:
        try:
            engine = _load_class(candidate)(bundle, threads=threads, device=device, precision=precision)
            engine.run(probe)
        except EngineUnavailable as exc:
            reasons.append(f"{candidate}: {exc}")
            log.info("engine %s unavailable: %s", candidate, exc)
            continue
        if engine.uses_gpu or not want_gpu:
            return engine
        cpu_fallback = cpu_fallback or engine  # a GPU is there: keep looking for an engine that uses it
    if cpu_fallback is not None:
        return cpu_fallback
    raise EngineUnavailable("no engine works here: " + "; ".join(reasons))


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()
