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
from survey_infer.imaging import LIGHT_STATISTIC_NAMES, light_statistics
from survey_infer.pipeline import run_pipeline
from survey_infer.store import write_block
from survey_infer.trust import TRUST_FILE, load_trust
from tests.conftest import make_tiny_bundle, read_parts
from training.mock import write_mock_cutouts
from training.trust import (
    STATISTICS_KEY, Z_68, Z_95, coverage, fit_error_scale, fit_trust, run_rows, simulate_in_distribution,
)

N_MOCK, N_NOISE = 96, 16  # rows 0-95 mock galaxies; 96-103 uniform noise, 104-111 blank sky (log-scaled)


def shipped_with_trust(task: str) -> Path:
    """The task's shipped bundle; the test skips when it carries no trust description."""
    path = default_bundle_path(task)
    if load_trust(load_bundle(path)) is None:
        pytest.skip(f"shipped bundle {path.name} carries no trust description")
    return path


@pytest.fixture(scope="module")
def shipped() -> Path:
    return shipped_with_trust("mass_to_light")


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
    out = run_rows(bundle, sample.images, sample.columns, statistics=True)
    assert np.mean(trust.score(out["features"], out[STATISTICS_KEY]) > trust.threshold) < 0.05
    # the description: the features' leading principal components, then the task's input statistics
    assert section["input_statistics"] == list(LIGHT_STATISTIC_NAMES) and trust.n_statistics == 12
    assert trust.projection.shape == (out["features"].shape[1], section["projection"]["components"])
    with pytest.raises(BundleError, match="needs 12 input statistics per row"):
        trust.score(out["features"])
    with pytest.raises(BundleError, match="used seeds"):
        meta = json.loads((bundle_dir / BUNDLE_JSON).read_text())
        meta["training"]["seeds"] = {"train": [970_000, 970_010]}
        write_json_atomic(bundle_dir / BUNDLE_JSON, meta)
        fit_trust(bundle_dir, n_fit=50, n_held_out=50, seeds={"fit": 970_001, "held_out": 970_002})


