"""TensorRT engine: not available in this version unless TensorRT is installed (the GPU issue builds it)."""

from __future__ import annotations

from survey_infer.engines.base import Engine, EngineUnavailable, require_fp32


class TensorRTEngine(Engine):
    name = "tensorrt"

    def __init__(self, bundle, *, threads: int = 1, device: str = "auto", precision: str = "fp32"):
        require_fp32(self.name, precision)
        try:
            import tensorrt  # noqa: F401
        except ImportError as exc:
            raise EngineUnavailable("tensorrt is not installed (pip install 'survey-infer[gpu]' on an NVIDIA GPU node)") from exc
        raise EngineUnavailable("tensorrt is installed, but TensorRT plan building is not in this version yet")
