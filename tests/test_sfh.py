"""sfh (issue 6): the ifu store (ingest of MUSE-format FITS, real and synthetic), the mock spectra, the task
through the pipeline into sfh.zarr + the catalog, resume exactly once, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from astropy.io import fits

from survey_infer.cli import main
from survey_infer.errors import StoreError
from survey_infer.flags import FLAG_BITS
from survey_infer.ifu import BANDS, ingest_ifu, iter_spaxel_batches, open_ifu, write_ifu_store
from survey_infer.tasks.sfh import AGE_CENTRES_LOG, MUSE_WAVE, N_BINS, spectrum_inputs
from tests.conftest import tree_snapshot

REAL_CUBE = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "ifu_muse" / "subcub_mosaic.fits"


# ------------------------------------------------------------------------------------------ ingest


def _muse_fits(path: Path, *, n_wave=40, ny=5, nx=4, bunit="10**(-17)*erg/s/cm**2/Angstrom", ctype3="AWAV",
               with_stat=True, seed=0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    rng = np.random.default_rng(seed)
    data = rng.uniform(1.0, 2.0, (n_wave, ny, nx)).astype(np.float32)
    var = rng.uniform(0.01, 0.02, (n_wave, ny, nx)).astype(np.float32)
    data[:, 0, 0] = np.nan  # a spaxel without data
    data[3:6, 2, 1] = np.nan  # a few bad pixels
    header = fits.Header()
    for k, v in {"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CTYPE3": ctype3, "CUNIT1": "deg", "CUNIT2": "deg",
                 "CUNIT3": "Hz" if ctype3 == "FREQ" else "Angstrom", "CRVAL1": 150.0, "CRVAL2": 2.0, "CRVAL3": 6e14 if ctype3 == "FREQ" else 4750.0, "CRPIX1": 2.5, "CRPIX2": 3.0,
                 "CRPIX3": 1.0, "CD1_1": -5.5e-5, "CD2_2": 5.5e-5, "CD3_3": 1e11 if ctype3 == "FREQ" else 1.25, "BUNIT": bunit}.items():  # fmt: skip
        header[k] = v
    hdus = [fits.PrimaryHDU(), fits.ImageHDU(data, header=header, name="DATA")]
    if with_stat:
        stat_header = header.copy()
        stat_header["BUNIT"] = "10**(-34)*erg**2/s**2/cm**4/Angstrom**2"
        hdus.append(fits.ImageHDU(var, header=stat_header, name="STAT"))
    fits.HDUList(hdus).writeto(path)
    return data, var


def test_ingest_synthetic_muse_cube_converts_units_and_keeps_nan_spaxels(tmp_path):
    data, var = _muse_fits(tmp_path / "cube.fits")
    phot = np.full((5, 4), 3e-17, np.float32)
    fits.HDUList([fits.PrimaryHDU(phot, header=fits.Header({"BUNIT": "erg/s/cm**2/Angstrom"}))]).writeto(tmp_path / "f555w.fits")
    summary = ingest_ifu([tmp_path / "cube.fits"], tmp_path / "s.zarr", photometry=[[f"F555W={tmp_path / 'f555w.fits'}"]],
                         redshifts=[0.01])  # fmt: skip
    assert summary["cubes"]["cube"]["shape"] == [40, 5, 4]
    info = open_ifu(tmp_path / "s.zarr")
    assert info.n_rows == 1 and info.unit_bounds == ((0, 1),) and info.id_column == "object_id"
    cube = info.cubes[0]
    np.testing.assert_allclose(cube.wave, 4750.0 + 1.25 * np.arange(40))
    assert cube.redshift == 0.01
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    flux, ivar = group["cubes/cube/flux"][:], group["cubes/cube/ivar"][:]
    good = np.isfinite(data)
    np.testing.assert_allclose(flux[good], data[good] * 1000.0, rtol=1e-6)  # 1e-17 -> 1e-20 units
    np.testing.assert_allclose(ivar[good], 1.0 / (var[good] * 1e6), rtol=1e-5)  # variance (1e-17)^2 -> (1e-20)^2
    assert np.isnan(flux[:, 0, 0]).all() and (ivar[:, 0, 0] == 0).all() and (ivar[3:6, 2, 1] == 0).all()
    p = group["cubes/cube/photometry"][:]
    np.testing.assert_allclose(p[BANDS.index("F555W")], 3e-17 * 1e20, rtol=1e-5)
    assert np.isnan(p[BANDS.index("F275W")]).all() and (group["cubes/cube/photometry_ivar"][0] == 0).all()
    catalog = {k: group[f"catalog/{k}"][:] for k in ("object_id", "ra", "dec", "redshift")}
    assert abs(catalog["ra"][0] - 150.0) < 0.01 and abs(catalog["dec"][0] - 2.0) < 0.01
    batches = list(iter_spaxel_batches(info.path, 0, 1, 8))
    assert all(off == 0 for off, _, _ in batches) and sum(len(b) for _, b, _ in batches) == 20
    first = batches[0]
    assert first[2][0] == FLAG_BITS["nan_pixels"] and (first[2][1:] == 0).all()


def test_ingest_refusals_name_what_is_wrong(tmp_path):
    _muse_fits(tmp_path / "freq.fits", ctype3="FREQ")
    with pytest.raises(StoreError, match="CTYPE3 'FREQ'"):
        ingest_ifu([tmp_path / "freq.fits"], tmp_path / "a.zarr")
    _muse_fits(tmp_path / "jy.fits", bunit="Jy")
    with pytest.raises(StoreError, match="BUNIT 'Jy'"):
        ingest_ifu([tmp_path / "jy.fits"], tmp_path / "b.zarr")
    _muse_fits(tmp_path / "ok.fits")
    fits.HDUList([fits.PrimaryHDU(np.ones((7, 7), np.float32))]).writeto(tmp_path / "small.fits")
    with pytest.raises(StoreError, match=r"band F336W image is \(7, 7\); the cube's spaxel grid is \(5, 4\)"):
        ingest_ifu([tmp_path / "ok.fits"], tmp_path / "c.zarr", photometry=[[f"F336W={tmp_path / 'small.fits'}"]])
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "c.zarr").exists()


@pytest.mark.skipif(not REAL_CUBE.exists(), reason="../shared/realdata/ifu_muse is absent (a user's clone)")
def test_real_muse_cube_ingests_and_sfh_refuses_naming_the_missing_wavelengths(tmp_path, capsys):
    store = tmp_path / "muse.zarr"
    assert main(["ingest", "ifu", str(REAL_CUBE), str(store)]) == 0
    info = open_ifu(store)
    cube = info.cubes[0]
    assert cube.shape == (500, 30, 30) and abs(cube.wave[0] - 4750.0) < 1e-6 and abs(cube.wave[-1] - 5373.75) < 1e-6
    flux = zarr.open_group(str(store), mode="r")["cubes/subcub_mosaic/flux"][:]
    assert np.isfinite(flux).mean() > 0.5
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["run", "sfh", "--input", str(store), "--output", str(out), "--in-process", "--no-progress",
                 "--no-catalog"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "subcub_mosaic" in err and "missing 5374-9030 A" in err and "4750-5374 A" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------ mock spectra


def test_mock_spectra_fractions_flux_and_noise_follow_the_ssp_weights():
    from training.sim import spectra as sim

    rng = np.random.default_rng(5)
    params = sim.draw_params(rng, 300)
    spec = sim.make_spectra(params, 6, keep_model=True)
    t = spec.truth
    np.testing.assert_allclose(t.mass_frac.sum(1), 1.0, atol=1e-9)
    np.testing.assert_allclose(t.light_frac.sum(1), 1.0, atol=1e-9)
    np.testing.assert_allclose(t.age_mw, t.mass_frac @ AGE_CENTRES_LOG)
    assert set(np.unique(params.shape)) == set(range(len(sim.SHAPES)))
    snr = np.median(spec.model * np.sqrt(spec.ivar), axis=1) / np.median(spec.model / spec.model, axis=1)
    ratio = np.median(spec.flux * np.sqrt(spec.ivar), axis=1) / params.snr
    assert abs(np.median(ratio) - 1) < 0.1 and np.all(snr > 0)

    # flux = sum_b m_b T_b(Z_b): a two-bin population, no dust, narrow, at rest, equals the weighted templates
    tpl = sim.templates()
    mass = np.zeros((1, N_BINS))
    mass[0, 3], mass[0, 13] = 0.2, 0.8
    z_idx = 4  # solar: exactly a grid metallicity
    one = sim.Params(mass=mass, log_z=np.full((1, N_BINS), sim.LOG_Z[z_idx]), av=np.zeros(1), sigma=np.full(1, 1e-3),
                     redshift=np.zeros(1), snr=np.full(1, 50.0), phot_snr=np.full(1, 50.0), flux_scale=np.ones(1),
                     shape=np.full(1, -1))  # fmt: skip
    model = sim.make_spectra(one, 0, keep_model=True).model[0]
    expected = np.interp(MUSE_WAVE, tpl.rest_wave, 0.2 * tpl.spec[z_idx, 3] + 0.8 * tpl.spec[z_idx, 13])
    r = model / expected
    assert np.std(r[50:-50]) / np.mean(r[50:-50]) < 0.005  # the same spectrum up to the flux scale (0.0017)
    wrong = np.interp(MUSE_WAVE, tpl.rest_wave, 0.8 * tpl.spec[z_idx, 3] + 0.2 * tpl.spec[z_idx, 13])
    assert np.std((model / wrong)[50:-50]) / np.mean((model / wrong)[50:-50]) > 0.01  # and not another mix (0.019)
    # photometry: a young population is bluer in F275W / F814W than an old one
    young = sim.truth_of(np.eye(N_BINS)[[1]], np.zeros((1, N_BINS)))
    assert young.age_lw[0] == AGE_CENTRES_LOG[1]
    blue = tpl.phot[z_idx, 1, 0, 0, 0] / tpl.phot[z_idx, 1, 0, 0, 4]
    red = tpl.phot[z_idx, 14, 0, 0, 0] / tpl.phot[z_idx, 14, 0, 0, 4]
    assert blue > 10 * red


def test_spectrum_inputs_mask_bad_pixels_and_unusable_spaxels():
    from training.sim import spectra as sim

    spec = sim.make_spectra(sim.draw_params(np.random.default_rng(1), 3), 2)
    spec.ivar[1, 100:400] = 0.0
    spec.flux[2] = np.nan
    inputs, summary = spectrum_inputs(spec.flux, spec.ivar, spec.wave, spec.redshift, spec.photometry, spec.photometry_ivar)
    assert inputs["spectrum"].shape == (3, 2, 1024) and inputs["photometry"].shape == (3, 12)
    assert summary["usable"].tolist() == [True, True, False]
    masked = inputs["spectrum"][1, 1] == 0
    assert 50 < masked.sum() < 200 and (inputs["spectrum"][0, 1] > 0).all()
    assert (inputs["spectrum"][2] == 0).all()


# ------------------------------------------------------------------------------------------ pipeline


@pytest.fixture(scope="module")
def mock_store(tmp_path_factory):
    """Two mock 6x6 cubes; one spaxel of cube 2 without data."""
    from training.mock_ifu import write_mock_ifu

    path = write_mock_ifu(tmp_path_factory.mktemp("ifu") / "mock.zarr", 2, size=6, seed=11, spaxels_per_batch=12)
    group = zarr.open_group(str(path), mode="r+")
    flux = group["cubes/mock0001/flux"]
    block = flux[:, 2:3, 3:4]
    block[:] = np.nan
    flux[:, 2:3, 3:4] = block
    return path


def _run(store, out, *extra):
    return main(["run", "sfh", "--input", str(store), "--output", str(out), "--in-process", "--no-progress",
                 "--no-catalog", "--engine", "onnxruntime", *extra])  # fmt: skip


def test_pipeline_writes_sfh_cubes_and_one_catalog_row_per_cube(mock_store, tmp_path):
    out = tmp_path / "out"
    assert _run(mock_store, out) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["units"]["total"] == 2 and record["rows"]["in"] == 2 and record["rows"]["out"] == 2
    table = pq.read_table(sorted((out / "parts").glob("*.parquet"))).to_pandas().sort_values("object_id")
    assert table["object_id"].tolist() == [1, 2]
    assert (table["n_spaxels"] == 36).all() and table["n_estimated"].tolist() == [36, 35]
    for sfh in table["sfh"]:
        assert abs(np.sum(sfh) - 1) < 1e-4
    truth = zarr.open_group(str(mock_store) + ".truth.zarr", mode="r")
    store = zarr.open_group(str(out / "sfh.zarr"), mode="r")
    assert sorted(store.group_keys()) == ["1", "2"]
    errs = []
    for cube in ("1", "2"):
        g = store[cube]
        assert g["sfh"].shape == (16, 6, 6) and g["metallicity"].shape == (16, 6, 6) and g["age_lw"].shape == (6, 6)
        assert g.attrs["age_edges_log_yr"][0] == 6.5
        flags = g["flags"][:]
        sfh = g["sfh"][:]
        ok = (flags & FLAG_BITS["nan_pixels"]) == 0
        np.testing.assert_allclose(sfh.sum(0)[ok], 1.0, atol=1e-4)
        errs.append((g["age_lw"][:] - truth[cube]["age_lw"][:])[ok])
        assert (g["age_lw_err"][:][ok] > 0).all()
    flags2 = store["2"]["flags"][:]
    assert flags2[2, 3] & FLAG_BITS["nan_pixels"] and np.isnan(store["2"]["age_lw"][2, 3])
    assert np.isnan(store["2"]["sfh"][:, 2, 3]).all()
    # a trained network, not noise (bench/accuracy_sfh.py measures the accuracy)
    assert np.median(np.abs(np.concatenate(errs))) < 0.35
    schema = pq.read_schema(sorted((out / "parts").glob("*.parquet"))[0])
    assert schema.field("age_lw").metadata[b"unit"] == b"dex(yr)"


def test_resume_after_a_kill_redoes_only_the_unfinished_cube(mock_store, tmp_path):
    out = tmp_path / "out"
    assert _run(mock_store, out) == 0
    before = zarr.open_group(str(out / "sfh.zarr"), mode="r")["1"]["age_lw"][:]
    # unit 1 was killed after its group was renamed into place but before its part and done marker
    (out / "done" / "unit-0000001.json").unlink()
    (out / "parts" / "unit-0000001.parquet").unlink()
    first_mtime = (out / "sfh.zarr" / "1" / "zarr.json").stat().st_mtime_ns
    assert _run(mock_store, out) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["units"]["skipped"] == 1 and record["units"]["ran"] == 1
    table = pq.read_table(sorted((out / "parts").glob("*.parquet"))).to_pandas()
    assert sorted(table["object_id"].tolist()) == [1, 2]
    store = zarr.open_group(str(out / "sfh.zarr"), mode="r")
    assert sorted(store.group_keys()) == ["1", "2"]
    assert (out / "sfh.zarr" / "1" / "zarr.json").stat().st_mtime_ns == first_mtime  # the finished cube untouched
    np.testing.assert_array_equal(store["1"]["age_lw"][:], before)
    assert not any((out / ".array-groups.tmp").glob("*")) if (out / ".array-groups.tmp").exists() else True


def test_bad_input_is_refused_before_any_work(mock_store, tmp_path, capsys):
    # a cube whose ivar array has the wrong shape
    broken = tmp_path / "broken.zarr"
    shutil.copytree(mock_store, broken)
    group = zarr.open_group(str(broken), mode="r+")
    del group["cubes/mock0000/ivar"]
    group["cubes/mock0000"].create_array("ivar", shape=(10, 6, 6), dtype="float32")
    capsys.readouterr()
    out = tmp_path / "out"
    assert _run(broken, out) == 2
    assert "array 'cubes/mock0000/ivar'" in capsys.readouterr().err and not out.exists()
    # a store of another kind
    kin = tmp_path / "kin.zarr"
    from survey_infer.kinematics import write_kinematics_store

    write_kinematics_store(kin, {"galaxy_id": [0] * 6, "x": np.arange(6.0), "y": np.arange(6.0), "v_los": np.arange(6.0),
                                 "v_err": np.ones(6)}, {"galaxy_id": [0], "ra": [1.0], "dec": [2.0]})  # fmt: skip
    snapshot = tree_snapshot(tmp_path)
    assert _run(kin, out) == 2
    assert "'kinematics' store" in capsys.readouterr().err and tree_snapshot(tmp_path) == snapshot
    # a cube at a redshift that pushes the rest range off the MUSE grid
    far = tmp_path / "far.zarr"
    cube = {"name": "far", "object_id": 1, "ra": 1.0, "dec": 1.0, "redshift": 0.3, "wave": MUSE_WAVE,
            "flux": np.ones((len(MUSE_WAVE), 2, 2), np.float32), "ivar": np.ones((len(MUSE_WAVE), 2, 2), np.float32)}
    write_ifu_store(far, [cube])
    assert _run(far, out) == 2
    assert "cube 'far'" in capsys.readouterr().err
    assert main(["mock", "ifu", str(tmp_path / "none.zarr"), "--cubes", "0"]) == 2


def test_a_cube_missing_a_few_percent_of_the_range_runs_masked_and_flagged(tmp_path):
    """z = 0.045 pushes rest 9030 A to observed 9436 A, past MUSE's 9350 A (~98% covered): run, flag out_of_range."""
    from training.mock_ifu import mock_cube

    cube, _ = mock_cube(21, 3, 3, redshift=0.045)
    cube.update(name="edge", object_id=7, ra=10.0, dec=-3.0)
    store = write_ifu_store(tmp_path / "edge.zarr", [cube])
    out = tmp_path / "out"
    assert _run(store, out) == 0
    row = pq.read_table(sorted((out / "parts").glob("*.parquet"))).to_pandas().iloc[0]
    assert row["flag"] & FLAG_BITS["out_of_range"] and "out_of_range" in row["flag_reason"]
    flags = zarr.open_group(str(out / "sfh.zarr"), mode="r")["7"]["flags"][:]
    assert (flags & FLAG_BITS["out_of_range"]).all() and np.isfinite(zarr.open_group(str(out / "sfh.zarr"), mode="r")["7"]["age_lw"][:]).all()
