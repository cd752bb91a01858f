"""mass_profiles: the kinematics store (write, open, refuse, ingest), the mock physics, the task, the pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from survey_infer.bundle import default_bundle_path, load_bundle
from survey_infer.cli import main
from survey_infer.errors import StoreError
from survey_infer.flags import FLAG_BITS
from survey_infer.kinematics import StarBatch, ingest_kinematics, iter_star_batches, open_kinematics, write_kinematics_store
from survey_infer.tasks import get_task
from survey_infer.tasks.mass_profiles import BINS, G_KPC_KMS2_MSUN, RADII_F, galaxy_inputs, radius_name, sample_posterior
from training.sim import kinematics as sim

# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def halos():
    """Two grid DFs (a cored isotropic and a cuspy Osipkov-Merritt one): ~2-5 s to build."""
    return [sim.build_halo("burkert", 0.0, 0.5, np.inf, seed=1), sim.build_halo("nfw", 0.0, 0.3, 1.0, seed=2)]


def _toy_columns(rng, n_gal=5, n_per=(3, 40)):
    stars = {"galaxy_id": [], "x": [], "y": [], "v_los": [], "v_err": []}
    ids = rng.permutation(np.arange(100, 100 + n_gal))
    for gid in ids:
        n = int(rng.integers(*n_per))
        stars["galaxy_id"].append(np.full(n, gid))
        stars["x"].append(rng.normal(0, 0.3, n))
        stars["y"].append(rng.normal(0, 0.3, n))
        stars["v_los"].append(rng.normal(50, 8, n))
        stars["v_err"].append(rng.uniform(1, 3, n))
    stars = {k: np.concatenate(v) for k, v in stars.items()}
    shuffle = rng.permutation(len(stars["x"]))
    stars = {k: v[shuffle] for k, v in stars.items()}
    galaxies = {"galaxy_id": ids, "ra": rng.uniform(0, 360, n_gal), "dec": rng.uniform(-60, 60, n_gal),
                "distance_mpc": rng.uniform(0.05, 0.2, n_gal)}  # fmt: skip
    return stars, galaxies


@pytest.fixture()
def toy_store(tmp_path):
    stars, galaxies = _toy_columns(np.random.default_rng(0))
    return write_kinematics_store(tmp_path / "toy.zarr", stars, galaxies, galaxies_per_unit=2, galaxies_per_batch=2), stars, galaxies


# ------------------------------------------------------------------------------------------ store


def test_store_roundtrip_sorts_stars_by_galaxy_and_reads_contiguous_slices(toy_store):
    path, stars, galaxies = toy_store
    info = open_kinematics(path)
    assert (info.n_rows, info.n_stars, info.rows_per_block, info.rows_per_read) == (5, len(stars["x"]), 2, 2)
    ids = np.asarray(zarr.open_group(str(path), mode="r")["galaxies/galaxy_id"][:])
    np.testing.assert_array_equal(ids, np.sort(galaxies["galaxy_id"]))
    batches = list(iter_star_batches(path, 0, 5, 2))
    assert [b[0] for b in batches] == [0, 2, 4]
    for offset, batch, flags in batches:
        for k in range(len(batch)):
            gid = ids[offset + k]
            mine = stars["galaxy_id"] == gid
            got = batch.v_los[batch.offsets[k] : batch.offsets[k + 1]]
            np.testing.assert_array_equal(got, stars["v_los"][mine])  # stable sort keeps each galaxy's order
        assert not flags.any()


def test_arcsec_positions_are_converted_to_kpc_with_the_distance(tmp_path):
    stars, galaxies = _toy_columns(np.random.default_rng(1), n_gal=3)
    path = write_kinematics_store(tmp_path / "arcsec.zarr", stars, galaxies, position_unit="arcsec")
    (_, batch, _), = iter_star_batches(path, 0, 3, 3)
    order = np.argsort(galaxies["galaxy_id"])
    dist = np.repeat(galaxies["distance_mpc"][order], batch.counts)
    x_arcsec = np.concatenate([stars["x"][stars["galaxy_id"] == g] for g in np.sort(galaxies["galaxy_id"])])
    np.testing.assert_allclose(batch.x, x_arcsec * dist * 1e3 / 206264.806, rtol=1e-6)


@pytest.mark.parametrize("damage, message", [
    (lambda g: g["stars/v_los"].__setitem__(3, np.nan), "'v_los'"),
    (lambda g: g["stars/v_err"].__setitem__(0, -1.0), "'v_err'"),
    (lambda g: g["stars/x"].__setitem__(5, np.inf), "'x'"),
    (lambda g: g["galaxies/galaxy_id"].__setitem__(slice(None), np.arange(5)[::-1]), "not strictly increasing"),
    (lambda g: g["galaxies/star_count"].__setitem__(0, 1), "star_start"),
    (lambda g: g["galaxies/dec"].__setitem__(1, 95.0), "'dec'"),
])  # fmt: skip
def test_damaged_stores_are_refused_naming_the_column(toy_store, damage, message):
    path = toy_store[0]
    damage(zarr.open_group(str(path), mode="r+"))
    with pytest.raises(StoreError, match=message):
        open_kinematics(path)


def test_missing_column_and_wrong_kind_are_refused(toy_store, small_store):
    path = toy_store[0]
    shutil.rmtree(path / "stars" / "v_err")
    with pytest.raises(StoreError, match="no column 'v_err'"):
        open_kinematics(path)
    with pytest.raises(StoreError, match="kind 'cutouts'"):
        open_kinematics(small_store)


def test_write_refuses_stars_of_unknown_galaxies_and_arcsec_without_distance(tmp_path):
    stars, galaxies = _toy_columns(np.random.default_rng(2), n_gal=3)
    bad = {**stars, "galaxy_id": stars["galaxy_id"].copy()}
    bad["galaxy_id"][0] = 999
    with pytest.raises(StoreError, match="absent from the galaxies"):
        write_kinematics_store(tmp_path / "a.zarr", bad, galaxies)
    with pytest.raises(StoreError, match="'distance_mpc'"):
        write_kinematics_store(tmp_path / "b.zarr", stars, {k: v for k, v in galaxies.items() if k != "distance_mpc"},
                               position_unit="arcsec")  # fmt: skip


@pytest.mark.parametrize("suffix", [".csv", ".ecsv", ".fits", ".parquet"])
def test_ingest_any_astropy_table_with_mapped_columns(tmp_path, suffix):
    from astropy.table import Table

    stars, galaxies = _toy_columns(np.random.default_rng(3), n_gal=4)
    lookup = {g: k for k, g in enumerate(galaxies["galaxy_id"])}
    rows = np.array([lookup[g] for g in stars["galaxy_id"]])
    table = Table({"GID": stars["galaxy_id"], "X_KPC": stars["x"], "Y_KPC": stars["y"], "VEL": stars["v_los"],
                   "EVEL": stars["v_err"], "RA": galaxies["ra"][rows], "DEC": galaxies["dec"][rows]})  # fmt: skip
    source = tmp_path / f"stars{suffix}"
    table.write(source)
    code = main(["ingest", "kinematics", str(source), "--output", str(tmp_path / "k.zarr"), "--galaxy-id-col", "GID",
                 "--x-col", "X_KPC", "--y-col", "Y_KPC", "--v-col", "VEL", "--v-err-col", "EVEL", "--ra-col", "RA",
                 "--dec-col", "DEC"])  # fmt: skip
    assert code == 0
    info = open_kinematics(tmp_path / "k.zarr")
    assert (info.n_rows, info.n_stars) == (4, len(stars["x"]))
    group = zarr.open_group(str(tmp_path / "k.zarr"), mode="r")
    np.testing.assert_allclose(np.sort(group["stars/v_los"][:]), np.sort(stars["v_los"]))
    np.testing.assert_allclose(group["galaxies/ra"][:], galaxies["ra"][np.argsort(galaxies["galaxy_id"])])


def test_ingest_refusals_name_the_column(tmp_path, capsys):
    from astropy.table import Table

    stars, galaxies = _toy_columns(np.random.default_rng(4), n_gal=3)
    table = Table({**stars, "ra": np.random.default_rng(0).uniform(0, 1, len(stars["x"])), "dec": np.zeros(len(stars["x"]))})
    source = tmp_path / "stars.ecsv"
    table.write(source)
    out = tmp_path / "k.zarr"
    assert main(["ingest", "kinematics", str(source), "--output", str(out), "--v-col", "VHELIO"]) == 2
    assert "no column 'VHELIO'" in capsys.readouterr().err
    assert main(["ingest", "kinematics", str(source), "--output", str(out)]) == 2  # ra differs within a galaxy
    assert "'ra'" in capsys.readouterr().err and not out.exists()
    table["ra"] = 10.0
    table["v_los"][2] = np.nan
    table.write(source, overwrite=True)
    assert main(["ingest", "kinematics", str(source), "--output", str(out)]) == 2
    assert "'v_los'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ mock physics


def _jeans_sigma_r2(halo, r, om: bool):
    """Jeans prediction of sigma_r^2 (dimensionless, G = 1) for the Plummer tracer in the halo."""
    b = halo.b_ratio
    ra2 = (halo.ra_ratio * b) ** 2 if om else np.inf

    def nu(x):
        return (1 + x**2 / b**2) ** -2.5

    out = []
    for r0 in r:
        grid = np.geomspace(r0, sim.RMAX, 4000)
        weight = (1 + grid**2 / ra2) if om else 1.0
        integrand = nu(grid) * weight * 10 ** halo.log_mass(grid) / grid**2
        integral = np.sum(0.5 * (integrand[1:] + integrand[:-1]) * np.diff(grid))
        out.append(integral / (nu(r0) * ((1 + r0**2 / ra2) if om else 1.0)))
    return np.asarray(out)


@pytest.mark.parametrize("index, om", [(0, False), (1, True)])
def test_sampled_dispersions_match_the_jeans_equation(halos, index, om):
    """sigma_r(r) of 20,000 DF stars matches the spherical Jeans equation; for Osipkov-Merritt, the tangential
    dispersion follows beta(r) = r^2 / (r^2 + ra^2)."""
    halo = halos[index]
    np.random.seed(5)
    pos, vel = sim.sample_stars(halo, 20000)
    r = np.linalg.norm(pos, axis=1)
    v_r = np.sum(pos * vel, axis=1) / r
    v_t2 = (np.sum(vel**2, axis=1) - v_r**2) / 2  # one tangential component
    edges = np.quantile(r, [0.1, 0.3, 0.5, 0.7, 0.9])
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (r >= lo) & (r < hi)
        predicted = _jeans_sigma_r2(halo, r[sel][::20], om).mean()
        assert np.mean(v_r[sel] ** 2) == pytest.approx(predicted, rel=0.08)
        if om:
            beta = r[sel] ** 2 / (r[sel] ** 2 + (halo.ra_ratio * halo.b_ratio) ** 2)
            assert np.mean(v_t2[sel]) == pytest.approx(np.mean((1 - beta) * v_r[sel] ** 2), rel=0.1)
    assert not om or np.mean(v_r**2) > 1.2 * np.mean(v_t2)  # radially anisotropic overall
    assert om or np.mean(v_r**2) == pytest.approx(np.mean(v_t2), rel=0.05)  # isotropic


def test_enclosed_mass_truth_matches_the_potential(halos):
    from scipy.integrate import quad

    for halo in halos:
        r = np.array([0.03, 0.3, 1.0, 3.0])
        direct = np.array([halo.pot.mass(x) for x in r])
        np.testing.assert_allclose(halo.log_mass(r), np.log10(direct), atol=1e-4)
        integral = [quad(lambda x: 4 * np.pi * x**2 * halo.pot.dens(x, 0.0), 0, x, limit=200)[0] for x in r]
        np.testing.assert_allclose(direct, integral, rtol=1e-4)


def test_simulated_galaxy_truth_scales_and_projections(halos):
    rng = np.random.default_rng(9)
    projs = sim.simulate_galaxy(halos[0], rng, n_projections=3, n_stars=2000, galaxy_id=7)
    assert len(projs) == 3 and {p.truth["galaxy_id"] for p in projs} == {7}
    first = projs[0]
    t = first.truth
    assert sim.R_HALF_KPC_RANGE[0] <= t["r_half_plummer_kpc"] <= sim.R_HALF_KPC_RANGE[1]
    # R_h of the projection is the stars' median projected radius, near the Plummer scale b
    assert t["r_half_kpc"] == pytest.approx(np.median(np.hypot(first.x, first.y)))
    assert t["r_half_kpc"] == pytest.approx(t["r_half_plummer_kpc"], rel=0.08)
    np.testing.assert_allclose(t["log_mass"], sim.true_log_mass(halos[0], t, np.asarray(RADII_F) * t["r_half_kpc"]))
    sigma = np.sqrt(np.var(first.v_los) - np.mean(first.v_err**2))
    assert sigma == pytest.approx(t["sigma_scale_kms"], rel=0.07)
    # M(<r) = v_c^2 r / G in physical units: mass unit consistent with the velocity and length scales
    r_kpc = t["halo_scale_kpc"]
    assert 10 ** sim.true_log_mass(halos[0], t, np.array([r_kpc]))[0] == pytest.approx(
        float(halos[0].pot.mass(1.0)) * (t["sigma_scale_kms"] / halos[0].sigma_los) ** 2 * r_kpc / G_KPC_KMS2_MSUN, rel=1e-3)
    # another projection: same stars in 3-D, new line of sight and errors
    assert not np.allclose(projs[1].v_los, first.v_los)
    np.testing.assert_allclose(np.sort(np.hypot(projs[1].x, projs[1].y)).max(), np.sort(np.hypot(first.x, first.y)).max(),
                               rtol=1.0)  # fmt: skip


# ------------------------------------------------------------------------------------------ task


def test_galaxy_inputs_histograms_scalars_and_few_stars():
    rng = np.random.default_rng(0)
    galaxies = []
    for n in (300, 3, 50):
        galaxies.append((rng.normal(0, 0.2, n), rng.normal(0, 0.2, n), rng.normal(100, 10, n), np.full(n, 2.0)))
    inputs, summary = galaxy_inputs(StarBatch.from_lists(galaxies))
    assert inputs["spatial"].shape == inputs["dynamical"].shape == (3, 1, BINS, BINS)
    np.testing.assert_array_equal(summary["usable"], [True, False, True])
    assert inputs["spatial"][1].sum() == 0 and not inputs["scalars"][1].any()
    # 2-D PDFs in the normalised coordinates: sum x bin area = the fraction of stars inside (a few lie beyond 4 R_h)
    assert 0.97 < inputs["spatial"][0].sum() * (8.0 * 8.0 / BINS**2) <= 1.0 + 1e-6
    assert 0.97 < inputs["dynamical"][0].sum() * (4.0 * 8.0 / BINS**2) <= 1.0 + 1e-6
    x, y, v, e = galaxies[0]
    r_half = np.median(np.hypot(x, y))
    sigma2 = np.var(v, ddof=1) - 4.0
    assert summary["r_half_kpc"][0] == pytest.approx(r_half)
    assert inputs["scalars"][0, 0] == pytest.approx(np.log10(sigma2 * r_half / G_KPC_KMS2_MSUN), abs=1e-5)
    assert inputs["scalars"][0, 1] == pytest.approx(np.log10(300) - 2, abs=1e-6)
    dv = v - v.mean()
    inner = np.hypot(x, y) < r_half
    assert inputs["scalars"][0, 3] == pytest.approx(0.5 * np.log10(np.mean(dv[inner] ** 2) / np.mean(dv[~inner] ** 2)), abs=1e-5)
    # a Gaussian velocity distribution has excess kurtosis ~0; a bimodal one is strongly negative
    assert abs(inputs["scalars"][0, 4]) < 0.2
    bimodal = StarBatch.from_lists([(x, y, np.where(np.arange(300) % 2, 80.0, 120.0) + rng.normal(0, 1, 300), e)])
    assert galaxy_inputs(bimodal)[0]["scalars"][0, 4] < -0.25


def test_bundle_posterior_samples_shape_and_reproducibility():
    bundle = load_bundle(default_bundle_path("mass_profiles"), task="mass_profiles")
    model = bundle.build_torch_model()
    feed = get_task("mass_profiles").example_inputs(bundle, 6, seed=3)
    import torch

    with torch.inference_mode():
        log_mass, features = model(*(torch.from_numpy(feed[k]) for k in ("spatial", "dynamical", "scalars")))
    assert features.shape == (6, 32) and log_mass.shape == (6, 10)
    a = sample_posterior(model, features.numpy(), log_mass.numpy(), 50, seed=1)
    b = sample_posterior(model, features.numpy(), log_mass.numpy(), 50, seed=1)
    assert a.shape == (6, 50, 10) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert np.all(a.std(axis=1) > 0)
    assert bundle.path.stat().st_size < 5e6 and sum(p.stat().st_size for p in bundle.path.iterdir()) < 5e6


def test_bad_task_options_are_refused(tmp_path, capsys):
    code = main(["run", "mass_profiles", "--input", str(tmp_path / "none.zarr"), "--output", str(tmp_path / "o"),
                 "--task-option", "samples=0"])  # fmt: skip
    assert code == 2 and "samples" in capsys.readouterr().err
    code = main(["run", "mass_profiles", "--input", str(tmp_path / "none.zarr"), "--output", str(tmp_path / "o"),
                 "--task-option", "colour=red"])  # fmt: skip
    assert code == 2 and "no option colour" in capsys.readouterr().err


@pytest.fixture(scope="module")
def e2e_store(halos, tmp_path_factory):
    """21 mock galaxies (truth beside the store) + one with 3 stars, 8 galaxies per unit."""
    from training.mock_kinematics import write_mock_kinematics

    path = write_mock_kinematics(tmp_path_factory.mktemp("kin") / "mock.zarr", 21, seed=3, halos=halos,
                                 galaxies_per_unit=8, position_unit="arcsec")  # fmt: skip
    group = zarr.open_group(str(path), mode="r")
    stars = {k: np.append(group[f"stars/{k}"][:], v) for k, v in
             {"galaxy_id": [21] * 3, "x": [1.0, -2.0, 3.0], "y": [0.5, 1.0, -1.0], "v_los": [10.0, 12.0, 8.0],
              "v_err": [2.0, 2.0, 2.0]}.items()}  # fmt: skip
    galaxies = {k: np.append(group[f"galaxies/{k}"][:], v) for k, v in
                {"galaxy_id": 21, "ra": 10.0, "dec": -5.0, "distance_mpc": 0.1}.items()}  # fmt: skip
    final = path.with_name("with_few.zarr")
    write_kinematics_store(final, stars, galaxies, position_unit="arcsec", galaxies_per_unit=8)
    shutil.copy(str(path) + ".truth.parquet", str(final) + ".truth.parquet")
    return final


def test_run_end_to_end_with_the_shipped_bundle(e2e_store, tmp_path):
    """`survey-infer run mass_profiles` on a kinematics store: every galaxy exactly once, finite posteriors
    that bracket their median, N samples per row; the 3-star galaxy kept, flagged few_stars, null."""
    out = tmp_path / "out"
    code = main(["run", "mass_profiles", "--input", str(e2e_store), "--output", str(out), "--in-process",
                 "--no-progress", "--no-catalog", "--task-option", "samples=7", "--engine", "onnxruntime"])  # fmt: skip
    assert code == 0
    record = json.loads((out / "run.json").read_text())
    assert record["units"]["total"] == 3 and record["rows"] == {"in": 22, "out": 22, "flagged": 1}
    table = pq.read_table(sorted((out / "parts").glob("*.parquet"))).to_pandas().sort_values("object_id")
    np.testing.assert_array_equal(table["object_id"], np.arange(22))
    few = table.iloc[21]
    assert few["flag"] & FLAG_BITS["few_stars"] and "few_stars" in few["flag_reason"] and np.isnan(few["log_m_1p0"])
    good = table.iloc[:21]
    assert (good["flag"] & FLAG_BITS["few_stars"] == 0).all()
    for f in RADII_F:
        name = radius_name(f)
        assert np.isfinite(good[name]).all()
        assert (good[f"{name}_p16"] < good[name]).all() and (good[name] < good[f"{name}_p84"]).all()
    samples = np.stack([np.stack(s) for s in good["log_mass_samples"]])
    assert samples.shape == (21, 7, 10) and np.isfinite(samples).all()
    truth = pq.read_table(str(e2e_store) + ".truth.parquet").to_pandas().sort_values("object_id")
    np.testing.assert_allclose(good["r_half_kpc"], truth["r_half_kpc"], rtol=1e-4)  # the same R_h as the truth
    err = good["log_m_1p8"].to_numpy() - truth["log_m_1p8"].to_numpy()
    assert np.median(np.abs(err)) < 0.3  # a trained model, not noise (the bench measures the accuracy)
    schema = pq.read_schema(sorted((out / "parts").glob("*.parquet"))[0])
    assert schema.field("log_m_1p8").metadata[b"unit"] == b"dex(Msun)"


def test_torch_and_onnxruntime_engines_agree(e2e_store, tmp_path):
    """The CNN under both engines and the flow (torch, seeded per unit) give the same posteriors."""
    medians = {}
    for engine in ("torch", "onnxruntime"):
        out = tmp_path / engine
        assert main(["run", "mass_profiles", "--input", str(e2e_store), "--output", str(out), "--in-process",
                     "--no-progress", "--no-catalog", "--engine", engine, "--task-option", "samples=20"]) == 0  # fmt: skip
        table = pq.read_table(sorted((out / "parts").glob("*.parquet"))).to_pandas().sort_values("object_id")
        medians[engine] = table[[radius_name(f) for f in RADII_F]].to_numpy()[:21]
    np.testing.assert_allclose(medians["torch"], medians["onnxruntime"], atol=2e-3)


@pytest.mark.slow
def test_mock_kinematics_cli_writes_store_and_truth(tmp_path):
    """`survey-infer mock kinematics` (small grid: 24 DFs, ~1 min): a valid store with its truth beside it."""
    store = tmp_path / "mock.zarr"
    assert main(["mock", "kinematics", str(store), "--n", "30", "--seed", "2"]) == 0
    info = open_kinematics(store)
    truth = pq.read_table(str(store) + ".truth.parquet").to_pandas()
    assert info.n_rows == 30 and len(truth) == 30
    assert set(truth["family"]) <= set(sim.FAMILIES) and truth["n_stars"].sum() == info.n_stars
    assert np.all(np.diff(truth[[radius_name(f) for f in RADII_F]].to_numpy(), axis=1) > 0)  # M(<r) grows with r


def test_ingest_with_a_galaxies_table_keeps_galaxies_without_stars(tmp_path):
    """Galaxy-level columns from --galaxies (arcsec positions need its distances); a listed galaxy with no stars
    is kept with star_count 0 (a run flags it few_stars)."""
    from astropy import units as u
    from astropy.table import Table

    stars, galaxies = _toy_columns(np.random.default_rng(5), n_gal=3)
    Table({"gid": stars["galaxy_id"], "xi": stars["x"] * u.arcmin, "eta": stars["y"] * u.arcmin,
           "v": stars["v_los"], "ev": stars["v_err"]}).write(tmp_path / "stars.fits")  # fmt: skip
    extra = np.append(galaxies["galaxy_id"], 999)
    Table({"gid": extra, "RA": np.append(galaxies["ra"], 1.0), "DEC": np.append(galaxies["dec"], 2.0),
           "D": np.append(galaxies["distance_mpc"], 0.1)}).write(tmp_path / "galaxies.parquet")  # fmt: skip
    out = tmp_path / "k.zarr"
    assert main(["ingest", "kinematics", str(tmp_path / "stars.fits"), "--output", str(out), "--galaxies",
                 str(tmp_path / "galaxies.parquet"), "--galaxy-id-col", "gid", "--x-col", "xi", "--y-col", "eta",
                 "--v-col", "v", "--v-err-col", "ev", "--position-unit", "arcsec", "--ra-col", "RA", "--dec-col", "DEC",
                 "--distance-col", "D"]) == 0  # fmt: skip
    info = open_kinematics(out)
    group = zarr.open_group(str(out), mode="r")
    assert info.n_rows == 4 and info.position_unit == "arcsec"
    assert group["galaxies/star_count"][:].tolist()[-1] == 0
    np.testing.assert_allclose(np.sort(group["stars/x"][:]), np.sort(stars["x"] * 60.0))  # arcmin -> arcsec
    np.testing.assert_allclose(group["galaxies/distance_mpc"][:3], galaxies["distance_mpc"][np.argsort(galaxies["galaxy_id"])])
    code = main(["run", "mass_profiles", "--input", str(out), "--output", str(tmp_path / "run"), "--in-process",
                 "--no-progress", "--no-catalog", "--engine", "onnxruntime"])  # fmt: skip
    assert code == 0
    table = pq.read_table(tmp_path / "run" / "parts").to_pandas().sort_values("object_id")
    assert table["object_id"].tolist() == sorted(extra.tolist())
    assert table["flag_reason"].iloc[-1] == "few_stars" and table["n_stars"].iloc[-1] == 0
