"""TensorRT engine: a plan built from the bundle's ONNX for this GPU, cached, and run on a CUDA stream.

A plan is built (``build_plan_bytes``: the ONNX parser, one optimisation profile min/opt/max on the batch
axis, FP16 by default) once per ``PlanKey`` = (ONNX sha256, TensorRT version, GPU compute capability,
precision, profile) under a file lock, written atomically beside a JSON sidecar that holds its key and its
sha256 (``ensure_plan``). A plan is loaded only when its sidecar's key equals the key of the running GPU and
TensorRT and its bytes match the recorded sha256 (``plan_status``); anything else is rebuilt, never loaded.

Where plans live (``plan_dir``): ``$SURVEY_INFER_ENGINE_CACHE/<bundle id>-<bundle sha256[:12]>`` if set, else the
bundle's ``engines/`` when writable, else ``~/.cache/survey-infer/engines/<bundle id>-<sha[:12]>``.

The runtime (``TensorRTEngine``) uses torch for CUDA memory and streams (torch is a dependency already):
device buffers for the profile's largest batch, pinned host buffers, ``set_tensor_address`` once, then per
batch ``set_input_shape`` + ``execute_async_v3`` on its own stream; batches larger than the profile are run in
pieces, and the last partial batch uses the first rows of the same buffers.

Verified here: the key, the lock, the rebuild decision and the refusals (no GPU on this machine), the builder's
calls on a stand-in module, and every API name used against the symbols of the TensorRT 11.4 bindings (which
drop the FP16/INT8 flags and calibrators: see ``build_plan_bytes``). The build and the runtime have not yet run
on a GPU (README, "Clusters, batch submission and GPU engines").
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from survey_infer.bundle import ONNX_FILE, sha256_file
from survey_infer.engines.base import Engine, EngineUnavailable

log = logging.getLogger(__name__)

TRT_PRECISIONS = ("fp16", "fp32", "int8")
DEFAULT_BUILD_PRECISION = "fp16"
DEFAULT_MAX_BATCH = 1024
DEFAULT_OPT_BATCH = 256
WORKSPACE_BYTES = 2 << 30
LOCK_TIMEOUT_S = 3600.0  # a build takes seconds to minutes; another process waits for it, not forever
CACHE_ENV = "SURVEY_INFER_ENGINE_CACHE"
PLAN_SUFFIX = ".plan"
KEY_SUFFIX = ".json"


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise EngineUnavailable("tensorrt is not installed (pip install 'survey-infer[gpu]' on an NVIDIA GPU node)") from exc
    return tensorrt


@dataclass(frozen=True)
class PlanKey:
    """What a plan was built for; a plan is only ever loaded under an equal key."""

    onnx_sha256: str
    tensorrt: str
    compute_capability: str  # "9.0"
    precision: str
    profile: tuple[int, int, int]  # batch min, opt, max

    def __post_init__(self) -> None:
        if self.precision not in TRT_PRECISIONS:
            raise EngineUnavailable(f"TensorRT precision {self.precision!r}: choose one of {', '.join(TRT_PRECISIONS)}")
        low, opt, high = self.profile
        if not (isinstance(low, int) and 1 <= low <= opt <= high):
            raise EngineUnavailable(f"TensorRT profile {self.profile}: need 1 <= min <= opt <= max")

    def digest(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    def filename(self) -> str:
        low, opt, high = self.profile
        return (f"trt{self.tensorrt}-sm{self.compute_capability.replace('.', '')}-{self.precision}-"
                f"b{low}-{opt}-{high}-{self.digest()[:12]}{PLAN_SUFFIX}")  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["profile"] = list(self.profile)
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "PlanKey":
        return cls(**{**record, "profile": tuple(record["profile"])})

    def same_target(self, other: "PlanKey") -> bool:
        """Equal but for the profile: a plan for this model, GPU, TensorRT and precision."""
        return (self.onnx_sha256, self.tensorrt, self.compute_capability, self.precision) == (
            other.onnx_sha256, other.tensorrt, other.compute_capability, other.precision)  # fmt: skip


def default_profile(max_batch: int = DEFAULT_MAX_BATCH, opt_batch: int | None = None) -> tuple[int, int, int]:
    if not isinstance(max_batch, int) or max_batch < 1:
        raise EngineUnavailable(f"--max-batch must be a positive integer, got {max_batch!r}")
    opt = min(DEFAULT_OPT_BATCH, max_batch) if opt_batch is None else opt_batch
    if not 1 <= opt <= max_batch:
        raise EngineUnavailable(f"--opt-batch {opt} must lie in 1..{max_batch}")
    return (1, opt, max_batch)


def onnx_sha256(bundle) -> str:
    """The sha256 of the bundle's model.onnx (bundle.json pins it; loading the bundle checked it)."""
    if bundle.onnx_path is None:
        raise EngineUnavailable(f"bundle {bundle.id} has no {ONNX_FILE} (run `survey-infer export`)")
    return bundle.meta["files"].get(ONNX_FILE) or sha256_file(bundle.onnx_path)


