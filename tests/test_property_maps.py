"""property_maps (issue 5): the universe's gas and maps, the task through the pipeline into maps.zarr, resume,
refusals. A tiny random-weight U-Net on 32 px mocks keeps it fast; the shipped bundle is checked if present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from distributed import Client, LocalCluster

from survey_infer import paths
from survey_infer.bundle import load_bundle
from survey_infer.config import RunConfig
from survey_infer.errors import StoreError
from survey_infer.models import build_model
from survey_infer.outputs import read_done_marker
from survey_infer.pipeline import plan_run, run_pipeline
from survey_infer.tasks import get_task
from survey_infer.tasks.property_maps import MAP_NAMES
from tests.conftest import assert_exactly_once, read_parts, write_random_bundle
from training.mock_property_maps import half_mass_ellipse_mask, write_mock_property_maps
from training.sim.universe import (
    EMPTY_SIGMA_MSUN_KPC2, KS_A, KS_N, PROPERTY_MAP_NAMES, simulate,
)  # fmt: skip

UGRIZ = ("u", "g", "r", "i", "z")
SIZE = 32
TINY = {"in_channels": 5, "n_maps": 6, "width": 4, "depth": 4, "target_mean": [7.0, -0.3, 9.5, -3.0, 6.5, -0.4],
        "target_std": [1.0, 0.3, 0.4, 1.2, 0.8, 0.4]}  # fmt: skip


@pytest.fixture(scope="module")
def sim():
    return simulate(24, size=48, seed=7, bands=UGRIZ, property_maps=True, image_units="nmgy_arcsec2")


def test_gas_maps_leave_every_seed_of_the_mocks_unchanged(sim):
    plain = simulate(24, size=48, seed=7, bands=UGRIZ)
    with_maps = simulate(24, size=48, seed=7, bands=UGRIZ, property_maps=True)
    assert np.array_equal(plain.images, with_maps.images)
    assert all(np.array_equal(plain.truth[k], with_maps.truth[k]) for k in plain.truth)
    assert np.array_equal(with_maps.property_maps, sim.property_maps, equal_nan=True)  # the image units: no effect
    assert sim.property_maps.shape == (24, len(PROPERTY_MAP_NAMES), 48, 48)
    assert tuple(PROPERTY_MAP_NAMES) == tuple(MAP_NAMES)


def test_maps_and_light_come_from_the_same_populations(sim):
    t, maps = sim.truth, sim.property_maps.astype(np.float64)
    area = (t["pix_kpc"] ** 2)[:, None, None]
    sigma = np.nan_to_num(10 ** maps[:, 0], nan=0.0)
    mass = (sigma * area).sum(axis=(1, 2))
    # the map holds the galaxy's stellar mass (empty pixels hold < 0.1 Msun/pc^2: a negligible share)
    assert np.allclose(np.log10(mass), t["log_mstar"], atol=0.01)
    # its mass-weighted age and metallicity are the galaxy's, and its SFR map sums to the galaxy's SFR
    age = (sigma * np.nan_to_num(maps[:, 2])).sum(axis=(1, 2)) / sigma.sum(axis=(1, 2))
    metal = (sigma * np.nan_to_num(maps[:, 1])).sum(axis=(1, 2)) / sigma.sum(axis=(1, 2))
    assert np.allclose(age, t["log_age_mw"], atol=0.01) and np.allclose(metal, t["log_z_mw"], atol=0.01)
    sfr = (np.nan_to_num(10 ** maps[:, 3], nan=0.0) * area).sum(axis=(1, 2))
    forming = t["sfr"] > 1e-3
    assert np.allclose(np.log10(sfr[forming]), np.log10(t["sfr"][forming]), atol=0.02)
    # the image's light is the truth's light (same components): total r flux = the truth's r magnitude
    flux = (sim.images[:, 2].astype(np.float64) * (t["pix_arcsec"] ** 2)[:, None, None]).sum(axis=(1, 2))
    expected = 10 ** (-0.4 * (t["mag_r"] - 22.5))
    assert np.median(np.abs(flux / expected - 1)) < 0.05
    # where young stars dominate the mass map, the image is bluer (u - r) than where old stars do
    young, old = maps[:, 2] < 9.0, maps[:, 2] > 9.8
    colour = -2.5 * np.log10(np.clip(sim.images[:, 0], 1e-3, None) / np.clip(sim.images[:, 2], 1e-3, None))
    bright = sim.images[:, 2] > 5.0
    assert np.median(colour[young & bright]) < np.median(colour[old & bright]) - 0.3


def test_gas_follows_kennicutt_schmidt_and_its_metallicity_falls_outwards(sim):
    maps = sim.property_maps.astype(np.float64)
    sfr, gas, z_gas = maps[:, 3], maps[:, 4], maps[:, 5]
    both = np.isfinite(sfr) & np.isfinite(gas)
    ks_gas = np.log10(1e6 * (10 ** sfr[both] / KS_A) ** (1 / KS_N))  # the star-forming gas the SFR needs
    assert np.all(gas[both] >= ks_gas - 1e-4)  # total gas = star-forming + atomic
    dense = both & (sfr > -1.3)  # molecular-dominated: the total gas obeys the law within the atomic share
    predicted = np.log10(KS_A * (10 ** gas[dense] / 1e6) ** KS_N)
    assert dense.sum() > 50 and np.all((predicted - sfr[dense] >= -1e-4) & (predicted - sfr[dense] < 0.13))
    assert np.all(np.isnan(z_gas) == np.isnan(gas))  # the metallicity map is empty where the gas map is
    assert np.all(np.isnan(gas) == (np.nan_to_num(10**gas, nan=0) < EMPTY_SIGMA_MSUN_KPC2))
    size = gas.shape[-1]
    yy, xx = np.mgrid[0:size, 0:size] - (size - 1) / 2
    radius = np.hypot(xx, yy)
    falling = 0
    for k in range(len(gas)):
        ok = np.isfinite(z_gas[k])
        if ok.sum() > 20:
            falling += np.corrcoef(radius[ok], z_gas[k][ok])[0, 1] < 0
    assert falling >= 0.8 * len(gas)
    # the atomic disc is more extended than the stars: gas covers at least as many pixels
    assert np.mean(np.isfinite(gas)) > np.mean(np.isfinite(maps[:, 0]))


def test_half_mass_ellipse_holds_most_of_the_mass(sim):
    mask = half_mass_ellipse_mask(sim.property_maps[:, 0])
    sigma = np.nan_to_num(10 ** sim.property_maps[:, 0].astype(np.float64), nan=0.0)
    inside = (sigma * mask).sum(axis=(1, 2)) / sigma.sum(axis=(1, 2))
    assert np.all(inside > 0.7) and np.all(mask.mean(axis=(1, 2)) < 0.9)


# ------------------------------------------------------------------------------------ through the pipeline
def make_tiny_maps_bundle(directory: Path, size: int = SIZE) -> Path:
    return write_random_bundle(
        directory, "property_maps", "property_unet", TINY,
        {"inputs": ["image"], "outputs": ["maps", "maps_logvar", "empty_logit"]},
        {"image": {"bands": list(UGRIZ), "shape": [5, size, size], "dtype": "float32", "image_units": "nmgy_arcsec2",
                   "softening": [0.2] * 5}},
        {"maps": {"names": list(MAP_NAMES)}, "maps_err": {"scale": [1.0] * 6}, "empty_probability_threshold": 0.5},
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_maps_bundle(tmp_path_factory) -> Path:
    return make_tiny_maps_bundle(tmp_path_factory.mktemp("bundles") / "property_maps-tiny-v1")


@pytest.fixture(scope="module")
def maps_store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("stores") / "pm.zarr"
    return write_mock_property_maps(store, 100, size=SIZE, seed=3, rows_per_unit=32, rows_per_batch=16)


@pytest.fixture
def client():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as c:
            yield c


def _config(store, out, bundle, **kwargs):
    return RunConfig(task="property_maps", input=store, output=out, bundle=bundle, engine="torch", progress=False,
                     build_catalog=False, **kwargs)  # fmt: skip


def _direct(store: Path, bundle_dir: Path, rows: slice):
    """The task's own answer for some store rows, without the pipeline (prepare -> torch -> postprocess)."""
    task, bundle = get_task("property_maps"), load_bundle(bundle_dir)
    group = zarr.open_group(str(store), mode="r")
    images = group["images"][rows]
    columns = {c: group[c][rows] for c in ("size_kpc", "distance_mpc")}
    inputs, flags = task.prepare(images, columns, bundle)
    model = build_model("property_unet", **bundle.meta["architecture"]["kwargs"])
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(bundle_dir / "weights.safetensors")))
    model.eval()
    with torch.inference_mode():
        out = [o.numpy() for o in model(torch.from_numpy(inputs["image"]))]
    return task.postprocess(dict(zip(["maps", "maps_logvar", "empty_logit"], out)), columns, flags, bundle)


