"""The mock universe: real populations, consistent truth, deterministic, and writable as a store."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from survey_infer.paths import truth_maps_path, truth_path
from survey_infer.store import open_cutouts
from training.mock import write_mock_cutouts
from training.sim import get_simulator
from training.sim.ssp import AGE_GRID_YR, AV_GRID, BANDS, LSUN_ERG_S, nebular_spectra, ssp_table
from training.sim.universe import MAP_NAMES, simulate


METALLICITY_SOLAR_INDEX = 4  # METALLICITIES_ZSUN[4] == 1.0


@pytest.fixture(scope="module")
def galaxies():
    return simulate(768, size=69, seed=7)


def test_ssp_table_has_the_physics_of_real_populations():
    table = ssp_table()
    solar = int(np.argmin(np.abs(table.log_z)))
    g, i = BANDS.index("g"), BANDS.index("i")
    ml_g = table.live_frac[solar] / table.lum[solar, :, 0, g]
    old, young = np.argmin(np.abs(table.ages_yr - 1e10)), np.argmin(np.abs(table.ages_yr - 1e7))
    assert 2.5 < ml_g[old] < 6.0  # BC03 Chabrier, 10 Gyr, solar
    assert ml_g[young] < 0.1
    assert np.all(np.diff(table.live_frac[solar]) <= 1e-9) and 0.4 < table.live_frac[solar, -1] < 0.6
    colour = table.obs_abs_mag[solar, :, 0, 0, g] - table.obs_abs_mag[solar, :, 0, 0, i]
    assert colour[old] > colour[young] + 0.5
    av1 = int(np.argmin(np.abs(AV_GRID - 1.0)))
    a_g = -2.5 * np.log10(table.lum[solar, old, av1, g] / table.lum[solar, old, 0, g])
    assert 1.05 < a_g < 1.35  # Calzetti: A_g / A_V ~ 1.2


def test_nebular_emission_follows_kennicutt():
    """H-alpha of the Cloudy grids under constant star formation: ~2e41 erg/s per Msun/yr (Chabrier IMF)."""
    wavelength = np.linspace(6400.0, 6700.0, 3001)
    nebular = nebular_spectra(METALLICITY_SOLAR_INDEX, wavelength)  # [age, wave], Lsun/A per Msun formed
    line = (wavelength > 6555) & (wavelength < 6570)
    continuum = np.median(nebular[:, ~line], axis=1, keepdims=True)
    h_alpha = np.trapezoid((nebular - continuum)[:, line], wavelength[line], axis=1)  # Lsun per Msun formed
    per_sfr = np.trapezoid(h_alpha, AGE_GRID_YR) * LSUN_ERG_S  # erg/s for 1 Msun/yr sustained
    assert 1.3e41 < per_sfr < 3.0e41
    assert np.all(nebular[AGE_GRID_YR > 3e7] == 0)


def test_truth_is_consistent(galaxies):
    t = galaxies.truth
    assert np.allclose(np.log10(t["ml_g"] * t["lum_g"]), t["log_mstar"], atol=1e-6)
    assert np.array_equal(galaxies.columns["lum_g"], t["lum_g"])
    assert np.all((t["ml_g"] > 0.05) & (t["ml_g"] < 20))
    assert 0.8 < np.median(t["ml_g"]) < 2.5
    assert np.all(t["mag_r"] < 17.9)  # the spectroscopic limit, up to the rest/observed frame difference
    images = galaxies.images
    assert images.shape == (768, 1, 69, 69) and images.dtype == np.float32
    assert np.isfinite(images).all() and images.min() >= -1 and images.max() <= 1


def test_colour_mass_to_light_relation_has_a_literature_slope(galaxies):
    t = galaxies.truth
    slope, intercept = np.polyfit(t["g_i"], np.log10(t["ml_g"]), 1)
    assert 0.9 < slope < 1.5
    residual = np.log10(t["ml_g"]) - (intercept + slope * t["g_i"])
    assert 0.1 < residual.std() < 0.2  # the literature's scatter about the relation (Bell & de Jong 2001)
    # morphology carries M/L information: bulge-dominated galaxies have higher M/L than discs
    assert np.median(t["ml_g"][t["bt_light_g"] > 0.5]) > 1.5 * np.median(t["ml_g"][t["bt_light_g"] < 0.1])


def test_deterministic_given_a_seed():
    a, b, c = simulate(40, seed=3), simulate(40, seed=3), simulate(40, seed=4)
    assert np.array_equal(a.images, b.images)
    assert all(np.array_equal(a.truth[k], b.truth[k]) for k in a.truth)
    assert not np.array_equal(a.images, c.images)


def test_maps_add_up_to_the_stellar_mass():
    sim = simulate(16, size=64, seed=5, bands=BANDS, maps=True)
    assert sim.images.shape == (16, 5, 64, 64)
    assert sim.maps.shape == (16, len(MAP_NAMES), 64, 64)
    mass_per_pixel = 10.0 ** sim.maps[:, MAP_NAMES.index("log_mstar")].astype(np.float64)
    assert np.allclose(np.log10(mass_per_pixel.sum(axis=(1, 2))), sim.truth["log_mstar"], atol=1e-3)
    age = sim.maps[:, MAP_NAMES.index("log_age")]
    bright = mass_per_pixel > 1e-3 * mass_per_pixel.max(axis=(1, 2), keepdims=True)
    assert np.all((age[bright] > 6) & (age[bright] < 10.2))


def test_unknown_band_is_refused():
    with pytest.raises(ValueError, match="bands must be among"):
        simulate(2, bands=("g", "y"))


def test_mock_store_with_bands_and_maps(tmp_path):
    store = write_mock_cutouts(tmp_path / "m.zarr", 300, size=64, seed=1, bands=("g", "r", "i"), maps=True,
                               rows_per_unit=256, rows_per_batch=128)  # fmt: skip
    info = open_cutouts(store)
    assert info.n_rows == 300 and info.image_shape == (3, 64, 64)
    assert info.attrs["survey"]["bands"] == ["g", "r", "i"]
    truth = pq.read_table(truth_path(store))
    assert truth.num_rows == 300 and {"ml_g", "ml_i", "log_mstar", "g_i"} <= set(truth.column_names)
    maps = zarr.open_group(truth_maps_path(store), mode="r")
    assert maps["maps"].shape == (300, len(MAP_NAMES), 64, 64) and list(maps.attrs["map_names"]) == list(MAP_NAMES)
    assert np.isfinite(maps["maps"][:5]).any()


def test_registry_default_is_the_universe():
    assert get_simulator() is simulate


def test_real_stamps_are_framed_like_the_mocks():
    from survey_infer import stamps
    from training.sim import universe

    assert stamps.FOV_IN_HALF_LIGHT_RADII == universe.FOV_IN_HALF_LIGHT_RADII
