"""PyTorch engine: CPU float32, or CUDA (float32 or half precision) when a GPU is present."""

from __future__ import annotations

import numpy as np
import torch

from survey_infer.engines.base import Engine, EngineUnavailable, require_fp32


def resolve_torch_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EngineUnavailable("CUDA was asked for but torch sees no GPU")
    return torch.device(device)


CPU_SUB_BATCH = 32


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, bundle, *, threads: int = 1, device: str = "auto", half: bool = False, precision: str = "fp32"):
        require_fp32(self.name, precision)
        super().__init__(bundle)
        self.device = resolve_torch_device(device)
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.half = half and self.device.type == "cuda"
        if self.device.type == "cuda" and not self.half:
            # float32 means float32: TF32 convolutions would drift ~1e-3 from the reference numbers
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        model = bundle.build_torch_model().to(self.device)
        if self.device.type == "cpu":
            # channels-last convolutions on small sub-batches are ~3x faster on CPU (bench/README.md)
            model = model.to(memory_format=torch.channels_last)
        self.model = model.half() if self.half else model
        self.sub_batch = CPU_SUB_BATCH if self.device.type == "cpu" else None

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self.device, self.dtype)
        return tensor.contiguous(memory_format=torch.channels_last) if tensor.ndim == 4 else tensor

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.half else torch.float32

    @torch.inference_mode()
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n_rows = len(inputs[self.input_names[0]])
        step = self.sub_batch or max(n_rows, 1)
        pieces: list[list[np.ndarray]] = [[] for _ in self.output_names]
        for start in range(0, n_rows, step):
            outputs = self.model(*[self._tensor(inputs[n][start : start + step]) for n in self.input_names])
            for piece, out in zip(pieces, outputs):
                piece.append(out.float().cpu().numpy())
        return {name: np.concatenate(piece) for name, piece in zip(self.output_names, pieces)}

    @property
    def uses_gpu(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> dict:
        return {"name": self.name, "device": str(self.device), "precision": "fp16" if self.half else "fp32",
                "torch": torch.__version__}