def current_target() -> tuple[str, str]:
    """(TensorRT version, compute capability "major.minor") of this process's TensorRT and GPU."""
    trt = import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise EngineUnavailable("TensorRT needs an NVIDIA GPU: torch sees no CUDA device")
    major, minor = torch.cuda.get_device_capability()
    return trt.__version__, f"{major}.{minor}"


def plan_key(bundle, *, precision: str = DEFAULT_BUILD_PRECISION, profile: tuple[int, int, int] | None = None,
             tensorrt_version: str | None = None, compute_capability: str | None = None) -> PlanKey:  # fmt: skip
    """The key of ``bundle``'s plan; TensorRT version and compute capability default to this process's."""
    if tensorrt_version is None or compute_capability is None:
        found_version, found_cc = current_target()
        tensorrt_version = tensorrt_version or found_version
        compute_capability = compute_capability or found_cc
    return PlanKey(onnx_sha256(bundle), str(tensorrt_version), str(compute_capability), precision,
                   tuple(profile or default_profile()))  # fmt: skip


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)


def plan_dir(bundle) -> Path:
    """Where this bundle's plans are cached (see the module docstring)."""
    tag = f"{bundle.id}-{bundle.sha256()[:12]}"
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / tag
    inside = Path(bundle.path) / "engines"
    if _writable(inside):
        return inside
    return Path.home() / ".cache" / "survey-infer" / "engines" / tag


def plan_status(plan: Path, key: PlanKey) -> tuple[bool, str]:
    """(True, "") when ``plan`` may be loaded for ``key``; else (False, why it must be (re)built)."""
    sidecar = plan.with_suffix(KEY_SUFFIX)
    if not plan.exists():
        return False, f"no plan {plan.name}"
    if not sidecar.exists():
        return False, f"plan {plan.name} has no key file {sidecar.name}"
    try:
        record = json.loads(sidecar.read_text())
        stored = PlanKey.from_json(record["key"])
    except (OSError, ValueError, KeyError, TypeError, EngineUnavailable) as exc:
        return False, f"key file {sidecar.name} unreadable: {type(exc).__name__}: {exc}"
    if stored != key:
        diffs = [f"{name} {getattr(stored, name)} != {getattr(key, name)}" for name in key.__dataclass_fields__
                 if getattr(stored, name) != getattr(key, name)]  # fmt: skip
        return False, "key mismatch: " + ", ".join(diffs)
    if sha256_file(plan) != record.get("plan_sha256"):
        return False, f"plan {plan.name} does not match its recorded sha256 (truncated or replaced)"
    return True, ""


def find_plan(directory: Path, key: PlanKey) -> Path | None:
    """A valid cached plan for ``key``'s model, GPU, TensorRT and precision, any profile (largest max batch)."""
    best: tuple[int, Path] | None = None
    for sidecar in sorted(Path(directory).glob(f"*{KEY_SUFFIX}")):
        try:
            stored = PlanKey.from_json(json.loads(sidecar.read_text())["key"])
        except (OSError, ValueError, KeyError, TypeError, EngineUnavailable):
            continue
        plan = sidecar.with_suffix(PLAN_SUFFIX)
        if stored.same_target(key) and plan_status(plan, stored)[0]:
            if best is None or stored.profile[2] > best[0]:
                best = (stored.profile[2], plan)
    return best[1] if best else None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@dataclass
