"""The `tiles` store: ingest FITS tiles + a source catalog, cut cutouts on the fly, run a task on them.

Synthetic tiles (training.mock_tiles: galaxies at known sky positions on TAN tiles that overlap) always run;
the real SDSS images and frame in ../shared/realdata are used where present.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales

from survey_infer.cli import main
from survey_infer.cluster import client_for
from survey_infer.config import RunConfig
from survey_infer.errors import RefusedError, StoreError
from survey_infer.flags import FLAG_BITS, NO_ESTIMATE
from survey_infer.pipeline import plan_run, run_pipeline
from survey_infer.stamps import cut_stamp, find_bright_sources, prepare_stamp, read_fits_image
from survey_infer.tiles import (
    CutSpec,
    ingest_tiles,
    iter_tile_batches,
    open_tiles,
    parse_images_spec,
)
from tests.conftest import read_parts, tree_snapshot
from training.mock_tiles import PIXEL_SCALE, TileLayout, write_mock_tiles

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
SDSS_IMAGES = REALDATA / "images_sdss_astropydata"
SDSS_FRAME = REALDATA / "sdss_tractor"
LAYOUT = TileLayout(n_tiles=2, size_px=400, overlap_px=60)
N_SOURCES, N_FAR = 50, 3


@pytest.fixture(scope="module")
def mock_tiles(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("tiles")
    mock = write_mock_tiles(directory / "fits", layout=LAYOUT, n_sources=N_SOURCES, n_off_tile=N_FAR, seed=3)
    mock["store"] = directory / "tiles.zarr"
    mock["summary"] = ingest_tiles(mock["store"], mock["tiles"], mock["sources"], size_col="r_half_arcsec")
    mock["truth"] = Table.read(mock["sources"])
    return mock


def _run(store: Path, out: Path, **kwargs) -> dict:
    config = RunConfig(task="mass_to_light", input=store, output=out, in_process=True, progress=False, **kwargs)
    plan = plan_run(config)
    with client_for(config) as client:
        result = run_pipeline(config, client, plan)
    assert result.exit_code == 0, result.record["failures"]
    return result.record


def test_parse_images_spec():
    assert parse_images_spec("g=a_g.fits, r=b.fits[1]") == {"g": "a_g.fits", "r": "b.fits[1]"}
    for bad in ("g", "g=a.fits,g=b.fits", "", "=a.fits"):
        with pytest.raises(StoreError, match="--images"):
            parse_images_spec(bad)


def test_every_source_goes_to_exactly_one_tile_or_is_flagged(mock_tiles):
    info = open_tiles(mock_tiles["store"])
    truth = mock_tiles["truth"]
    assert info.n_rows == N_SOURCES + N_FAR == sum(stop - start for start, stop in info.unit_bounds)
    assert info.unit_tiles[-1] == -1 and len(info.unit_bounds) == 3
    import zarr

    sources = zarr.open_group(str(mock_tiles["store"]), mode="r")["sources"]
    ids, tile, x, y = (np.asarray(sources[c][:]) for c in ("object_id", "tile", "x", "y"))
    assert sorted(ids) == list(truth["object_id"])  # every source once, none dropped
    by_id = {int(i): row for i, row in zip(truth["object_id"], truth)}
    step = LAYOUT.size_px - LAYOUT.overlap_px
    in_overlap = 0
    for i, t, xi, yi in zip(ids, tile, x, y):
        row = by_id[int(i)]
        inside = [k for k in range(LAYOUT.n_tiles)
                  if -0.5 < row["x_field"] - k * step < LAYOUT.size_px - 0.5 and -0.5 < row["y_field"] < LAYOUT.size_px - 0.5]  # fmt: skip
        in_overlap += len(inside) > 1
        if not inside:
            assert t == -1 and np.isnan(xi)  # kept, flagged at run time
            continue
        assert t in inside
        margins = [min(row["x_field"] - k * step + 0.5, LAYOUT.size_px - 0.5 - row["x_field"] + k * step) for k in inside]
        assert t == inside[int(np.argmax(margins))]  # the tile where it lies farthest from an edge
        assert xi == pytest.approx(row["x_field"] - t * step, abs=1e-6) and yi == pytest.approx(row["y_field"], abs=1e-6)
    assert in_overlap >= 2  # the layout really has sources on the overlap
    assert mock_tiles["summary"]["off_tile"] >= N_FAR


def _isolated_inside(mock_tiles, fov_factor: float) -> list[int]:
    truth = mock_tiles["truth"]
    xf, yf = np.asarray(truth["x_field"]), np.asarray(truth["y_field"])
    fov = fov_factor * np.asarray(truth["r_half_arcsec"]) / PIXEL_SCALE
    keep = []
    for i in range(N_SOURCES):
        others = np.hypot(xf - xf[i], yf - yf[i])
        others[i] = np.inf
        ny, nx = LAYOUT.field_shape
        if np.nanmin(others) > 0.8 * fov[i] and fov[i] < xf[i] < nx - fov[i] and fov[i] < yf[i] < ny - fov[i]:
            keep.append(int(truth["object_id"][i]))
    return keep


@pytest.mark.parametrize("framing", ["pixel_scale", "half_light"])
def test_cutouts_are_centred_on_their_sources(mock_tiles, framing):
    """The cut is sub-pixel exact: the light centroid of each cutout lies within 0.5 tile px of the source."""
    info = open_tiles(mock_tiles["store"])
    cut = CutSpec((1,), 69, framing, fov_r_half=6.0, arcsec_per_px=PIXEL_SCALE)
    import zarr

    ids = np.asarray(zarr.open_group(str(mock_tiles["store"]), mode="r")["sources/object_id"][:])
    r_half = {int(i): r for i, r in zip(mock_tiles["truth"]["object_id"], mock_tiles["truth"]["r_half_arcsec"])}
    wanted = set(_isolated_inside(mock_tiles, 6.0 if framing == "half_light" else 69 * 0.5 * PIXEL_SCALE / 1.0))
    offsets = []
    for (start, stop), tile in zip(info.unit_bounds, info.unit_tiles):
        if tile < 0:
            continue
        for offset, images, flags in iter_tile_batches(info.path, tile, start, stop, cut, 16, {}):
            for k in range(len(images)):
                object_id = int(ids[start + offset + k])
                if object_id not in wanted:
                    continue
                assert flags[k] == 0
                image = images[k, 0].astype(np.float64)
                yy, xx = np.indices(image.shape) - 34.0
                weight = np.clip(image - np.median(image), 0, None) * (np.hypot(yy, xx) < 8)
                tile_px = 6.0 * r_half[object_id] / PIXEL_SCALE / 69 if framing == "half_light" else 1.0
                dx = (weight * xx).sum() / weight.sum() * tile_px
                dy = (weight * yy).sum() / weight.sum() * tile_px
                offsets.append(np.hypot(dx, dy))
    assert len(offsets) >= 5
    print(f"{framing}: {len(offsets)} isolated sources, centroid offsets (tile px) max {max(offsets):.3f}, "
          f"median {np.median(offsets):.3f}")  # fmt: skip
    assert max(offsets) < 0.5


def test_run_on_tiles_writes_a_cutouts_run(mock_tiles, small_store, tmp_path):
    """Every source once, off-tile rows kept and flagged, edges padded and flagged, the same Parquet schema
    as a run on a cutouts store, and the cutting said in run.json."""
    record = _run(mock_tiles["store"], tmp_path / "tiles_run")
    table = read_parts(tmp_path / "tiles_run")
    assert sorted(table["object_id"]) == list(mock_tiles["truth"]["object_id"])
    flags = table["flag"].to_numpy()
    off = (flags & FLAG_BITS["off_tile"]) != 0
    padded = (flags & FLAG_BITS["edge_padded"]) != 0
    assert off.sum() == mock_tiles["summary"]["off_tile"] and table["ml_g"][off].isna().all()
    assert padded.any() and np.isfinite(table["ml_g"][padded & ~off]).all()
    good = (flags & NO_ESTIMATE) == 0
    assert good.sum() == len(table) - off.sum()
    assert ((table["ml_g"][good] > 0) & (table["ml_g"][good] < 6)).all()

    cutting = record["input"]["cutting"]
    assert record["input"]["kind"] == "tiles" and cutting["framing"] == "half_light" and cutting["resampled"]
    assert cutting["tile_pixel_scale_arcsec"] == [pytest.approx(PIXEL_SCALE)]
    assert record["rows"] == {"in": len(table), "out": len(table), "flagged": int((flags != 0).sum())}

    _run(small_store, tmp_path / "cutouts_run", bundle=None)
    tiles_schema = pq.read_schema(next((tmp_path / "tiles_run" / "parts").glob("*.parquet")))
    cutouts_schema = pq.read_schema(next((tmp_path / "cutouts_run" / "parts").glob("*.parquet")))
    assert tiles_schema.equals(cutouts_schema, check_metadata=True)
    assert (tmp_path / "tiles_run" / "catalog").is_dir()

    again = _run(mock_tiles["store"], tmp_path / "tiles_run")  # resumable like a cutouts run
    assert again["units"]["skipped"] == again["units"]["total"] and again["units"]["ran"] == 0


def test_sizes_are_measured_when_the_catalog_gives_none(mock_tiles, tmp_path):
    store = tmp_path / "nosize.zarr"
    ingest_tiles(store, mock_tiles["tiles"], mock_tiles["sources"])
    info = open_tiles(store)
    stats: dict = {}
    cut = CutSpec((1,), 69, "half_light", fov_r_half=10.0)
    start, stop = info.unit_bounds[0]
    n = sum(len(images) for _, images, _ in iter_tile_batches(store, info.unit_tiles[0], start, stop, cut, 64, stats))
    assert n == stop - start and stats["sizes_measured"] == n


def test_bands_on_another_grid_are_refused_or_reprojected(mock_tiles, tmp_path):
    g, r = mock_tiles["tiles"][0]["g"], mock_tiles["tiles"][0]["r"]
    with fits.open(r) as hdul:
        header, data = hdul[0].header.copy(), hdul[0].data
    header["CRPIX1"] += 3.25  # the same sky, pixels shifted by 3.25
    shifted = tmp_path / "r_shifted.fits"
    fits.PrimaryHDU(np.roll(data, 3, axis=1), header=header).writeto(shifted)
    with pytest.raises(StoreError, match=r"band r .* not on band g's pixel grid .*--reproject"):
        ingest_tiles(tmp_path / "refused.zarr", [{"g": g, "r": str(shifted)}], mock_tiles["sources"])
    assert not (tmp_path / "refused.zarr").exists()
    pytest.importorskip("reproject", reason="the reproject package (extra 'tiles') is not installed")
    ingest_tiles(tmp_path / "reprojected.zarr", [{"g": g, "r": str(shifted)}], mock_tiles["sources"], reproject=True)
    import zarr

    image = zarr.open_group(str(tmp_path / "reprojected.zarr"), mode="r")["tiles/tile-00000/image"]
    assert image.attrs["files"]["r"].endswith("(reprojected)")
    inner = np.s_[10:-10, 10:-10]
    assert np.corrcoef(image[1][inner].ravel(), fits.getdata(r)[inner].ravel())[0, 1] > 0.9


def _write_catalog(path: Path, **columns) -> Path:
    Table(columns).write(path, overwrite=True)
    return path


@pytest.fixture()
def good_catalog(tmp_path, mock_tiles) -> Path:
    return Path(mock_tiles["sources"])


def _bad_inputs(tmp_path: Path, mock_tiles: dict) -> dict[str, tuple[list[str], str]]:
    g = mock_tiles["tiles"][0]["g"]
    no_wcs = tmp_path / "no_wcs.fits"
    fits.PrimaryHDU(np.zeros((50, 50), np.float32)).writeto(no_wcs)
    spectral = tmp_path / "spectral.fits"
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["WAVE", "LINEAR"]
    fits.PrimaryHDU(np.zeros((50, 50), np.float32), header=wcs.to_header()).writeto(spectral)
    small = tmp_path / "small_r.fits"
    fits.PrimaryHDU(np.zeros((40, 40), np.float32), header=LAYOUT.wcs(0).to_header()).writeto(small)
    good = mock_tiles["sources"]
    nan_coords = _write_catalog(tmp_path / "nan.ecsv", object_id=np.array([1, 2]), ra=np.array([150.0, np.nan]),
                                dec=np.array([2.0, 2.0]))  # fmt: skip
    empty = _write_catalog(tmp_path / "empty.parquet", object_id=np.zeros(0, np.int64), ra=np.zeros(0), dec=np.zeros(0))
    return {
        "fits without WCS": ([f"g={no_wcs}"], good, "has no WCS"),
        "non-celestial WCS": ([f"g={spectral}"], good, "non-celestial WCS"),
        "bands of different shape": ([f"g={g},r={small}"], good, r"band r .*shape \(40, 40\) against \(400, 400\)"),
        "catalog without the named columns": ([f"g={g}"], good, "has no column 'RA_ICRS'"),
        "NaN coordinates": ([f"g={g}"], nan_coords, r"column 'ra' .* 1 NaN/inf values \(object ids \[2\]"),
        "empty catalog": ([f"g={g}"], empty, "has no rows"),
    }


@pytest.mark.parametrize("case", ["fits without WCS", "non-celestial WCS", "bands of different shape",
                                  "catalog without the named columns", "NaN coordinates", "empty catalog"])  # fmt: skip
def test_bad_input_is_refused_with_a_clear_message(case, mock_tiles, tmp_path, capsys):
    images, catalog, message = _bad_inputs(tmp_path, mock_tiles)[case]
    store = tmp_path / "store.zarr"
    argv = ["ingest", "tiles", str(store), "--sources", str(catalog)]
    for spec in images:
        argv += ["--images", spec]
    if case == "catalog without the named columns":
        argv += ["--ra-col", "RA_ICRS"]
    before = tree_snapshot(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "refused" in err
    import re

    assert re.search(message, err), err
    assert not store.exists() and tree_snapshot(tmp_path) == before


def test_cli_ingest_then_run(mock_tiles, tmp_path, capsys):
    store = tmp_path / "cli.zarr"
    argv = ["ingest", "tiles", str(store), "--sources", mock_tiles["sources"], "--size-col", "r_half_arcsec"]
    for tile in mock_tiles["tiles"]:
        argv += ["--images", ",".join(f"{band}={path}" for band, path in tile.items())]
    assert main(argv) == 0
    assert "2 tiles, bands g,r,i" in capsys.readouterr().out
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err  # never overwritten unasked
    out = tmp_path / "out"
    assert main(["run", "mass_to_light", "--input", str(store), "--output", str(out), "--in-process",
                 "--no-progress", "--no-catalog"]) == 0  # fmt: skip
    assert json.loads((out / "run.json").read_text())["rows"]["out"] == N_SOURCES + N_FAR
    assert main(["run", "mass_to_light", "--input", str(store), "--output", str(tmp_path / "o2"),
                 "--rows-per-unit", "64"]) == 2  # fmt: skip


# ------------------------------------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def sdss_gri(tmp_path_factory) -> dict:
    files = {band: SDSS_IMAGES / f"reprojected_sdss_{band}.fits.bz2" for band in "gri"}
    if not all(path.is_file() for path in files.values()):
        pytest.skip(f"real SDSS images not present in {SDSS_IMAGES} (shared/realdata is not checked out here)")
    image, wcs = read_fits_image(files["g"])
    sources = find_bright_sources(image, n_max=8)
    ra, dec = wcs.pixel_to_world_values([s.x for s in sources], [s.y for s in sources])
    directory = tmp_path_factory.mktemp("sdss")
    scale = proj_plane_pixel_scales(wcs).mean() * 3600.0
    catalog = _write_catalog(directory / "galaxies.csv", object_id=np.arange(len(sources)), ra=ra, dec=dec,
                             r_half_arcsec=[s.r_half_px * scale for s in sources])  # fmt: skip
    store = directory / "sdss.zarr"
    ingest_tiles(store, [{b: str(p) for b, p in files.items()}], catalog, size_col="r_half_arcsec")
    return {"store": store, "sources": sources, "image": image, "dir": directory}


def test_real_sdss_tiles_run_mass_to_light(sdss_gri):
    """Real bz2 SDSS g, r, i images on one grid: the galaxies are cut and run through mass_to_light, and each
    cutout is exactly the one the cutout path makes (cut_stamp + prepare_stamp: one normalisation)."""
    info = open_tiles(sdss_gri["store"])
    assert info.bands == ["g", "r", "i"] and info.pixel_scales["tile-00000"] == pytest.approx(1.188, rel=0.01)
    record = _run(sdss_gri["store"], sdss_gri["dir"] / "out")
    table = read_parts(sdss_gri["dir"] / "out").sort_values("object_id")
    inside = [(s.x - 5 * s.r_half_px > 0 and s.y - 5 * s.r_half_px > 0 and s.x + 5 * s.r_half_px < 681 and
               s.y + 5 * s.r_half_px < 495) for s in sdss_gri["sources"]]  # fmt: skip
    flags = table["flag"].to_numpy()
    assert ((flags & FLAG_BITS["edge_padded"]) != 0).tolist() == [not i for i in inside]
    assert np.isfinite(table["ml_g"]).all() and ((table["ml_g"] > 0) & (table["ml_g"] < 6)).all()
    assert record["input"]["cutting"]["resampled"]

    scale = info.pixel_scales["tile-00000"]
    cut = CutSpec((0,), 69, "half_light", fov_r_half=10.0)
    (start, stop), tile = info.unit_bounds[0], info.unit_tiles[0]
    _, images, _ = next(iter_tile_batches(info.path, tile, start, stop, cut, 256, {}))
    import zarr

    sources = zarr.open_group(str(info.path), mode="r")["sources"]
    k = int(np.flatnonzero(inside)[0])
    row = int(np.flatnonzero(np.asarray(sources["object_id"][:]) == k)[0])
    x, y, r_half = sources["x"][row], sources["y"][row], sources["r_half_arcsec"][row] / scale
    direct = prepare_stamp(cut_stamp(sdss_gri["image"].astype(np.float32), (x, y), 10.0 * r_half, 69))
    np.testing.assert_allclose(images[row - start], direct, atol=1e-5)


def test_real_sdss_frame_with_its_photoobj_catalog(tmp_path):
    """The tractor piece of a real SDSS r frame (bz2, NMGY recorded) with its real photoObj catalog."""
    frame, catalog = SDSS_FRAME / "frame-r-001000-1-0100.fits.bz2", SDSS_FRAME / "photoObj-001000-1-0100.fits"
    if not (frame.is_file() and catalog.is_file()):
        pytest.skip(f"real SDSS frame not present in {SDSS_FRAME} (shared/realdata is not checked out here)")
    store = tmp_path / "frame.zarr"
    summary = ingest_tiles(store, [{"r": str(frame)}], catalog, ra_col="RA", dec_col="DEC", id_col="OBJID",
                           size_col="PETROTH50[2]")  # fmt: skip
    assert summary["sources"] == 19 and 0 < summary["tiles"]["tile-00000"] < 19  # the rest fall off this piece
    import zarr

    group = zarr.open_group(str(store), mode="r")
    assert group["tiles/tile-00000/image"].attrs["zero_points"]["r"]["NMGY"] == pytest.approx(0.00478322)
    info = open_tiles(store)
    stats: dict = {}
    (start, stop), tile = info.unit_bounds[0], info.unit_tiles[0]
    cut = CutSpec((0,), 69, "half_light", fov_r_half=10.0)
    images = np.concatenate([b for _, b, _ in iter_tile_batches(store, tile, start, stop, cut, 64, stats)])
    sizes = np.asarray(group["sources/r_half_arcsec"][start:stop])
    assert stats.get("sizes_measured", 0) == int((~(sizes > 0)).sum())  # stars have PETROTH50 = -9999
    assert np.isfinite(images).all()
    with pytest.raises(RefusedError, match=r"bands \['r'\]; the bundle needs \['g'\]"):  # a g-band model
        plan_run(RunConfig(task="mass_to_light", input=store, output=tmp_path / "out"))


def test_batch_sky_statistics_equal_astropy_sigma_clipping():
    """The vectorised sky of prepare_stamps is astropy's sigma_clipped_stats median and the MAD sigma, row by row."""
    from astropy.stats import sigma_clipped_stats

    from survey_infer.imaging import clipped_sky_and_noise, mad_sigma

    rng = np.random.default_rng(5)
    values = rng.normal(0.2, 1.0, (40, 900))
    values[:, :60] += rng.uniform(0, 50, (40, 60))  # sources in the border
    values[3, 100:700] = np.nan
    values[7, :] = np.nan
    values[9, 2:] = np.nan
    sky, noise = clipped_sky_and_noise(values)
    for row in range(len(values)):
        kept = values[row][np.isfinite(values[row])]
        if not kept.size:
            assert np.isnan(sky[row]) and np.isnan(noise[row])
            continue
        assert sky[row] == pytest.approx(sigma_clipped_stats(kept, sigma=3.0)[1], abs=1e-12)
        assert noise[row] == pytest.approx(mad_sigma(kept), abs=1e-12)