def test_maps_zarr_rows_align_with_the_catalog_and_resume_writes_each_once(client, maps_store, tiny_maps_bundle,
                                                                           tmp_path):
    out = tmp_path / "out"
    config = _config(maps_store, out, tiny_maps_bundle)
    record = run_pipeline(config, client).record
    assert record["status"] == "complete" and record["arrays"]["arrays"] == ["maps", "maps_err", "pixel_scale_arcsec"]
    group = zarr.open_group(str(out / "maps.zarr"), mode="r")
    assert group["maps"].shape == (100, 6, SIZE, SIZE) and group["maps"].chunks[0] == 16  # one batch a chunk
    assert list(group["maps"].attrs["names"]) == list(MAP_NAMES)
    ids = group["object_id"][:]
    catalog = read_parts(out).set_index("object_id")
    np.testing.assert_array_equal(np.sort(ids), np.arange(100))
    direct = _direct(maps_store, tiny_maps_bundle, slice(40, 60))
    rows = np.flatnonzero((ids >= 40) & (ids < 60))
    np.testing.assert_allclose(group["maps"][rows], direct["maps"], atol=1e-4, equal_nan=True)
    np.testing.assert_allclose(catalog.loc[ids[rows], "log_mstar_map"], direct["log_mstar_map"], atol=1e-4)
    # a catalog total is the sum of the written map (the join by object_id gives the same object)
    pix = group["pixel_scale_arcsec"][rows]
    assert np.all(np.isfinite(pix) & (pix > 0))
    first = group["maps"][:]

    # a run killed after unit 1 wrote half its maps, before its part and marker: redone whole, rows once
    paths.done_marker_path(out, 1).unlink()
    (out / "parts" / "unit-0000001.parquet").unlink()
    damaged = zarr.open_array(str(out / "maps.zarr" / "maps"), mode="r+")
    damaged[32:48] = 99.0
    assert read_done_marker(out, 1) is None
    record = run_pipeline(config, client).record
    assert record["units"]["ran"] == 1
    np.testing.assert_array_equal(zarr.open_group(str(out / "maps.zarr"), mode="r")["maps"][:], first)
    assert_exactly_once(out, 100)


