"""Every engine that runs here gives the numbers of PyTorch float32 on the shipped bundle, within tolerance."""

from __future__ import annotations

import numpy as np
import pytest

from survey_infer.bundle import default_bundle_path, load_bundle
from survey_infer.engines import ENGINE_NAMES, EngineUnavailable, make_engine
from survey_infer.tasks import get_task

# float32 kernels differ in summation order between back ends: outputs are O(1), so 1e-4 absolute is tight
# enough to catch a wrong layout, normalisation or weight, and loose enough for honest rounding differences.
ABS_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def shipped():
    return load_bundle(default_bundle_path("mass_to_light"), task="mass_to_light")


@pytest.fixture(scope="module")
def reference(shipped):
    inputs = get_task("mass_to_light").example_inputs(shipped, 64, seed=3)
    return inputs, make_engine("torch", shipped, threads=2, device="cpu").run(inputs)


@pytest.mark.parametrize("name", [n for n in ENGINE_NAMES if n != "torch"])
def test_engine_matches_torch_float32(name, shipped, reference):
    inputs, expected = reference
    try:
        engine = make_engine(name, shipped, threads=2)
    except EngineUnavailable as exc:
        pytest.skip(f"{name} engine not available here: {exc}")
    got = engine.run(inputs)
    assert set(got) == set(expected)
    for key in expected:
        assert got[key].shape == expected[key].shape
        np.testing.assert_allclose(got[key], expected[key], atol=ABS_TOLERANCE, rtol=0, err_msg=f"{name}: {key}")


def test_auto_picks_a_working_engine_and_says_which(shipped):
    engine = make_engine("auto", shipped, threads=1)
    assert engine.describe()["name"] in ("tensorrt", "onnxruntime", "torch")


def test_tensorrt_says_why_it_is_unavailable(shipped):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(EngineUnavailable, match="not installed"):
            make_engine("tensorrt", shipped)
    else:
        pytest.skip("tensorrt is installed: the GPU tests cover it")


def test_engines_keep_row_order_across_batch_sizes(shipped):
    engine = make_engine("torch", shipped, threads=1, device="cpu")
    inputs = get_task("mass_to_light").example_inputs(shipped, 10, seed=5)
    whole = engine.run(inputs)["ml_g"]
    halves = np.concatenate([engine.run({k: v[s] for k, v in inputs.items()})["ml_g"]
                             for s in (slice(0, 3), slice(3, 10))])  # fmt: skip
    np.testing.assert_allclose(whole, halves, atol=1e-5)
