"""PyTorch engine: CPU float32, or CUDA (float32, or half precision where the bundle allows it).

On CUDA the engine keeps the model in channels_last, stages each batch through pinned host buffers with
non-blocking copies, and replays a CUDA graph captured for a fixed batch size (``CUDA_BATCH`` rows; a smaller
batch uses the first rows of the graph's static buffers, a larger one is run in pieces). Rows are independent
in eval mode, so the unused rows of a partial batch change nothing. It has ``CUDA_SLOTS`` such sets of
buffers, graph and stream: a worker's threads each take a free one, so one batch's host-to-device copy overlaps
another's kernels. All graphs are captured together before the first batch runs (capture must not overlap other
CUDA work). Where capture fails the engine runs eagerly and says so in its description.
"""

from __future__ import annotations

import logging
import queue
import threading

import numpy as np
import torch

from survey_infer.engines.base import Engine, EngineUnavailable

log = logging.getLogger(__name__)

CPU_SUB_BATCH = 32
CUDA_BATCH = 1024  # the fixed batch of the CUDA graph (and of the pinned staging buffers)
GRAPH_WARMUP = 3
CUDA_SLOTS = 2  # buffer/graph/stream sets: copies of one batch overlap the kernels of another


def resolve_torch_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EngineUnavailable("CUDA was asked for but torch sees no GPU")
    return torch.device(device)


def half_allowed(bundle) -> tuple[bool, str]:
    """Whether the bundle may run in half precision: bundle.json ``"fp16": false`` forbids it."""
    if bundle.meta.get("fp16", True) is False:
        return False, f"bundle {bundle.id} forbids fp16 (bundle.json \"fp16\": false)"
    return True, ""


