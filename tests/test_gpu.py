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
