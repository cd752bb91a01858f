"""`--engine auto` (issue 13): tensorrt > torch-cuda > onnxruntime-cuda > onnxruntime-cpu > torch-cpu, each only if
installed and working; every pair passed over is recorded with its reason, up to run.json."""

from __future__ import annotations

import json

import numpy as np
import pytest

from survey_infer.bundle import default_bundle_path, load_bundle
from survey_infer.engines import EngineUnavailable, make_engine
from survey_infer.engines import base
from survey_infer.engines.torch_engine import TorchEngine, fixed_batch_pieces

ORDER = ["tensorrt-cuda", "torch-cuda", "onnxruntime-cuda", "onnxruntime-cpu", "torch-cpu"]


@pytest.fixture(scope="module")
def shipped():
    return load_bundle(default_bundle_path("mass_to_light"), task="mass_to_light")


def test_auto_on_a_cpu_machine_says_what_it_passed_over(shipped, monkeypatch):
    monkeypatch.setattr(base, "_cuda_visible", lambda: False)
    engine = make_engine("auto", shipped, threads=1)
    record = engine.describe()
    assert record["name"] == "onnxruntime" and record["auto"]["chosen"] == "onnxruntime-cpu"
    assert record["auto"]["order"] == ORDER
    assert [s["engine"] for s in record["auto"]["skipped"]] == ORDER[:3]
    assert all(s["reason"] == "no CUDA GPU visible to torch" for s in record["auto"]["skipped"])


class _Fake(base.Engine):
    """A stand-in engine: ``behaviour[(name, device)]`` is an exception to raise (on load or run) or None."""

    behaviour: dict = {}
    loads: list = []

    def __init__(self, bundle, *, threads=1, device="auto", precision="fp32"):
        super().__init__(bundle)
        self.device = device
        _Fake.loads.append((self.name, device))
        error = self.behaviour.get((self.name, device, "load"))
        if error is not None:
            raise error

    def run(self, inputs):
        error = self.behaviour.get((self.name, self.device, "run"))
        if error is not None:
            raise error
        n = len(next(iter(inputs.values())))
        return {name: np.zeros(n, np.float32) for name in self.output_names}

    @property
    def uses_gpu(self):
        return self.device.startswith("cuda")

    def info(self):
        return {"name": self.name, "device": self.device}


def _fake_classes(monkeypatch, behaviour, gpu: bool):
    classes = {name: type(f"Fake_{name}", (_Fake,), {"name": name}) for name in ("tensorrt", "torch", "onnxruntime")}
    _Fake.behaviour, _Fake.loads = behaviour, []
    monkeypatch.setattr(base, "_load_class", lambda name: classes[name])
    monkeypatch.setattr(base, "_cuda_visible", lambda: gpu)


def test_auto_order_on_a_gpu_node_skips_failing_engines_with_their_reasons(shipped, monkeypatch):
    _fake_classes(monkeypatch, {
        ("tensorrt", "cuda", "load"): EngineUnavailable("tensorrt is not installed"),
        ("torch", "cuda", "run"): RuntimeError("CUDA error: no kernel image is available"),  # installed, failing
    }, gpu=True)  # fmt: skip
    engine = make_engine("auto", shipped)
    assert engine.describe()["device"] == "cuda" and engine.name == "onnxruntime"
    selection = engine.describe()["auto"]
    assert selection["chosen"] == "onnxruntime-cuda"
    assert selection["skipped"] == [
        {"engine": "tensorrt-cuda", "reason": "tensorrt is not installed"},
        {"engine": "torch-cuda", "reason": "failed: RuntimeError: CUDA error: no kernel image is available"},
    ]
    assert _Fake.loads == [("tensorrt", "cuda"), ("torch", "cuda"), ("onnxruntime", "cuda")]  # stopped there


def test_auto_falls_back_to_torch_cpu_when_onnxruntime_fails(shipped, monkeypatch):
    _fake_classes(monkeypatch, {("onnxruntime", "cpu", "load"): OSError("libonnxruntime.so: cannot open")}, gpu=False)
    engine = make_engine("auto", shipped)
    assert engine.describe()["auto"]["chosen"] == "torch-cpu"
    assert engine.describe()["auto"]["skipped"][-1] == {"engine": "onnxruntime-cpu",
                                                        "reason": "failed: OSError: libonnxruntime.so: cannot open"}
    assert ("tensorrt", "cuda") not in _Fake.loads  # no GPU: not even imported


def test_device_restricts_the_order(shipped, monkeypatch):
    _fake_classes(monkeypatch, {}, gpu=True)
    assert make_engine("auto", shipped, device="cpu").describe()["auto"]["chosen"] == "onnxruntime-cpu"
    assert make_engine("auto", shipped, device="cuda:1").describe()["device"] == "cuda:1"  # the GPU asked for
    _fake_classes(monkeypatch, {}, gpu=False)
    with pytest.raises(EngineUnavailable, match="no engine works here: tensorrt-cuda: no CUDA GPU visible.*"
                                                "onnxruntime-cpu: --device cuda; torch-cpu: --device cuda"):
        make_engine("auto", shipped, device="cuda")