def test_tile_compressed_and_gzipped_fits_are_read(mock_tiles, tmp_path):
    """A tile-compressed HDU behind an empty primary (found without naming it) and a .fits.gz file."""
    g, r = mock_tiles["tiles"][0]["g"], mock_tiles["tiles"][0]["r"]
    with fits.open(g) as hdul:
        data, header = hdul[0].data.copy(), hdul[0].header.copy()
    compressed = tmp_path / "g.fits.fz"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header, compression_type="GZIP_1",
                                                       quantize_level=0.0)]).writeto(compressed)  # fmt: skip
    gzipped = tmp_path / "r.fits.gz"
    with fits.open(r) as hdul:
        hdul.writeto(gzipped)
    summary = ingest_tiles(tmp_path / "c.zarr", [{"g": str(compressed), "r": str(gzipped)}], mock_tiles["sources"])
    assert summary["bands"] == ["g", "r"]
    import zarr

    image = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")["tiles/tile-00000/image"]
    np.testing.assert_array_equal(image[0], data)  # lossless
    np.testing.assert_array_equal(image[1], fits.getdata(r))
    assert image.attrs["bunit"] == {"g": "nanomaggy", "r": "nanomaggy"}
    assert image.attrs["files"]["g"].endswith("[COMPRESSED_IMAGE]")


