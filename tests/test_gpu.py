"""GPU checks (marker `gpu`): CUDA engines give the numbers of PyTorch float32 on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from survey_infer.bundle import default_bundle_path, load_bundle
from survey_infer.engines import EngineUnavailable, make_engine
from survey_infer.tasks import get_task

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch"),
]
FP32_TOLERANCE = 1e-3  # TF32/cuDNN algorithm choices differ from the CPU's summation order
FP16_TOLERANCE = 2e-2  # half precision: ~3 significant digits on O(1) outputs


@pytest.fixture(scope="module")
def setup():
    bundle = load_bundle(default_bundle_path("mass_to_light"), task="mass_to_light")
    inputs = get_task("mass_to_light").example_inputs(bundle, 512, seed=9)
    expected = make_engine("torch", bundle, threads=4, device="cpu").run(inputs)
    return bundle, inputs, expected


def check(got, expected, tolerance):
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, atol=tolerance, rtol=0, err_msg=key)


def test_torch_cuda_fp32_matches_cpu(setup):
    bundle, inputs, expected = setup
    check(make_engine("torch", bundle, device="cuda").run(inputs), expected, FP32_TOLERANCE)


def test_torch_cuda_fp16_matches_cpu(setup):
    from survey_infer.engines.torch_engine import TorchEngine

    bundle, inputs, expected = setup
    check(TorchEngine(bundle, device="cuda", half=True).run(inputs), expected, FP16_TOLERANCE)


def test_onnxruntime_cuda_matches_cpu(setup):
    bundle, inputs, expected = setup
    try:
        engine = make_engine("onnxruntime", bundle, device="cuda")
    except EngineUnavailable as exc:
        pytest.skip(str(exc))
    check(engine.run(inputs), expected, FP32_TOLERANCE)


def test_auto_picks_an_engine_that_uses_the_gpu(setup):
    bundle, _, _ = setup
    engine = make_engine("auto", bundle)
    assert engine.uses_gpu, engine.describe()


# ---------------------------------------------------------------- issue 13: CUDA graphs, TensorRT, auto on a GPU

@pytest.mark.parametrize("rows", [1, 100, 1024, 1500])  # partial, full and more-than-one fixed batch
def test_torch_cuda_graph_matches_cpu_on_partial_batches(setup, rows):
    from survey_infer.engines.torch_engine import TorchEngine

    bundle, inputs, expected = setup
    engine = TorchEngine(bundle, device="cuda", cuda_batch=256)
    big = {k: np.concatenate([v] * 3) for k, v in inputs.items()}  # 1536 rows
    want = make_engine("torch", bundle, threads=4, device="cpu").run({k: v[:rows] for k, v in big.items()})
    check(engine.run({k: v[:rows] for k, v in big.items()}), want, FP32_TOLERANCE)
    assert engine.describe()["cuda_graph"], engine.describe()


def test_torch_cuda_eager_fallback_gives_the_same_numbers(setup):
    from survey_infer.engines.torch_engine import TorchEngine

    bundle, inputs, expected = setup
    engine = TorchEngine(bundle, device="cuda", cuda_graphs=False)
    check(engine.run(inputs), expected, FP32_TOLERANCE)
    assert not engine.describe()["cuda_graph"]


def _tensorrt_or_skip():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pytest.skip("tensorrt is not installed on this GPU machine")


@pytest.mark.parametrize("precision, tolerance", [("fp32", FP32_TOLERANCE), ("fp16", FP16_TOLERANCE)])
def test_tensorrt_matches_cpu_fp32(setup, tmp_path, monkeypatch, precision, tolerance):
    _tensorrt_or_skip()
    from survey_infer.engines.tensorrt_engine import CACHE_ENV, TensorRTEngine

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    bundle, inputs, expected = setup
    engine = TensorRTEngine(bundle, precision=precision, max_batch=200)  # 512 rows: 200 + 200 + a partial 112
    assert engine.describe()["plan_built"]
    check(engine.run(inputs), expected, tolerance)
    again = TensorRTEngine(bundle, precision=precision, max_batch=200)
    assert not again.describe()["plan_built"]  # the cached plan, its key matching
    check(again.run({k: v[:7] for k, v in inputs.items()}), {k: v[:7] for k, v in expected.items()}, tolerance)


def test_auto_prefers_tensorrt_then_torch_cuda(setup, tmp_path, monkeypatch):
    from survey_infer.engines.tensorrt_engine import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    bundle, _, _ = setup
    selection = make_engine("auto", bundle).describe()["auto"]
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert selection["chosen"] == "torch-cuda"
        assert selection["skipped"][0]["engine"] == "tensorrt-cuda"
    else:
        assert selection["chosen"] == "tensorrt-cuda", selection


def test_torch_cuda_slots_give_each_thread_its_own_rows(setup):
    """Threads sharing one engine (as a worker's do) each get their own rows back, through both slots."""
    from concurrent.futures import ThreadPoolExecutor

    from survey_infer.engines.torch_engine import TorchEngine

    bundle, inputs, expected = setup
    engine = TorchEngine(bundle, device="cuda", cuda_batch=128)
    slices = [slice(s, s + 64) for s in range(0, 512, 64)] * 4
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda s: (s, engine.run({k: v[s] for k, v in inputs.items()})), slices))
    for s, got in results:
        check(got, {k: v[s] for k, v in expected.items()}, FP32_TOLERANCE)
    assert engine.describe()["cuda_slots"] == 2
