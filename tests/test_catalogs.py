"""Downstream catalog queries: exact cone searches (RA = 0/360, poles), units, cross-match, SQL, joins, maps."""

from __future__ import annotations

import astropy.units as u
import numpy as np
import pandas as pd
import pytest
import zarr
from astropy.coordinates import SkyCoord
from astropy.table import Table
from distributed import Client, LocalCluster

import catalogs
from catalogs.synthetic import SYNTHETIC_UNITS, synthetic_frame, write_run
from survey_infer import paths

N_ROWS = 100_000


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as c:
            yield c


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return synthetic_frame(N_ROWS, seed=3)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, frame, client):
    return write_run(tmp_path_factory.mktemp("catalog") / "run", frame, SYNTHETIC_UNITS, client)


def brute_force_cone(frame: pd.DataFrame, ra: float, dec: float, radius_arcsec: float) -> np.ndarray:
    """object_ids within the radius, by the exact angular distance (Vincenty, astropy)."""
    centre = SkyCoord(ra * u.deg, dec * u.deg)
    separation = centre.separation(SkyCoord(frame.ra.to_numpy() * u.deg, frame.dec.to_numpy() * u.deg))
    return np.sort(frame.object_id.to_numpy()[separation.to_value(u.arcsec) <= radius_arcsec])


@pytest.mark.parametrize(
    "ra, dec, radius_arcsec",
    [
        (0.0, 0.0, 600.0),  # straddles RA = 0/360
        (359.98, 2.0, 900.0),
        (0.03, -3.0, 1200.0),
        (123.0, 89.97, 400.0),  # contains the north pole
        (10.0, -89.9, 700.0),  # near the south pole, not containing it
        (200.0, 30.0, 7200.0),  # an ordinary 2-degree cone
    ],
)
def test_cone_search_is_exact(run_dir, frame, ra, dec, radius_arcsec):
    expected = brute_force_cone(frame, ra, dec, radius_arcsec)
    assert expected.size > 5  # the cone really tests something
    found = catalogs.open(run_dir).cone(ra, dec, radius_arcsec).to_pandas()
    assert np.array_equal(np.sort(found.object_id.to_numpy()), expected)


def test_quantities_for_positions_radii_and_filters(run_dir, frame):
    run = catalogs.open(run_dir)
    by_quantity = run.cone(0.0 * u.deg, 0.0 * u.deg, 10 * u.arcmin).where("distance", "<", 0.2 * u.Gpc)
    got = by_quantity.to_pandas()
    expected = brute_force_cone(frame, 0.0, 0.0, 600.0)
    expected = np.sort(frame.set_index("object_id").loc[expected].query("distance < 200").index.to_numpy())
    assert np.array_equal(got.object_id.to_numpy(), expected) and len(expected) > 0
    with pytest.raises(ValueError, match="'distance' is in Mpc"):
        run.where("distance", "<", 3 * u.kg)
    with pytest.raises(KeyError, match="no column 'nope'"):
        run.where("nope", "<", 1)
    with pytest.raises(ValueError, match="radius must be an angle"):
        run.cone(0, 0, 3 * u.m)


def test_to_astropy_restores_units(run_dir):
    table = catalogs.open(run_dir).box(ra=(40.0, 41.0), dec=(0.0, 1.0)).to_astropy()
    assert len(table) > 0
    assert table["ra"].unit == u.deg and table["distance"].unit == u.Mpc
    assert table["ml_g"].unit == u.Msun / u.Lsun
    assert np.all((table["ra"] >= 40 * u.deg) & (table["ra"] <= 41 * u.deg))


def test_box_wrapping_through_zero_and_polygon(run_dir, frame):
    run = catalogs.open(run_dir)
    wrapped = run.box(ra=(359.9, 0.1), dec=(-1.0, 1.0)).to_pandas()
    inside = ((frame.ra >= 359.9) | (frame.ra <= 0.1)) & (frame.dec.between(-1.0, 1.0))
    assert np.array_equal(wrapped.object_id.to_numpy(), np.sort(frame.object_id[inside].to_numpy()))
    polygon = run.polygon([(200.0, 20.0), (204.0, 20.0), (204.0, 24.0), (200.0, 24.0)]).to_pandas()
    assert len(polygon) > 0 and polygon.ra.between(199.9, 204.1).all() and polygon.dec.between(19.9, 24.1).all()


