"""Deploy: export model bundles to ONNX (and, on GPU nodes, TensorRT), and start clusters."""

from deploy.export import export_onnx

__all__ = ["export_onnx"]
