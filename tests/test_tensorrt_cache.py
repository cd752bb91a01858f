"""TensorRT plans without a GPU (issue 13): the cache key, the build-once file lock, the rebuild decision, where
plans live, and the refusals where TensorRT or a GPU is missing. The build itself is `gpu`-marked (test_gpu.py)."""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
import types
from pathlib import Path

import pytest

from survey_infer.bundle import default_bundle_path, load_bundle
from survey_infer.cli import main
from survey_infer.engines import EngineUnavailable
from survey_infer.engines import tensorrt_engine as trt_engine
from survey_infer.engines.tensorrt_engine import PlanKey, ensure_plan, find_plan, plan_key, plan_status

PROFILE = (1, 256, 1024)


@pytest.fixture(scope="module")
def shipped():
    return load_bundle(default_bundle_path("mass_to_light"), task="mass_to_light")


def key(**changes) -> PlanKey:
    fields = {"onnx_sha256": "a" * 64, "tensorrt": "10.3.0", "compute_capability": "9.0", "precision": "fp16",
              "profile": PROFILE}  # fmt: skip
    return PlanKey(**{**fields, **changes})


class Builds:
    """A stand-in for TensorRT's builder: returns bytes that name the key, counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, bundle, k: PlanKey) -> bytes:
        self.calls += 1
        return json.dumps(k.to_json()).encode()


def test_key_has_every_field_design_md_names(shipped):
    k = plan_key(shipped, precision="fp16", profile=PROFILE, tensorrt_version="10.3.0", compute_capability="9.0")
    assert k.onnx_sha256 == shipped.meta["files"]["model.onnx"]  # the file bundle.json pins, checked on load
    assert (k.tensorrt, k.compute_capability, k.precision, k.profile) == ("10.3.0", "9.0", "fp16", PROFILE)
    assert k.filename().startswith("trt10.3.0-sm90-fp16-b1-256-1024-") and k.filename().endswith(".plan")
    variants = [key(), key(onnx_sha256="b" * 64), key(tensorrt="10.4.0"), key(compute_capability="8.0"),
                key(precision="fp32"), key(profile=(1, 256, 2048)), key(profile=(1, 128, 1024))]  # fmt: skip
    assert len({v.digest() for v in variants}) == len({v.filename() for v in variants}) == len(variants)
    assert PlanKey.from_json(json.loads(json.dumps(key().to_json()))) == key()


@pytest.mark.parametrize("changes, message", [
    ({"precision": "bf16"}, "precision 'bf16'"),
    ({"profile": (0, 1, 2)}, "need 1 <= min <= opt <= max"),
    ({"profile": (1, 512, 256)}, "need 1 <= min <= opt <= max"),
])  # fmt: skip
def test_key_refuses_nonsense(changes, message):
    with pytest.raises(EngineUnavailable, match=message):
        key(**changes)


def test_default_profile():
    assert trt_engine.default_profile() == (1, 256, 1024)
    assert trt_engine.default_profile(64) == (1, 64, 64)
    with pytest.raises(EngineUnavailable, match="--opt-batch 9 must lie in 1..8"):
        trt_engine.default_profile(8, 9)


def test_built_once_then_loaded(shipped, tmp_path):
    build = Builds()
    first = ensure_plan(shipped, key(), build, directory=tmp_path)
    again = ensure_plan(shipped, key(), build, directory=tmp_path)
    assert build.calls == 1 and first.built and not again.built and first.path == again.path
    assert first.reason.startswith("no plan ")
    sidecar = json.loads(first.path.with_suffix(".json").read_text())
    assert PlanKey.from_json(sidecar["key"]) == key() and len(sidecar["plan_sha256"]) == 64
    assert ensure_plan(shipped, key(), build, directory=tmp_path, force=True).built and build.calls == 2
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically


def test_a_plan_whose_key_does_not_match_is_rebuilt_never_loaded(shipped, tmp_path):
    build = Builds()
    plan = ensure_plan(shipped, key(), build, directory=tmp_path).path
    assert plan_status(plan, key()) == (True, "")
    # the same file name asked for under another key (a copied cache, a tampered key file): refused
    ok, why = plan_status(plan, key(compute_capability="8.0"))
    assert not ok and why == "key mismatch: compute_capability 9.0 != 8.0"
    ok, why = plan_status(plan, key(tensorrt="10.4.0", precision="fp32"))
    assert not ok and why == "key mismatch: tensorrt 10.3.0 != 10.4.0, precision fp16 != fp32"
    # another GPU or TensorRT maps to another file: built fresh, the old plan untouched
    other = ensure_plan(shipped, key(compute_capability="8.0"), build, directory=tmp_path)
    assert other.built and other.path != plan and build.calls == 2 and plan.exists()
    # a plan that does not match its recorded sha256 (truncated copy) is rebuilt
    plan.write_bytes(plan.read_bytes()[:5])
    assert "does not match its recorded sha256" in plan_status(plan, key())[1]
    redo = ensure_plan(shipped, key(), build, directory=tmp_path)
    assert redo.built and "sha256" in redo.reason and plan_status(plan, key()) == (True, "")
    # a key file that says another key for this file name: rebuilt
    sidecar = plan.with_suffix(".json")
    record = json.loads(sidecar.read_text())
    record["key"]["compute_capability"] = "7.5"
    sidecar.write_text(json.dumps(record))
    redo = ensure_plan(shipped, key(), build, directory=tmp_path)
    assert redo.built and redo.reason == "key mismatch: compute_capability 7.5 != 9.0"
    sidecar.unlink()
    assert "has no key file" in ensure_plan(shipped, key(), build, directory=tmp_path).reason


def test_find_plan_takes_the_largest_profile_of_the_same_target(shipped, tmp_path):
    build = Builds()
    small = ensure_plan(shipped, key(profile=(1, 64, 256)), build, directory=tmp_path).path
    large = ensure_plan(shipped, key(profile=(1, 256, 4096)), build, directory=tmp_path).path
    ensure_plan(shipped, key(profile=(1, 256, 8192), compute_capability="8.6"), build, directory=tmp_path)
    ensure_plan(shipped, key(profile=(1, 256, 8192), precision="fp32"), build, directory=tmp_path)
    assert find_plan(tmp_path, key()) == large
    large.write_bytes(b"broken")  # an invalid plan is never chosen
    assert find_plan(tmp_path, key()) == small
    assert find_plan(tmp_path, key(tensorrt="9.9.9")) is None


def _build_in_process(directory: str, log: str, barrier) -> None:
    bundle = load_bundle(default_bundle_path("mass_to_light"))

    def slow(b, k):
        with open(log, "a") as handle:
            handle.write("build\n")
        time.sleep(0.5)
        return b"plan"

    barrier.wait(timeout=30)
    result = ensure_plan(bundle, key(), slow, directory=Path(directory), lock_timeout=30)
    assert result.path.read_bytes() == b"plan"


def test_workers_starting_together_build_once(tmp_path):
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(3)
    log = tmp_path / "builds.log"
    workers = [context.Process(target=_build_in_process, args=(str(tmp_path), str(log), barrier)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert log.read_text() == "build\n"  # three processes, one build


def test_a_held_lock_times_out_clearly(shipped, tmp_path):
    from filelock import FileLock

    k = key()
    with FileLock(str(tmp_path / k.filename()) + ".lock"):
        with pytest.raises(EngineUnavailable, match="held its build lock for 0.2 s"):
            ensure_plan(shipped, k, Builds(), directory=tmp_path, lock_timeout=0.2)


def test_plan_dir(shipped, tmp_path, monkeypatch):
    monkeypatch.setenv(trt_engine.CACHE_ENV, str(tmp_path))
    assert trt_engine.plan_dir(shipped) == tmp_path / f"{shipped.id}-{shipped.sha256()[:12]}"
    monkeypatch.delenv(trt_engine.CACHE_ENV)
    monkeypatch.setattr(trt_engine, "_writable", lambda directory: False)  # a read-only site-packages
    assert trt_engine.plan_dir(shipped) == Path.home() / ".cache" / "survey-infer" / "engines" / \
        f"{shipped.id}-{shipped.sha256()[:12]}"  # fmt: skip


def _without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def test_engine_and_cli_refuse_clearly_without_tensorrt(shipped, monkeypatch, capsys):
    _without_tensorrt(monkeypatch)
    with pytest.raises(EngineUnavailable, match=r"tensorrt is not installed \(pip install 'survey-infer\[gpu\]'"):
        trt_engine.TensorRTEngine(shipped)
    assert main(["build-engine", str(shipped.path)]) == 2
    assert "refused: build-engine: tensorrt is not installed" in capsys.readouterr().err
    assert main(["build-engine", str(shipped.path), "--precision", "int8"]) == 2
    assert "--precision int8 needs --calibration STORE" in capsys.readouterr().err


def test_engine_refuses_without_a_gpu(shipped, monkeypatch):
    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))  # importable, no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EngineUnavailable, match="runs on an NVIDIA GPU; --device cpu"):
        trt_engine.TensorRTEngine(shipped, device="cpu")
    with pytest.raises(EngineUnavailable, match="torch sees no CUDA device"):
        trt_engine.TensorRTEngine(shipped)
    with pytest.raises(EngineUnavailable, match="no model.onnx"):
        trt_engine.onnx_sha256(types.SimpleNamespace(onnx_path=None, id="x"))


# ---------------------------------------------------------------- the builder's use of the TensorRT API, on a stand-in
# (the real build runs in test_gpu.py; here: profile shapes from the bundle's ONNX, flags per precision, errors)

class _FakeTensorRT(types.ModuleType):
    """Just enough of the tensorrt module for build_plan_bytes; records what the builder was asked for."""

    def __init__(self, parse_ok=True, plan=b"PLAN", version="10.3.0"):
        super().__init__("tensorrt")
        import onnx

        fake = self
        self.__version__ = version
        self.calls = {"profile": {}, "flags": set(), "cleared": set(), "network_flags": None}
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity: None})
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        self.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8", TF32="TF32")

        class Network:
            inputs: list = []

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, index):
                return self.inputs[index]

        class Parser:
            num_errors = 0 if parse_ok else 1

            def __init__(self, network, logger):
                self.network = network

            def parse(self, data):
                model = onnx.load_from_string(data)
                fake.calls["float16_initializers"] = sum(i.data_type == onnx.TensorProto.FLOAT16
                                                         for i in model.graph.initializer)  # fmt: skip
                fake.calls["io_types"] = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
                self.network.inputs = [
                    types.SimpleNamespace(name=i.name, shape=tuple(d.dim_value if d.dim_value else -1
                                                                   for d in i.type.tensor_type.shape.dim))
                    for i in model.graph.input]  # fmt: skip
                return parse_ok

            def get_error(self, index):
                return "In node 3 (Conv): unsupported padding"

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls["workspace"] = size

            def set_flag(self, flag):
                fake.calls["flags"].add(flag)

            def clear_flag(self, flag):
                fake.calls["cleared"].add(flag)

            def add_optimization_profile(self, profile):
                fake.calls["profiles_added"] = fake.calls.get("profiles_added", 0) + 1

        class Profile:
            def set_shape(self, name, low, opt, high):
                fake.calls["profile"][name] = (low, opt, high)

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls["network_flags"] = flags
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return plan

        self.OnnxParser, self.Builder = Parser, Builder


@pytest.mark.parametrize("version", ["10.3.0", "11.4.0"])
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_builder_profile_and_flags(shipped, monkeypatch, precision, version):
    strongly_typed = version.startswith("11")
    if strongly_typed and precision == "fp16":
        pytest.importorskip("onnxconverter_common", reason="fp16 on TensorRT 11 converts the ONNX (the gpu extra)")
    fake = _FakeTensorRT(version=version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    plan = trt_engine.build_plan_bytes(shipped, key(precision=precision, profile=(1, 64, 512)))
    assert plan == b"PLAN" and fake.calls["network_flags"] == 0  # TensorRT >= 10: explicit batch, no flag
    assert fake.calls["profile"] == {"image": ((1, 1, 69, 69), (64, 1, 69, 69), (512, 1, 69, 69))}
    assert fake.calls["profiles_added"] == 1
    assert set(fake.calls["io_types"].values()) == {1}  # float32 in and out, whatever runs inside
    if precision == "fp32":
        assert fake.calls["flags"] == set() and fake.calls["cleared"] == {"TF32"}  # fp32 means fp32
        assert fake.calls["float16_initializers"] == 0
    elif strongly_typed:  # TensorRT 11: no precision flags; the parsed model itself is float16
        assert fake.calls["flags"] == set() and fake.calls["float16_initializers"] > 0
    else:  # TensorRT 10: the fp32 model with the FP16 flag
        assert fake.calls["flags"] == {"FP16"} and fake.calls["float16_initializers"] == 0


def test_tensorrt_11_refuses_int8_without_a_qdq_model(shipped, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTensorRT(version="11.4.0"))
    with pytest.raises(EngineUnavailable, match="int8 only from an explicitly quantized"):
        trt_engine.build_plan_bytes(shipped, key(precision="int8"), calibration={"image": None})


def test_fp16_onnx_gives_the_fp32_numbers_within_fp16_tolerance(shipped):
    """The float16 model TensorRT 11 builds from, run here by ONNX Runtime's CPU provider."""
    pytest.importorskip("onnxconverter_common", reason="onnxconverter-common (the gpu and dev extras) not installed")
    import numpy as np
    import onnx
    import onnxruntime as ort

    from survey_infer.tasks import get_task

    data = trt_engine.fp16_onnx(shipped.onnx_path)
    model = onnx.load_from_string(data)
    assert sum(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer) > 0
    inputs = get_task("mass_to_light").example_inputs(shipped, 64, seed=4)
    fp32 = ort.InferenceSession(str(shipped.onnx_path), providers=["CPUExecutionProvider"]).run(None, inputs)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    fp16 = session.run(None, inputs)
    assert [o.name for o in session.get_outputs()] == shipped.meta["engine_io"]["outputs"]
    for want, got in zip(fp32, fp16):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=2e-2, rtol=0)  # the tolerance test_gpu.py states for fp16
        assert not np.array_equal(got, want)  # really another precision


def test_builder_errors_are_engine_unavailable(shipped, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTensorRT(parse_ok=False))
    with pytest.raises(EngineUnavailable, match="could not parse .*model.onnx: In node 3 \\(Conv\\): unsupported padding"):
        trt_engine.build_plan_bytes(shipped, key())
    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTensorRT(plan=None))
    with pytest.raises(EngineUnavailable, match="failed to build a fp16 plan"):
        trt_engine.build_plan_bytes(shipped, key())
    with pytest.raises(EngineUnavailable, match="int8 TensorRT plan needs calibration rows"):
        trt_engine.build_plan_bytes(shipped, key(precision="int8"))