def test_singular_wcs_is_refused(mock_tiles, tmp_path):
    header = LAYOUT.wcs(0).to_header()
    for key in ("PC1_1", "PC1_2", "PC2_1", "PC2_2"):  # a zero matrix maps every pixel to one sky position
        header[key] = 0.0
    bad = tmp_path / "singular.fits"
    fits.PrimaryHDU(np.zeros((50, 50), np.float32), header=header).writeto(bad)
    with pytest.raises(StoreError, match="band g: .*singular.fits.*(cannot be inverted|does not invert|cannot read)"):
        ingest_tiles(tmp_path / "s.zarr", [{"g": str(bad)}], mock_tiles["sources"])


def test_kept_catalog_columns_reach_the_task(mock_tiles, tmp_path):
    """A --keep column (here the g luminosity) is stored with the sources and used by the task (log M*)."""
    catalog = Table.read(mock_tiles["sources"])
    catalog["lum_g"] = np.where(np.arange(len(catalog)) % 2 == 0, 1e10, np.nan)
    path = tmp_path / "with_lum.parquet"
    catalog.write(path)
    store = tmp_path / "lum.zarr"
    ingest_tiles(store, mock_tiles["tiles"], path, size_col="r_half_arcsec", keep=("lum_g",))
    _run(store, tmp_path / "out", build_catalog=False)
    table = read_parts(tmp_path / "out").merge(catalog.to_pandas()[["object_id", "lum_g"]], on="object_id")
    usable = (table["flag"] & NO_ESTIMATE) == 0
    known = usable & table["lum_g"].notna()
    assert known.sum() > 5 and (~known & usable).sum() > 5
    np.testing.assert_allclose(table["log_mstar"][known], np.log10(table["ml_g"][known] * 1e10), rtol=1e-5)
    assert table["log_mstar"][~known].isna().all()
    assert ((table["flag"][usable & table["lum_g"].isna()] & FLAG_BITS["no_luminosity"]) != 0).all()