def fixed_batch_pieces(n_rows: int, batch: int) -> list[tuple[int, int]]:
    """(start, rows) pieces of at most ``batch`` rows that cover ``n_rows`` in order (the last may be short)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return [(start, min(batch, n_rows - start)) for start in range(0, n_rows, batch)]


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, bundle, *, threads: int = 1, device: str = "auto", half: bool = False, precision: str = "fp32",
                 cuda_graphs: bool = True, cuda_batch: int = CUDA_BATCH, cuda_slots: int = CUDA_SLOTS):  # fmt: skip
        super().__init__(bundle)
        if precision not in ("fp32", "fp16"):
            raise EngineUnavailable(f"the torch engine runs fp32 or fp16 (on a GPU), not {precision}")
        self.device = resolve_torch_device(device)
        half = half or precision == "fp16"
        if half and self.device.type != "cuda":
            raise EngineUnavailable("the torch engine runs fp16 on a CUDA GPU only")
        if half:
            allowed, why = half_allowed(bundle)
            if not allowed:
                raise EngineUnavailable(why)
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.half = half and self.device.type == "cuda"
        if self.device.type == "cuda" and not self.half:
            # float32 means float32: TF32 convolutions would drift ~1e-3 from the reference numbers
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        model = bundle.build_torch_model().to(self.device).eval()
        # channels-last convolutions: ~3x faster on CPU for small sub-batches (bench/README.md), tensor cores on GPU
        model = model.to(memory_format=torch.channels_last)
        self.model = model.half() if self.half else model
        self.sub_batch = CPU_SUB_BATCH if self.device.type == "cpu" else None
        self._cuda: list[_CudaRunner] = []
        self._free: queue.Queue = queue.Queue()
        self._ready = threading.Lock()
        if self.device.type == "cuda":
            self._cuda = [_CudaRunner(self, cuda_batch, cuda_graphs) for _ in range(max(1, cuda_slots))]
            for runner in self._cuda:
                self._free.put(runner)

    def _run_cuda(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._ready:  # the first call sets every slot up (and captures its graph) before any replays
            if self._cuda[0].shapes is None:
                with torch.cuda.device(self.device):
                    for runner in self._cuda:
                        runner.allocate(inputs)
        runner = self._free.get()
        try:
            return runner.run(inputs)
        finally:
            self._free.put(runner)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self.device, self.dtype)
        return tensor.contiguous(memory_format=torch.channels_last) if tensor.ndim == 4 else tensor

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.half else torch.float32

    @torch.inference_mode()
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._cuda:
            return self._run_cuda(inputs)
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

    def info(self) -> dict:
        info = {"name": self.name, "device": str(self.device), "precision": "fp16" if self.half else "fp32",
                "torch": torch.__version__}  # fmt: skip
        if self._cuda:
            info.update(self._cuda[0].info(), cuda_slots=len(self._cuda))
        return info


class _CudaRunner:
    """One slot: pinned host buffers, a stream and (where capture works) a CUDA graph for a fixed batch."""

    def __init__(self, engine: TorchEngine, batch: int, graphs: bool):
        self.engine = engine
        self.batch = batch
        self.stream = torch.cuda.Stream(device=engine.device)
        self.host_in: dict[str, torch.Tensor] = {}
        self.static_in: dict[str, torch.Tensor] = {}
        self.host_out: dict[str, torch.Tensor] = {}
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_out: list[torch.Tensor] | None = None
        self.graph_error = ""
        self.graphs = graphs
        self.shapes: dict[str, tuple[int, ...]] | None = None

    def allocate(self, inputs: dict[str, np.ndarray]) -> None:
        """Buffers for the row shapes of the first batch (every batch of a run has the same row shape)."""
        engine = self.engine
        shapes = {n: tuple(inputs[n].shape[1:]) for n in engine.input_names}
        for name, shape in shapes.items():
            self.host_in[name] = torch.empty((self.batch, *shape), dtype=torch.float32, pin_memory=True)
            static = torch.zeros((self.batch, *shape), dtype=engine.dtype, device=engine.device)
            self.static_in[name] = static.contiguous(memory_format=torch.channels_last) if static.ndim == 4 else static
        if self.graphs:
            try:
                self._capture()
            except Exception as exc:  # noqa: BLE001 - eager mode still gives the same numbers
                self.graph, self.static_out = None, None
                self.graph_error = f"{type(exc).__name__}: {exc}"
                log.warning("CUDA graph capture failed, running eagerly: %s", self.graph_error)
        outputs = self.static_out or self._forward()
        for name, out in zip(engine.output_names, outputs):
            self.host_out[name] = torch.empty(tuple(out.shape), dtype=torch.float32, pin_memory=True)
        self.shapes = shapes

    def _forward(self) -> list[torch.Tensor]:
        outputs = self.engine.model(*[self.static_in[n] for n in self.engine.input_names])
        return [o.float() for o in outputs]

    def _capture(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.engine.device))
        with torch.cuda.stream(self.stream):
            for _ in range(GRAPH_WARMUP):  # cuDNN picks its kernels before capture
                self._forward()
        torch.cuda.current_stream(self.engine.device).wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            self.static_out = self._forward()
        self.graph = graph

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        engine = self.engine
        n_rows = len(inputs[engine.input_names[0]])
        pieces: list[dict[str, np.ndarray]] = []
        with torch.inference_mode(), torch.cuda.device(engine.device):
            for name in engine.input_names:
                if tuple(inputs[name].shape[1:]) != self.shapes[name]:
                    raise ValueError(f"input {name}: rows of shape {inputs[name].shape[1:]}, the engine was "
                                     f"set up for {self.shapes[name]}")  # fmt: skip
            for start, rows in fixed_batch_pieces(n_rows, self.batch):
                with torch.cuda.stream(self.stream):
                    for name in engine.input_names:
                        host = self.host_in[name][:rows]
                        host.copy_(torch.from_numpy(np.ascontiguousarray(inputs[name][start : start + rows], np.float32)))
                        self.static_in[name][:rows].copy_(host, non_blocking=True)
                    outputs = self.static_out if self.graph is not None else None
                    if self.graph is not None:
                        self.graph.replay()
                    else:
                        outputs = self._forward()
                    for name, out in zip(engine.output_names, outputs):
                        self.host_out[name][:rows].copy_(out[:rows], non_blocking=True)
                self.stream.synchronize()
                pieces.append({n: self.host_out[n][:rows].numpy().copy() for n in engine.output_names})
        if not pieces:
            return {n: np.zeros((0,), np.float32) for n in engine.output_names}
        return {n: np.concatenate([p[n] for p in pieces]) for n in engine.output_names}

    def info(self) -> dict:
        return {"cuda_graph": self.graph is not None, "fixed_batch": self.batch, "pinned_memory": True,
                "channels_last": True, **({"cuda_graph_error": self.graph_error} if self.graph_error else {})}  # fmt: skip