def test_fp16_needs_a_gpu(shipped, monkeypatch):
    monkeypatch.setattr(base, "_cuda_visible", lambda: False)
    with pytest.raises(EngineUnavailable, match="fp16 on a CUDA GPU only"):
        make_engine("torch", shipped, device="cpu", precision="fp16")
    with pytest.raises(EngineUnavailable, match="onnxruntime-cpu: ONNX Runtime runs the fp32 or the int8 model here, "
                                                "not fp16; torch-cpu: the torch engine runs fp16 on a CUDA GPU only"):
        make_engine("auto", shipped, precision="fp16")


def test_bundle_may_forbid_half_precision(shipped, monkeypatch):
    import torch

    from survey_infer.engines import torch_engine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(shipped.meta, "fp16", False)
    with pytest.raises(EngineUnavailable, match=r"forbids fp16 \(bundle.json \"fp16\": false\)"):
        torch_engine.TorchEngine(shipped, device="cuda", precision="fp16")


def test_fixed_batch_pieces_cover_every_row_once():
    assert fixed_batch_pieces(0, 4) == []
    assert fixed_batch_pieces(10, 4) == [(0, 4), (4, 4), (8, 2)]
    assert fixed_batch_pieces(8, 4) == [(0, 4), (4, 4)]
    for n in (1, 1023, 1024, 1025, 5000):
        pieces = fixed_batch_pieces(n, 1024)
        assert sum(rows for _, rows in pieces) == n and all(0 < rows <= 1024 for _, rows in pieces)
        assert [start for start, _ in pieces] == list(range(0, n, 1024))


def test_torch_cpu_unchanged_by_the_gpu_options(shipped):
    engine = TorchEngine(shipped, device="cpu", threads=1)
    assert engine.describe() == {"name": "torch", "device": "cpu", "precision": "fp32",
                                 "torch": __import__("torch").__version__}  # fmt: skip


def test_run_json_records_the_auto_choice(small_store, tiny_bundle, tmp_path):
    """tiny_bundle has no model.onnx: onnxruntime-cpu is passed over with that reason, torch-cpu runs."""
    from distributed import Client, LocalCluster

    from survey_infer.config import RunConfig
    from survey_infer.pipeline import run_pipeline

    config = RunConfig(task="mass_to_light", input=small_store, output=tmp_path / "out", bundle=tiny_bundle,
                       in_process=True, build_catalog=False, progress=False, device="cpu")  # fmt: skip
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:  # fmt: skip
        result = run_pipeline(config, client)
    assert result.exit_code == 0
    engine = json.loads((tmp_path / "out" / "run.json").read_text())["engine"]
    assert engine["name"] == "torch" and engine["auto"]["chosen"] == "torch-cpu"
    skipped = {s["engine"]: s["reason"] for s in engine["auto"]["skipped"]}
    assert skipped["tensorrt-cuda"] == skipped["torch-cuda"] == "--device cpu"
    assert "has no model.onnx" in skipped["onnxruntime-cpu"]


@pytest.mark.parametrize("flags, message", [
    (["--engine", "tensorrt"], "--engine tensorrt: tensorrt is not installed"),
    (["--engine", "torch", "--precision", "fp16"], "--engine torch: no CUDA GPU visible to torch"),
    (["--engine", "torch", "--precision", "int8"], "--engine torch: the torch engine runs fp32 or fp16"),
    (["--engine", "onnxruntime", "--precision", "fp16"], "--engine onnxruntime: ONNX Runtime runs the fp32 or the int8"),
    (["--engine", "tensorrt", "--device", "cpu"], "--engine tensorrt: "),
])  # fmt: skip
def test_run_refuses_an_engine_that_cannot_run_here(flags, message, small_store, tmp_path, monkeypatch, capsys):
    from survey_infer.cli import main

    monkeypatch.setattr(base, "_cuda_visible", lambda: False)
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)  # as on this machine, wherever the test runs
    code = main(["run", "mass_to_light", "--input", str(small_store), "--output", str(tmp_path / "o"), *flags])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_unavailable_reason_sees_onnxruntime_without_cuda(monkeypatch):
    import types

    monkeypatch.setattr(base, "_cuda_visible", lambda: True)
    cpu_only = types.SimpleNamespace(get_available_providers=lambda: ["CPUExecutionProvider"])
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", cpu_only)
    assert base.unavailable_reason("onnxruntime", "cuda") == "CUDA was asked for but onnxruntime has no CUDAExecutionProvider"
    assert base.unavailable_reason("onnxruntime", "auto") is None
    assert base.unavailable_reason("torch", "cuda", "fp16") is None
    assert base.unavailable_reason("auto", "cuda", "fp16") is None