class PlanResult:
    path: Path
    key: PlanKey
    built: bool
    reason: str = ""  # why it was built (empty when a cached plan was used)
    seconds: float = 0.0
    waited_for_lock: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def ensure_plan(bundle, key: PlanKey, build: Callable[[Any, PlanKey], bytes], *, directory: Path | None = None,
                force: bool = False, lock_timeout: float = LOCK_TIMEOUT_S) -> PlanResult:  # fmt: skip
    """The plan for ``key``, built by ``build(bundle, key)`` unless a valid one is cached: once per key, under a
    file lock, so that workers starting together build it once and the others load it."""
    from filelock import FileLock, Timeout

    directory = Path(directory or plan_dir(bundle))
    directory.mkdir(parents=True, exist_ok=True)
    plan = directory / key.filename()
    tick = time.perf_counter()
    try:
        with FileLock(str(plan) + ".lock", timeout=lock_timeout):
            waited = time.perf_counter() - tick
            ok, reason = plan_status(plan, key)
            if ok and not force:
                return PlanResult(plan, key, built=False, waited_for_lock=waited)
            reason = "forced" if ok else reason
            log.warning("building TensorRT plan %s (%s)", plan, reason)
            started = time.perf_counter()
            data = build(bundle, key)
            seconds = time.perf_counter() - started
            _write_atomic(plan, data)
            record = {"key": key.to_json(), "plan_sha256": sha256_file(plan), "bundle": bundle.id,
                      "built_on": platform.node(), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "build_seconds": round(seconds, 3)}  # fmt: skip
            _write_atomic(plan.with_suffix(KEY_SUFFIX), json.dumps(record, indent=2).encode())
            return PlanResult(plan, key, built=True, reason=reason, seconds=seconds, waited_for_lock=waited)
    except Timeout as exc:
        raise EngineUnavailable(f"TensorRT plan {plan}: another process held its build lock for {lock_timeout:g} s") from exc


# ---------------------------------------------------------------- building (needs tensorrt and a GPU)

def fp16_onnx(onnx_path: Path) -> bytes:
    """The model in float16 with float32 inputs and outputs (onnxconverter-common), for strongly typed builds.

    A graph output that other nodes also read (``features`` feeds the head) first gets its own Identity: the
    converter would otherwise feed its float32 copy to a float16 node.
    """
    import onnx

    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise EngineUnavailable("fp16 on TensorRT >= 11 needs onnxconverter-common (pip install 'survey-infer[gpu]')") from exc
    model = onnx.load(str(onnx_path))
    consumed = {name for node in model.graph.node for name in node.input}
    for output in model.graph.output:
        if output.name in consumed:
            inner = f"{output.name}__inner"
            for node in model.graph.node:
                node.input[:] = [inner if n == output.name else n for n in node.input]
                node.output[:] = [inner if n == output.name else n for n in node.output]
            model.graph.node.append(onnx.helper.make_node("Identity", [inner], [output.name], name=f"{output.name}__out"))
    converted = float16.convert_float_to_float16(model, keep_io_types=True)
    onnx.checker.check_model(converted)
    return converted.SerializeToString()


