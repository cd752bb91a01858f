"""Training writes a loadable bundle; ONNX export matches torch; the shipped bundle's engines agree."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deploy.export import export_onnx
from survey_infer.bundle import ONNX_FILE, WEIGHTS_FILE, default_bundle_path, list_shipped_bundles, load_bundle
from survey_infer.engines import make_engine
from survey_infer.errors import BundleError
from survey_infer.tasks import get_task
from training.train import EVAL_SEEDS, train_mass_to_light

TOL = 1e-4


def _engines_agree(bundle, n_rows: int, seed: int = 0) -> float:
    task = get_task(bundle.task)
    inputs = task.example_inputs(bundle, n_rows, seed=seed)
    ort_out = make_engine("onnxruntime", bundle, threads=1).run(inputs)
    torch_out = make_engine("torch", bundle, threads=1, device="cpu").run(inputs)
    worst = 0.0
    for name in bundle.meta["engine_io"]["outputs"]:
        assert ort_out[name].shape == torch_out[name].shape
        assert ort_out[name].shape[0] == n_rows and (ort_out[name].ndim == 1 or name == "features")  # features: (N, D)
        assert np.isfinite(ort_out[name]).all()
        worst = max(worst, float(np.max(np.abs(ort_out[name] - torch_out[name]))))
    assert worst <= TOL, f"onnxruntime and torch differ by {worst}"
    return worst


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles")
    bundle_dir = train_mass_to_light(out, n_train=256, n_val=64, size=69, epochs=1, width=4, seed=3, threads=2)
    export_onnx(bundle_dir)
    return bundle_dir


def test_tiny_training_bundle_loads_and_engines_agree(tiny_bundle):
    assert tiny_bundle.name == "mass_to_light-base-v1"
    bundle = load_bundle(tiny_bundle, task="mass_to_light")
    meta = bundle.meta
    assert set(meta["files"]) == {WEIGHTS_FILE, ONNX_FILE}
    assert meta["architecture"] == {"name": "ml_cnn", "kwargs": {"in_channels": 1, "n_meta": 3, "width": 4}}
    assert meta["engine_io"] == {"inputs": ["image", "meta"], "outputs": ["ml_g", "ml_g_logvar"]}
    assert meta["input_spec"]["image"]["shape"] == [1, 69, 69]
    spec = meta["input_spec"]["meta"]
    assert spec["columns"] == ["distance_mpc", "lum_g", "size_kpc"] and spec["transform"] == "log10"
    assert len(spec["mean"]) == len(spec["std"]) == 3 and all(s > 0 for s in spec["std"])
    training = meta["training"]
    assert training["n_train"] == 256 and training["epochs_run"] == 1 and training["best_epoch"] == 1
    assert {"rmse", "r2"} <= set(training["validation"])
    seeds = set(training["seeds"]["train"]) | set(training["seeds"]["val"])
    assert not seeds & set(EVAL_SEEDS.values())
    assert set(training["seeds"]["train"]).isdisjoint(training["seeds"]["val"])
    assert meta["onnx"]["max_abs_diff"] <= TOL
    _engines_agree(bundle, 32)
    # A dynamic batch axis: a single row and an odd batch run too.
    _engines_agree(bundle, 1, seed=1)
    _engines_agree(bundle, 37, seed=2)


def test_image_only_bundle(tmp_path):
    bundle_dir = train_mass_to_light(tmp_path, n_train=128, n_val=32, epochs=1, width=4, use_meta=False,
                                     name="imgonly", version=2, threads=2)  # fmt: skip
    export_onnx(bundle_dir)
    bundle = load_bundle(bundle_dir)
    assert bundle.id == "mass_to_light-imgonly-v2"
    assert bundle.meta["engine_io"]["inputs"] == ["image"]
    assert "meta" not in bundle.input_spec
    assert bundle.meta["architecture"]["kwargs"]["n_meta"] == 0
    _engines_agree(bundle, 16)


def test_existing_bundle_is_not_overwritten(tiny_bundle):
    with pytest.raises(FileExistsError):
        train_mass_to_light(tiny_bundle.parent, n_train=16, n_val=8, epochs=1, width=4, seed=3)


def test_tampered_onnx_is_refused(tiny_bundle, tmp_path):
    import shutil

    copy = tmp_path / tiny_bundle.name
    shutil.copytree(tiny_bundle, copy)
    with open(copy / ONNX_FILE, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match="model.onnx"):
        load_bundle(copy)


def test_default_bundle_is_the_images_only_69px_one():
    bundle = load_bundle(default_bundle_path("mass_to_light"), task="mass_to_light")
    assert bundle.id == "mass_to_light-img69-v3"
    assert "meta" not in bundle.input_spec and bundle.input_spec["image"]["shape"] == [1, 69, 69]


# mass_to_light's bundles; star_clusters' shipped bundle is checked in tests/test_star_clusters.py.
@pytest.mark.parametrize("bundle", [b for b in list_shipped_bundles() if b.task == "mass_to_light"], ids=lambda b: b.id)
def test_shipped_bundles_onnx_match_torch_and_record_their_training(bundle):
    assert bundle.onnx_path is not None
    training = json.loads((bundle.path / "bundle.json").read_text())["training"]
    assert training["simulator"] == "universe" and training["training_data"]["versions"]["bagpipes"]
    assert not set(training["seeds"]["train"] + training["seeds"]["val"]) & set(EVAL_SEEDS.values())
    assert training["validation"]["r2"] > 0.4
    assert 0.3 < bundle.output_spec["ml_g_err"]["scale"] < 3
    _engines_agree(bundle, 64)


def test_dynamo_exporter_fallback(tiny_bundle, tmp_path, monkeypatch):
    """Where the TorchScript exporter is gone, the dynamo exporter gives an equally valid model.onnx."""
    import shutil

    import deploy.export as export

    copy = tmp_path / tiny_bundle.name
    shutil.copytree(tiny_bundle, copy)

    def gone(*args, **kwargs):
        raise TypeError("torch.onnx.export() got an unexpected keyword argument 'dynamo'")

    monkeypatch.setattr(export, "EXPORTERS", (("torchscript", gone), *export.EXPORTERS[1:]))
    export_onnx(copy)
    bundle = load_bundle(copy)
    assert bundle.meta["onnx"]["exporter"] == "dynamo"
    assert bundle.meta["onnx"]["fallback_from"][0].startswith("torchscript: TypeError")
    _engines_agree(bundle, 64)
    _engines_agree(bundle, 1, seed=1)