def test_xmatch_with_an_external_table_is_nearest_within_radius(run_dir, frame, tmp_path):
    rng = np.random.default_rng(5)
    picked = frame.sample(300, random_state=1)
    offset_arcsec = rng.uniform(0.1, 0.8, len(picked))
    angle = rng.uniform(0, 2 * np.pi, len(picked))
    moved = SkyCoord(picked.ra.to_numpy() * u.deg, picked.dec.to_numpy() * u.deg).directional_offset_by(
        angle * u.rad, offset_arcsec * u.arcsec
    )
    external = Table({"ra": moved.ra.deg * u.deg, "dec": moved.dec.deg * u.deg, "name": [f"x{i}" for i in picked.object_id]})
    path = tmp_path / "external.ecsv"
    external.write(path)
    matched = catalogs.open(run_dir).xmatch(path, radius=1 * u.arcsec).to_pandas()
    assert set(matched.name) <= set(external["name"])
    by_name = matched.set_index("name")
    for oid, off in zip(picked.object_id.to_numpy()[:50], offset_arcsec[:50]):
        row = by_name.loc[f"x{oid}"]
        # the nearest catalog row is the displaced source itself unless another lies closer (rare at 100k)
        assert row["_dist_arcsec"] <= 1.0
        if row["object_id"] == oid:
            assert row["_dist_arcsec"] == pytest.approx(off, abs=1e-6)
    assert (by_name.object_id.to_numpy() == np.array([int(n[1:]) for n in by_name.index])).mean() > 0.95


def test_sql_over_the_catalog(run_dir, frame):
    run = catalogs.open(run_dir)
    result = run.sql("SELECT count(*) AS n, sum(flag) AS flagged, max(ml_g) AS top FROM objects")
    assert int(result.n[0]) == len(frame)
    assert int(result.flagged[0]) == int(frame.flag.sum())
    assert result.top[0] == pytest.approx(frame.ml_g.max())


def test_info_names_the_run(run_dir):
    info = catalogs.open(run_dir).info()
    assert info["rows"] == N_ROWS and info["task"] == "synthetic" and info["columns"]["distance"] == "Mpc"


def test_open_refuses_incomplete_and_missing_runs(tmp_path, run_dir):
    with pytest.raises(FileNotFoundError, match="not a survey-infer run"):
        catalogs.open(tmp_path)
    record = paths.run_record_path(run_dir).read_text()
    try:
        paths.run_record_path(run_dir).write_text(record.replace('"complete"', '"running"'))
        with pytest.raises(ValueError, match="status 'running'"):
            catalogs.open(run_dir)
        assert catalogs.open(run_dir, require_complete=False).info()["status"] == "running"
    finally:
        paths.run_record_path(run_dir).write_text(record)


def test_two_runs_join_on_object_id(tmp_path, frame, client):
    small = frame.iloc[:5000]
    first = write_run(tmp_path / "a", small, SYNTHETIC_UNITS, client, task="mass_to_light")
    other = small.assign(ml_g=small.ml_g * 2)[["object_id", "ra", "dec", "ml_g"]]
    second = write_run(tmp_path / "b", other, SYNTHETIC_UNITS, client, task="property_maps")
    joined = catalogs.open_runs([first, second]).to_pandas()
    assert len(joined) == len(small)
    assert np.allclose(joined.ml_g_property_maps, 2 * joined.ml_g)
    assert catalogs.open_runs([first, second]).units["ml_g_property_maps"] == "Msun/Lsun"


def test_maps_by_object_with_units_and_wcs(run_dir):
    group = zarr.open_group(paths.maps_path(run_dir), mode="w")
    ids = np.array([7, 11, 13], dtype=np.int64)
    maps = np.random.default_rng(0).normal(size=(3, 2, 8, 8)).astype(np.float32)
    group.create_array("maps", data=maps)
    group.create_array("object_id", data=ids)
    group.attrs.update(names=["log_mstar", "log_age"], units=["dex(Msun)", "dex(yr)"], pixel_scale_arcsec=0.4)
    try:
        found = catalogs.open(run_dir).maps(11)
        assert np.array_equal(found.data["log_age"].value, maps[1, 1])
        assert found.data["log_mstar"].unit == u.dex(u.Msun)
        centre = found.wcs.pixel_to_world(3.5, 3.5)
        row = catalogs.open(run_dir).sql("SELECT ra, dec FROM objects WHERE object_id = 11")
        assert centre.separation(SkyCoord(row.ra[0] * u.deg, row.dec[0] * u.deg)) < 1e-3 * u.arcsec
        with pytest.raises(KeyError, match="object_id 12 has no maps"):
            catalogs.open(run_dir).maps(12)
    finally:
        import shutil

        shutil.rmtree(paths.maps_path(run_dir))


