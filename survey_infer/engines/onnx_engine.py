"""ONNX Runtime engine: CPU, or the CUDA execution provider where it is installed and a GPU is present."""

from __future__ import annotations

import numpy as np

from pathlib import Path

from survey_infer.engines.base import INT8_ONNX_FILE, Engine, EngineUnavailable


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"

    def __init__(self, bundle, *, threads: int = 1, device: str = "auto", precision: str = "fp32"):
        super().__init__(bundle)
        if precision not in ("fp32", "int8"):
            raise EngineUnavailable(f"ONNX Runtime runs the fp32 or the int8 model here, not {precision}")
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise EngineUnavailable("onnxruntime is not installed") from exc
        model_path = self._model_path(bundle, precision)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        available = ort.get_available_providers()
        want_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in available
        if device == "cuda" and not want_cuda:
            raise EngineUnavailable("CUDA was asked for but onnxruntime has no CUDAExecutionProvider")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
        self.providers = self.session.get_providers()
        self.version = ort.__version__
        self.precision = precision

    @staticmethod
    def _model_path(bundle, precision: str) -> Path:
        if precision == "int8":
            if INT8_ONNX_FILE not in bundle.meta["files"]:
                raise EngineUnavailable(f"bundle {bundle.id} has no {INT8_ONNX_FILE} (run `survey-infer quantize`)")
            return bundle.path / INT8_ONNX_FILE
        if bundle.onnx_path is None:
            raise EngineUnavailable(f"bundle {bundle.id} has no model.onnx (run `survey-infer export`)")
        return bundle.onnx_path

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {n: np.ascontiguousarray(inputs[n], dtype=np.float32) for n in self.input_names}
        outputs = self.session.run(self.output_names, feed)
        return dict(zip(self.output_names, outputs))

    @property
    def uses_gpu(self) -> bool:
        return "CUDAExecutionProvider" in self.providers

    def info(self) -> dict:
        return {"name": self.name, "providers": self.providers, "onnxruntime": self.version, "precision": self.precision}