def tensorrt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def build_plan_bytes(bundle, key: PlanKey, calibration: dict[str, np.ndarray] | None = None) -> bytes:
    """Build a serialized plan from the bundle's ONNX for ``key`` (precision, profile) with TensorRT's API.

    TensorRT 10 (weakly typed): the fp32 ONNX with the FP16 (and INT8 + calibrator) builder flags. TensorRT >= 11
    (strongly typed only, precision flags and calibrators removed): fp32 from the ONNX as it is, fp16 from its
    float16 conversion (``fp16_onnx``); int8 would need an explicitly quantized (Q/DQ) model, which bundles do
    not carry yet, so it is refused.
    """
    trt = import_tensorrt()
    strongly_typed = tensorrt_major(trt) >= 11
    if strongly_typed and key.precision == "int8":
        raise EngineUnavailable(f"TensorRT {trt.__version__} builds int8 only from an explicitly quantized (Q/DQ) "
                                "model, which this bundle does not have; use fp16, or int8 on ONNX Runtime")  # fmt: skip
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if tensorrt_major(trt) < 10:  # explicit batch is the only mode from TensorRT 10 on
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    source = fp16_onnx(bundle.onnx_path) if strongly_typed and key.precision == "fp16" else bundle.onnx_path.read_bytes()
    if not parser.parse(source):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineUnavailable(f"TensorRT could not parse {bundle.onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    low, opt, high = key.profile
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        rest = tuple(tensor.shape)[1:]
        if any(d < 0 for d in rest):
            raise EngineUnavailable(f"input {tensor.name} has a dynamic axis other than the batch: {tuple(tensor.shape)}")
        profile.set_shape(tensor.name, (low, *rest), (opt, *rest), (high, *rest))
    config.add_optimization_profile(profile)
    if key.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32 (TF32 is on by default, ~1e-3 off)
    # strongly typed (TensorRT >= 11): the model's own types decide, no flag to set
    if not strongly_typed and key.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # int8 layers fall back to fp16, not fp32
    if not strongly_typed and key.precision == "int8":
        if not calibration:
            raise EngineUnavailable("an int8 TensorRT plan needs calibration rows (build-engine --calibration STORE)")
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = _calibrator(trt, calibration, [network.get_input(i).name for i in range(network.num_inputs)])
        config.set_calibration_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineUnavailable(f"TensorRT failed to build a {key.precision} plan for {bundle.id} (see its log above)")
    return bytes(serialized)


def _calibrator(trt, calibration: dict[str, np.ndarray], names: list[str], batch: int = 64):
    """An entropy calibrator over prepared engine inputs (TensorRT's implicit INT8 calibration)."""
    import torch

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self.rows = len(calibration[names[0]])
            self.start = 0
            self.device = {n: torch.empty((batch, *calibration[n].shape[1:]), dtype=torch.float32, device="cuda")
                           for n in names}  # fmt: skip

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, requested):
            if self.start + batch > self.rows:
                return None
            for name in names:
                self.device[name].copy_(torch.from_numpy(calibration[name][self.start : self.start + batch]))
            self.start += batch
            return [int(self.device[name].data_ptr()) for name in requested]

        def read_calibration_cache(self):
            return None

        def write_calibration_cache(self, cache) -> None:
            return None

    return Calibrator()


# ---------------------------------------------------------------- running

_TORCH_DTYPES = {"float32": "float32", "float16": "float16", "int32": "int32", "int64": "int64", "int8": "int8",
                 "uint8": "uint8", "bool": "bool"}  # every type trt.nptype maps


