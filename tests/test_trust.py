"""Trust (issue 12): the features output, ood_score and the ood flag on every row, the run record's trust
section, --ood-threshold, a tampered trust file refused, the error recalibration, and fitting trust."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from distributed import Client, LocalCluster

from survey_infer.bundle import BUNDLE_JSON, default_bundle_path, load_bundle, sha256_file, write_json_atomic
from survey_infer.config import RunConfig
from survey_infer.engines import make_engine
from survey_infer.errors import BundleError, RefusedError
from survey_infer.flags import FLAG_BITS
from survey_infer.pipeline import run_pipeline
from survey_infer.store import write_block
from survey_infer.trust import TRUST_FILE, load_trust
from tests.conftest import make_tiny_bundle, read_parts
from training.mock import write_mock_cutouts
from training.trust import Z_68, Z_95, coverage, fit_error_scale, fit_trust, run_rows, simulate_in_distribution

N_MOCK, N_NOISE = 96, 16  # rows 0-95 mock galaxies; 96-103 uniform noise, 104-111 blank sky (log-scaled)


@pytest.fixture(scope="module")
def shipped() -> Path:
    path = default_bundle_path("mass_to_light")
    if load_trust(load_bundle(path)) is None:
        pytest.skip(f"shipped bundle {path.name} carries no trust description")
    return path


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            yield client


@pytest.fixture(scope="module")
def ood_store(tmp_path_factory) -> Path:
    """Mock galaxies, then pure-noise and blank-sky cutouts (as a store holds them: log-scaled to [-1, 1])."""
    from survey_infer.imaging import log_scale

    store = write_mock_cutouts(tmp_path_factory.mktemp("trust") / "ood.zarr", N_MOCK + N_NOISE, seed=12,
                               rows_per_unit=64, rows_per_batch=32)  # fmt: skip
    group = zarr.open_group(str(store), mode="r+")
    images = group["images"][64:128]
    rng = np.random.default_rng(0)
    k = N_MOCK - 64
    images[k : k + 8] = rng.uniform(-1, 1, (8, *images.shape[1:]))
    images[k + 8 : k + 16, 0] = log_scale(rng.normal(0, 1, (8, *images.shape[2:])), np.ones(8))
    write_block(group, 64, images, {})
    return store


def _run(store, out, bundle, client, engine="onnxruntime", **kwargs):
    config = RunConfig(task="mass_to_light", input=store, output=out, bundle=bundle, engine=engine,
                       progress=False, build_catalog=False, **kwargs)  # fmt: skip
    result = run_pipeline(config, client)
    assert result.exit_code == 0
    return read_parts(out).set_index("object_id").sort_index(), result.record


def test_features_output_torch_matches_onnx_and_int8_has_it(shipped):
    bundle = load_bundle(shipped)
    assert bundle.meta["engine_io"]["outputs"][-1] == "features"
    images = simulate_in_distribution(bundle, 24, seed=5).images
    torch_out = make_engine("torch", bundle, threads=1).run({"image": images})
    onnx_out = make_engine("onnxruntime", bundle, threads=1).run({"image": images})
    assert torch_out["features"].shape == (24, bundle.meta["architecture"]["kwargs"].get("hidden", 512))
    np.testing.assert_allclose(onnx_out["features"], torch_out["features"], atol=1e-4)
    if "model.int8.onnx" in bundle.meta["files"]:
        int8 = make_engine("onnxruntime", bundle, threads=1, precision="int8").run({"image": images})
        assert int8["features"].shape == torch_out["features"].shape


def test_run_scores_every_row_and_flags_noise_without_nulling(shipped, ood_store, tmp_path, client):
    table, record = _run(ood_store, tmp_path / "out", shipped, client)
    trust = load_trust(load_bundle(shipped))
    schema = pq.read_schema(next((tmp_path / "out" / "parts").glob("*.parquet")))
    assert schema.field("ood_score").type == "float" and b"Mahalanobis" in schema.field("ood_score").metadata[b"description"]
    assert np.isfinite(table["ood_score"]).all()
    ood = (table["flag"] & FLAG_BITS["ood"]) != 0
    np.testing.assert_array_equal(ood, table["ood_score"] > trust.threshold)
    noise = table.index >= N_MOCK
    assert ood[noise].all()  # every pure-noise and blank-sky cutout
    assert ood[~noise].mean() < 0.1  # in-distribution mocks: ~1% by construction
    assert np.isfinite(table.loc[ood, "ml_g"]).all()  # a warning: the estimate is kept
    assert all("ood" in r.split(",") for r in table.loc[ood, "flag_reason"])
    section = record["trust"]
    assert section["enabled"] and section["source"] == "bundle" and section["quantile"] == 0.99
    assert section["threshold"] == pytest.approx(trust.threshold)
    assert section["rows_flagged_ood"] == int(ood.sum())
    assert json.loads((tmp_path / "out" / "run.json").read_text())["trust"] == section


def test_ood_threshold_override_changes_the_flagged_count(shipped, ood_store, tmp_path, client):
    default, _ = _run(ood_store, tmp_path / "a", shipped, client)
    table, record = _run(ood_store, tmp_path / "b", shipped, client, ood_threshold=0.5)
    trust = load_trust(load_bundle(shipped))
    section = record["trust"]
    assert section["source"] == "--ood-threshold" and section["quantile"] == 0.5
    assert section["threshold"] == pytest.approx(np.quantile(trust.reference_scores, 0.5))
    flagged = int(((table["flag"] & FLAG_BITS["ood"]) != 0).sum())
    assert section["rows_flagged_ood"] == flagged > int(((default["flag"] & FLAG_BITS["ood"]) != 0).sum()) + 20
    np.testing.assert_array_equal(table["ood_score"], default["ood_score"])  # the score itself does not change
    with pytest.raises(RefusedError, match="quantile strictly between 0 and 1"):
        RunConfig(task="mass_to_light", input=ood_store, output=tmp_path / "c", ood_threshold=1.5)


def test_bundle_without_trust_gives_null_scores_and_refuses_an_override(ood_store, tmp_path, client):
    tiny = make_tiny_bundle(tmp_path / "tiny")
    table, record = _run(ood_store, tmp_path / "out", tiny, client, engine="torch")
    assert table["ood_score"].isna().all() and record["trust"]["enabled"] is False
    assert record["trust"]["rows_flagged_ood"] == 0
    with pytest.raises(RefusedError, match="carries no trust description"):
        _run(ood_store, tmp_path / "out2", tiny, client, engine="torch", ood_threshold=0.9)


def test_tampered_or_unlisted_trust_file_is_refused(shipped, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(shipped, copy)
    data = bytearray((copy / TRUST_FILE).read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in the reference scores
    (copy / TRUST_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="trust.safetensors has sha256"):
        load_bundle(copy)
    shutil.copy(shipped / TRUST_FILE, copy / TRUST_FILE)
    meta = json.loads((copy / BUNDLE_JSON).read_text())
    del meta["files"][TRUST_FILE]  # named by the trust section but not sha256-listed
    write_json_atomic(copy / BUNDLE_JSON, meta)
    with pytest.raises(BundleError, match="'trust' must name a file listed in 'files'"):
        load_bundle(copy)


def test_fit_error_scale_recalibrates_gaussian_errors():
    rng = np.random.default_rng(3)
    err = rng.uniform(0.5, 2.0, 20000)
    residual = rng.normal(0, 1, 20000) * err * 1.7  # the errors are 1.7x too small
    assert coverage(residual, err, Z_68) < 0.5  # badly miscalibrated before
    scale = fit_error_scale(residual, err)
    assert scale == pytest.approx(1.7, rel=0.03)
    assert coverage(residual, scale * err, Z_68) == pytest.approx(0.6827, abs=0.01)
    assert coverage(residual, scale * err, Z_95) == pytest.approx(0.95, abs=0.01)
    fresh = rng.normal(0, 1, 20000) * err * 1.7  # the scale carries over to new rows
    assert coverage(fresh, scale * err, Z_95) == pytest.approx(0.95, abs=0.01)
    with pytest.raises(ValueError, match="at least 20"):
        fit_error_scale(residual[:5], err[:5])


def test_fit_trust_writes_a_checked_description(tmp_path):
    bundle_dir = make_tiny_bundle(tmp_path / "tiny")
    meta = json.loads((bundle_dir / BUNDLE_JSON).read_text())
    meta["output_spec"]["ml_g_err"] = {"unit": "Msun/Lsun", "scale": 1.0}
    write_json_atomic(bundle_dir / BUNDLE_JSON, meta)
    weights = sha256_file(bundle_dir / "weights.safetensors")
    section = fit_trust(bundle_dir, n_fit=400, n_held_out=400, seeds={"fit": 970_001, "held_out": 970_002})
    bundle = load_bundle(bundle_dir)
    assert bundle.meta["files"]["weights.safetensors"] == weights and TRUST_FILE in bundle.meta["files"]
    assert bundle.meta["engine_io"]["outputs"] == ["ml_g", "ml_g_logvar", "features"] and "model.onnx" in bundle.meta["files"]
    trust = load_trust(bundle)
    assert trust.threshold == pytest.approx(np.quantile(trust.reference_scores, 0.99))
    assert len(trust.reference_scores) == section["mocks"]["held_out_rows"] == 400
    recal = section["recalibration"]["outputs"]["ml_g"]
    assert bundle.output_spec["ml_g_err"]["scale"] == pytest.approx(recal["temperature"], rel=1e-5)
    # fresh in-distribution rows through the same path: about 1% above the threshold, and the scale applied
    sample = simulate_in_distribution(bundle, 400, seed=970_003)
    out = run_rows(bundle, sample.images, sample.columns)
    assert np.mean(trust.score(out["features"]) > trust.threshold) < 0.05
    with pytest.raises(BundleError, match="used seeds"):
        meta = json.loads((bundle_dir / BUNDLE_JSON).read_text())
        meta["training"]["seeds"] = {"train": [970_000, 970_010]}
        write_json_atomic(bundle_dir / BUNDLE_JSON, meta)
        fit_trust(bundle_dir, n_fit=50, n_held_out=50, seeds={"fit": 970_001, "held_out": 970_002})


def test_cli_has_the_trust_command_and_the_ood_threshold_option():
    from survey_infer.cli import build_parser

    args = build_parser().parse_args(["run", "mass_to_light", "--input", "a.zarr", "--output", "o", "--ood-threshold", "0.995"])
    assert args.ood_threshold == 0.995
    args = build_parser().parse_args(["trust", "b", "--n-fit", "10", "--transform", "none"])
    assert (args.command, args.n_fit, args.transform) == ("trust", 10, "none")