def test_cli_cone_sql_info_xmatch_and_show(run_dir, frame, tmp_path, capsys):
    from survey_infer.cli import main

    out = tmp_path / "cone.ecsv"
    code = main(["catalog", "cone", str(run_dir), "--ra", "0", "--dec", "0", "--radius", "10arcmin",
                 "--where", "ml_g > 1", "--columns", "ml_g", "--format", "ecsv", "--output", str(out)])  # fmt: skip
    assert code == 0
    table = Table.read(out)
    inside = brute_force_cone(frame, 0.0, 0.0, 600.0)
    expected = frame.set_index("object_id").loc[inside].query("ml_g > 1")
    assert len(table) == len(expected) > 0 and table["ml_g"].unit == u.Msun / u.Lsun
    assert set(table.colnames) == {"ml_g", "ra", "dec"}
    assert main(["catalog", "sql", str(run_dir), "SELECT count(*) AS n FROM objects WHERE flag = 1",
                 "--format", "csv"]) == 0  # fmt: skip
    assert f"\n{int(frame.flag.sum())}" in capsys.readouterr().out
    assert main(["catalog", "info", str(run_dir)]) == 0
    assert '"rows": 100000' in capsys.readouterr().out
    external = Table({"ra": frame.ra[:20].to_numpy(), "dec": frame.dec[:20].to_numpy()})
    external.write(tmp_path / "ext.fits")
    matched = tmp_path / "matched.parquet"
    assert main(["catalog", "xmatch", str(run_dir), str(tmp_path / "ext.fits"), str(matched)]) == 0
    assert len(Table.read(matched)) == 20
    assert main(["catalog", "cone", str(run_dir), "--ra", "0", "--dec", "0", "--radius", "1arcmin",
                 "--where", "nope > 1"]) == 2  # fmt: skip
    assert "no column 'nope'" in capsys.readouterr().err
    assert main(["catalog", "info", str(tmp_path)]) == 2
    assert not (tmp_path / "cone.ecsv.tmp").exists()


def test_cli_show_draws_maps(run_dir, tmp_path):
    from survey_infer.cli import main

    group = zarr.open_group(paths.maps_path(run_dir), mode="w")
    group.create_array("maps", data=np.ones((1, 2, 8, 8), dtype=np.float32))
    group.create_array("object_id", data=np.array([5], dtype=np.int64))
    group.attrs.update(names=["log_mstar", "log_sfr"], units=["dex(Msun)", "dex(Msun/yr)"], pixel_scale_arcsec=0.4)
    try:
        png = tmp_path / "maps.png"
        assert main(["catalog", "show", str(run_dir), "5", "--png", str(png)]) == 0
        assert png.stat().st_size > 1000
    finally:
        import shutil

        shutil.rmtree(paths.maps_path(run_dir))


def test_sfh_cube_with_units_wcs_and_png(run_dir, tmp_path):
    from survey_infer.cli import main

    root = zarr.open_group(paths.sfh_path(run_dir), mode="w")
    cube = root.create_group("NGC0001")
    sfh = np.random.default_rng(1).uniform(size=(16, 6, 5)).astype(np.float32)
    cube.create_array("sfh", data=sfh)
    cube.create_array("mean_age", data=np.full((6, 5), 9.5, dtype=np.float32))
    header = {"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 10.0, "CRVAL2": -5.0, "CRPIX1": 3.0,
              "CRPIX2": 3.5, "CDELT1": -0.2 / 3600, "CDELT2": 0.2 / 3600}  # fmt: skip
    cube.attrs.update(units={"sfh": "Msun/yr", "mean_age": "dex(yr)"}, age_bins_yr=list(np.geomspace(1e7, 1.3e10, 16)),
                      wcs=header)  # fmt: skip
    try:
        run = catalogs.open(run_dir)
        assert run.cube_ids() == ["NGC0001"]
        found = run.sfh("NGC0001")
        assert np.array_equal(found.data["sfh"].value, sfh) and found.data["sfh"].unit == u.Msun / u.yr
        assert found.wcs.pixel_to_world(2.0, 2.5).ra.deg == pytest.approx(10.0)
        with pytest.raises(KeyError, match="cube 'nope' not in"):
            run.sfh("nope")
        png = tmp_path / "sfh.png"
        assert main(["catalog", "show", str(run_dir), "NGC0001", "--png", str(png)]) == 0
        assert png.stat().st_size > 1000
    finally:
        import shutil

        shutil.rmtree(paths.sfh_path(run_dir))


def test_xmatch_against_another_hats_catalog(run_dir, frame, tmp_path, client):
    other = frame.iloc[1000:1400].assign(ra=lambda f: np.mod(f.ra + 0.3 / 3600, 360.0))
    other_run = write_run(tmp_path / "other", other[["object_id", "ra", "dec", "ml_g"]], SYNTHETIC_UNITS, client)
    matched = catalogs.open(run_dir).xmatch(paths.catalog_path(other_run), radius=2.0).to_pandas()
    # every run row within 2" of an 'other' row gets its nearest one: the displaced twin, plus a few neighbours
    # in the crowded RA = 0 strip
    twins = matched[matched.object_id == matched.object_id_other]
    assert set(twins.object_id) == set(other.object_id)
    assert np.allclose(twins._dist_arcsec, 0.3 * np.cos(np.radians(twins.dec)), atol=1e-3)
    assert len(matched) < 1.05 * len(other) and matched._dist_arcsec.max() <= 2.0