class TensorRTEngine(Engine):
    name = "tensorrt"

    def __init__(self, bundle, *, threads: int = 1, device: str = "auto", precision: str = "fp32",
                 max_batch: int = DEFAULT_MAX_BATCH):  # fmt: skip
        super().__init__(bundle)
        trt = import_tensorrt()
        if device == "cpu":
            raise EngineUnavailable("TensorRT runs on an NVIDIA GPU; --device cpu was asked for")
        if precision not in TRT_PRECISIONS:
            raise EngineUnavailable(f"TensorRT precision {precision!r}: choose one of {', '.join(TRT_PRECISIONS)}")
        import torch

        if not torch.cuda.is_available():
            raise EngineUnavailable("TensorRT needs an NVIDIA GPU: torch sees no CUDA device")
        # the GPU asked for (cuda:N), else the current one; TensorRT builds and runs on the current device
        self.device = torch.device(device) if device.startswith("cuda:") else torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(self.device)
        version, capability = current_target()
        wanted = plan_key(bundle, precision=precision, profile=default_profile(max_batch),
                          tensorrt_version=version, compute_capability=capability)  # fmt: skip
        directory = plan_dir(bundle)
        found = find_plan(directory, wanted) if directory.exists() else None
        if found is not None:  # e.g. one `survey-infer build-engine --max-batch` made
            self.plan = PlanResult(found, PlanKey.from_json(json.loads(found.with_suffix(KEY_SUFFIX).read_text())["key"]),
                                   built=False)  # fmt: skip
        elif precision == "int8":
            raise EngineUnavailable("no int8 TensorRT plan for this GPU: run `survey-infer build-engine BUNDLE "
                                    "--precision int8 --calibration STORE` first")  # fmt: skip
        else:
            self.plan = ensure_plan(bundle, wanted, build_plan_bytes, directory=directory)
        self.precision = precision
        self.trt_version = version
        self.compute_capability = capability
        logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.plan.path.read_bytes())
        if self._engine is None:
            raise EngineUnavailable(f"TensorRT could not deserialize {self.plan.path}")
        self._context = self._engine.create_execution_context()
        self.max_batch = self.plan.key.profile[2]
        self._stream = torch.cuda.Stream(device=self.device)
        self._lock = threading.Lock()  # one set of buffers: the worker's threads take turns on the GPU
        self._device_buffers: dict[str, Any] = {}
        self._host_buffers: dict[str, Any] = {}
        self._row_shapes: dict[str, tuple[int, ...]] = {}
        for index in range(self._engine.num_io_tensors):
            tensor = self._engine.get_tensor_name(index)
            shape = tuple(self._engine.get_tensor_shape(tensor))[1:]
            if any(d < 0 for d in shape):
                raise EngineUnavailable(f"TensorRT tensor {tensor} has a dynamic non-batch axis {shape}")
            dtype = getattr(torch, _TORCH_DTYPES[np.dtype(trt.nptype(self._engine.get_tensor_dtype(tensor))).name])
            self._row_shapes[tensor] = shape
            self._device_buffers[tensor] = torch.empty((self.max_batch, *shape), dtype=dtype, device=self.device)
            self._host_buffers[tensor] = torch.empty((self.max_batch, *shape), dtype=dtype, pin_memory=True)
            self._context.set_tensor_address(tensor, int(self._device_buffers[tensor].data_ptr()))
        missing = [n for n in (*self.input_names, *self.output_names) if n not in self._row_shapes]
        if missing:
            raise EngineUnavailable(f"TensorRT plan {self.plan.path.name} lacks tensors {missing}")

    def _run_piece(self, inputs: dict[str, np.ndarray], start: int, rows: int) -> dict[str, np.ndarray]:
        import torch

        with torch.cuda.stream(self._stream):
            for name in self.input_names:
                host = self._host_buffers[name][:rows]
                host.copy_(torch.from_numpy(np.ascontiguousarray(inputs[name][start : start + rows])))
                self._device_buffers[name][:rows].copy_(host, non_blocking=True)
                self._context.set_input_shape(name, (rows, *self._row_shapes[name]))
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            for name in self.output_names:
                self._host_buffers[name][:rows].copy_(self._device_buffers[name][:rows], non_blocking=True)
        self._stream.synchronize()
        return {name: self._host_buffers[name][:rows].float().numpy().copy() for name in self.output_names}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n_rows = len(inputs[self.input_names[0]])
        pieces: list[dict[str, np.ndarray]] = []
        with self._lock:
            for start in range(0, n_rows, self.max_batch):  # the last piece may be partial
                pieces.append(self._run_piece(inputs, start, min(self.max_batch, n_rows - start)))
        return {name: np.concatenate([p[name] for p in pieces]) for name in self.output_names}

    @property
    def uses_gpu(self) -> bool:
        return True

    def info(self) -> dict:
        return {"name": self.name, "device": str(self.device), "precision": self.precision,
                "tensorrt": self.trt_version, "compute_capability": self.compute_capability,
                "plan": self.plan.path.name, "profile": list(self.plan.key.profile), "plan_built": self.plan.built}  # fmt: skip