def test_wrong_bands_or_log_scaled_images_are_refused(tmp_path, tiny_maps_bundle):
    gri = write_mock_property_maps(tmp_path / "gri.zarr", 8, size=SIZE, seed=1, bands=("g", "r", "i"),
                                   rows_per_unit=8, rows_per_batch=8)  # fmt: skip
    with pytest.raises(StoreError, match=r"bands \['g', 'r', 'i'\].*needs the bands \['u', 'g', 'r', 'i', 'z'\]"):
        plan_run(_config(gri, tmp_path / "o1", tiny_maps_bundle))
    from training.mock import write_mock_cutouts

    scaled = write_mock_cutouts(tmp_path / "scaled.zarr", 8, size=SIZE, seed=1, bands=UGRIZ, rows_per_unit=8,
                                rows_per_batch=8)  # fmt: skip
    with pytest.raises(StoreError, match="survey.image_units = 'nmgy_arcsec2'.*not per-cutout log-scaled"):
        plan_run(_config(scaled, tmp_path / "o2", tiny_maps_bundle))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_mock_stores_take_the_images_codec(tmp_path):
    """The throughput bench mocks uncompressed stores (`--image-codec none`): same pixels, no compressor."""
    plain = write_mock_property_maps(tmp_path / "plain.zarr", 8, size=SIZE, seed=1, rows_per_unit=8, rows_per_batch=8,
                                     image_codec="none")  # fmt: skip
    packed = write_mock_property_maps(tmp_path / "lz4.zarr", 8, size=SIZE, seed=1, rows_per_unit=8, rows_per_batch=8)
    plain_images = zarr.open_group(str(plain), mode="r")["images"]
    packed_images = zarr.open_group(str(packed), mode="r")["images"]
    assert plain_images.compressors == () and packed_images.compressors != ()
    np.testing.assert_array_equal(plain_images[:], packed_images[:])


SHIPPED = Path(__file__).resolve().parents[1] / "survey_infer" / "data" / "bundles" / "property_maps-unet64-v1"


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED.exists(), reason="no shipped property_maps bundle")
def test_shipped_bundle_beats_the_mean_map(tmp_path):
    from training.mock_property_maps import map_residuals, simulate_block
    from training.train_property_maps import predict, softening
    from survey_infer.imaging import asinh_transform

    bundle = load_bundle(SHIPPED)
    model = build_model("property_unet", **bundle.meta["architecture"]["kwargs"])
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(SHIPPED / "weights.safetensors")))
    sim = simulate_block(128, 64, 123_456, 0)
    pred, _, _ = predict(model, asinh_transform(sim.images, softening(UGRIZ)))
    deltas = map_residuals(sim.property_maps, pred)
    kwargs = bundle.meta["architecture"]["kwargs"]
    mean_map = np.broadcast_to(np.array(kwargs["target_mean"], np.float32)[None, :, None, None], pred.shape)
    baseline = map_residuals(sim.property_maps, mean_map)
    # the densities and the age are learnt; the metallicities barely (bench: 0.30 vs 0.34, 0.35 vs 0.37 dex)
    for name, d, b in zip(MAP_NAMES, deltas, baseline):
        factor = {"log_sigma_mstar": 0.5, "log_z_star": 1.0, "log_z_gas": 1.0}.get(name, 0.85)
        assert np.std(d) < factor * np.std(b), name