def _point_sources(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian point sources whose half-light radius is the framing radius (size / 10), log-scaled."""
    from survey_infer.imaging import log_scale

    yy, xx = np.indices((size, size)) - (size - 1) / 2
    sigma = (size / 10) / 1.1774  # half width at half maximum = the framing radius
    star = np.exp(-0.5 * (xx**2 + yy**2) / sigma**2)
    raw = star[None] * 10 ** rng.uniform(1.5, 3, n)[:, None, None] + rng.normal(0, 1, (n, size, size))
    return log_scale(raw, np.ones(n))[:, None]


def test_light_statistics_see_a_point_source_framed_by_its_own_size():
    from training.sim.universe import simulate

    rng = np.random.default_rng(4)
    galaxies = light_statistics(simulate(200, size=69, seed=971_001).images)
    stars = light_statistics(_point_sources(200, 69, rng))
    k = LIGHT_STATISTIC_NAMES.index("light_fraction_lt_2")
    # a galaxy framed by its intrinsic half-light radius spreads beyond it (profile wings, seeing): a star does not
    assert np.median(stars[:, k]) > np.quantile(galaxies[:, k], 0.75)
    dex = np.log10(np.log10(2 * 10 ** np.array([1.5, 3.0])))  # what log_scale spanned: peak / (sigma / 2)
    j = LIGHT_STATISTIC_NAMES.index("log_dex_range")
    assert dex[0] - 0.15 < np.median(stars[:, j]) < dex[1] + 0.15  # recovered from the sky pixels alone


def test_kinematic_statistics_see_rotation_and_a_flat_tracer():
    from survey_infer.kinematics import StarBatch
    from survey_infer.tasks.mass_profiles import KINEMATIC_STATISTIC_NAMES, kinematic_statistics

    rng = np.random.default_rng(5)
    n = 400
    radius = 1.0 / np.sqrt(rng.uniform(0.01, 1, n) ** (-2 / 3) - 1)  # Plummer, scale 1
    phi = rng.uniform(0, 2 * np.pi, n)
    x, y = radius * np.cos(phi), radius * np.sin(phi)
    hot = (x, y, rng.normal(0, 10, n), np.ones(n))
    spinning = (x, y, 15 * np.tanh(radius) * np.cos(phi) + rng.normal(0, 3, n), np.ones(n))  # v along x: rotation
    flat_r = 2 * np.sqrt(rng.uniform(0, 1, n))
    flat = (flat_r * np.cos(phi), flat_r * np.sin(phi), rng.normal(0, 10, n), np.ones(n))
    stats = dict(zip(("hot", "spinning", "flat"), kinematic_statistics(StarBatch.from_lists([hot, spinning, flat]))))
    rot, beyond, kurt = (KINEMATIC_STATISTIC_NAMES.index(k) for k in
                         ("rotation_over_dispersion", "star_fraction_gt_2rh", "velocity_kurtosis"))  # fmt: skip
    assert stats["spinning"][rot] > 0.2 > 5 * stats["hot"][rot]  # a velocity gradient across the galaxy
    assert stats["spinning"][kurt] < 2.3  # and a flat-topped, double-horned velocity distribution
    assert stats["flat"][beyond] == 0.0 < stats["hot"][beyond]  # a uniform disc ends at 1.41 R_h
    assert 2.4 < stats["hot"][kurt] < 3.6
    assert stats["hot"][-1] == pytest.approx(np.log10(n))


def test_cli_has_the_trust_command_and_the_ood_threshold_option():
    from survey_infer.cli import build_parser

    args = build_parser().parse_args(["run", "mass_to_light", "--input", "a.zarr", "--output", "o", "--ood-threshold", "0.995"])
    assert args.ood_threshold == 0.995
    args = build_parser().parse_args(["trust", "b", "--n-fit", "10", "--transform", "none"])
    assert (args.command, args.n_fit, args.transform) == ("trust", 10, "none")


# ------------------------------------------------------------------------------------------ mass_profiles
def _noise_galaxies(rng, n: int, first_id: int) -> dict[str, np.ndarray]:
    """Galaxies of pure noise: 40-120 stars at uniform positions in a 0.5 kpc disc whose velocities are their
    measurement errors alone (no dynamics, no tracer profile). (Velocities drawn uniformly over tens of km/s are
    *not* caught: the network sees v / std(v), bench/README.md.)"""
    cols: dict[str, list] = {"galaxy_id": [], "x": [], "y": [], "v_los": [], "v_err": []}
    for k in range(n):
        m = int(rng.integers(40, 120))
        r, phi = 0.5 * np.sqrt(rng.uniform(0, 1, m)), rng.uniform(0, 2 * np.pi, m)
        err = rng.uniform(1, 3, m)
        cols["galaxy_id"].append(np.full(m, first_id + k))
        cols["x"].append(r * np.cos(phi))
        cols["y"].append(r * np.sin(phi))
        cols["v_los"].append(40.0 + rng.normal(0, err))
        cols["v_err"].append(err)
    return {key: np.concatenate(v) for key, v in cols.items()}


@pytest.fixture(scope="module")
def kin_shipped() -> Path:
    return shipped_with_trust("mass_profiles")


@pytest.fixture(scope="module")
def kin_store(tmp_path_factory) -> Path:
    """20 mock galaxies of two training-grid DFs, 4 pure-noise galaxies (ids 20-23), one of 3 stars (24)."""
    from survey_infer.kinematics import write_kinematics_store
    from training.mock_kinematics import write_mock_kinematics
    from training.sim import kinematics as sim

    halos = [sim.build_halo("nfw", 0.0, float(sim.B_RATIOS["nfw"][4]), np.inf, seed=1),
             sim.build_halo("burkert", 0.0, float(sim.B_RATIOS["burkert"][3]), 2.0, seed=2)]  # fmt: skip
    path = write_mock_kinematics(tmp_path_factory.mktemp("kin_trust") / "mock.zarr", 20, seed=5, halos=halos)
    group = zarr.open_group(str(path), mode="r")
    extra = _noise_galaxies(np.random.default_rng(1), 4, 20)
    few = {"galaxy_id": [24] * 3, "x": [0.1, -0.2, 0.3], "y": [0.05, 0.1, -0.1], "v_los": [10.0, 12.0, 8.0], "v_err": [2.0] * 3}
    stars = {k: np.concatenate([group[f"stars/{k}"][:], extra[k], few[k]]) for k in extra}
    galaxies = {k: np.append(group[f"galaxies/{k}"][:], v) for k, v in
                {"galaxy_id": np.arange(20, 25), "ra": np.full(5, 10.0), "dec": np.full(5, -5.0),
                 "distance_mpc": np.full(5, 0.1)}.items()}  # fmt: skip
    return write_kinematics_store(path.with_name("with_noise.zarr"), stars, galaxies, galaxies_per_unit=10)


def test_mass_profiles_bundle_carries_trust(kin_shipped):
    from training.trust import TRUST_SEEDS

    bundle = load_bundle(kin_shipped)
    trust, section = load_trust(bundle), bundle.meta["trust"]
    assert bundle.meta["engine_io"]["outputs"] == ["log_mass", "features"]
    from survey_infer.tasks.mass_profiles import KINEMATIC_STATISTIC_NAMES

    assert section["input_statistics"] == list(KINEMATIC_STATISTIC_NAMES) and trust.n_statistics == 5
    assert trust.mean.shape == (32 + 5,) and trust.projection is None  # the 32 features, then the statistics
    assert np.isfinite(trust.threshold) and trust.threshold == pytest.approx(np.quantile(trust.reference_scores, 0.99))
    seeds = section["mocks"]["seeds"]
    assert seeds == TRUST_SEEDS["mass_profiles"]
    assert not set(seeds.values()) & set(bundle.meta["training"]["reserved_for_evaluation"].values())
    coverage = section["recalibration"]["posterior_intervals"]["coverage"]
    assert len(coverage) == 10 and all(0.0 < c["68"] < c["95"] < 1.0 for c in coverage.values())


def test_kinematics_run_scores_galaxies_and_flags_noise(kin_shipped, kin_store, tmp_path):
    from survey_infer.cli import main

    out = tmp_path / "out"
    code = main(["run", "mass_profiles", "--input", str(kin_store), "--output", str(out), "--in-process",
                 "--no-progress", "--no-catalog", "--task-option", "samples=5"])  # fmt: skip
    assert code == 0
    trust = load_trust(load_bundle(kin_shipped))
    threshold = trust.threshold
    table = read_parts(out).set_index("object_id").sort_index()
    score = table["ood_score"].to_numpy()
    assert np.isfinite(score[:24]).all() and np.isnan(score[24])  # the 3-star galaxy has no estimate, no score
    ood = (table["flag"].to_numpy() & FLAG_BITS["ood"]) != 0
    # pure noise: above the threshold and flagged (the bench: ~95% of such galaxies), far above in-distribution
    assert np.median(score[20:24]) > threshold and ood[20:24].sum() >= 3
    assert (score[20:24] > np.quantile(trust.reference_scores, 0.95)).all()
    assert np.isfinite(table["log_m_1p0"].to_numpy()[20:24]).all()  # ... and still estimated
    assert ood[:20].sum() <= 2  # in-distribution galaxies: ~1% flagged
    record = json.loads((out / "run.json").read_text())
    assert record["trust"]["enabled"] and record["trust"]["threshold"] == pytest.approx(threshold)
    assert record["trust"]["rows_flagged_ood"] == int(ood.sum())
