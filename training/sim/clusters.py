"""Mock semi-resolved star clusters in M31, made star by star, in three HST bands on crowded fields.

One cluster: log age uniform in [6.6, 10] (snapped to the PARSEC grid, 0.05 dex: 10 Myr - 10 Gyr and a 0.4 dex
margin below, so that estimates near 10 Myr do not regress away from a prior edge), log initial mass uniform in
[2.2, 3.9] (160 - 8000 Msun: 250 - 4000 and a margin), stars drawn one by one from a Kroupa IMF until that mass
is reached (``training.sim.isochrones``), so the handful of bright stars that dominate a low-mass cluster's
light scatters as in nature. Each star's magnitudes come from the PARSEC isochrone of the cluster's age (Z =
0.014) through the derived table; V-band extinction A_V uniform in [0, 1] (Cardelli R_V = 3.1) on the
cluster. Positions follow an EFF (Elson, Fall & Freeman 1987) projected profile Sigma(R) ∝ (1 + R^2/a^2)^(-g/2)
with g uniform in [2.6, 4]; the half-light radius r_h (log-uniform in 0.1 - 10 pc) is the profile's projected
half-mass radius, a = r_h / sqrt(2^(2/(g-2)) - 1). At 785 kpc one pixel is 0.05" = 0.19 pc, so a 64-pixel
cutout spans 12.2 pc: clusters with r_h >~ 4 pc overfill it, as they would in PHAT.

Field: an older disc population of the same isochrones, constant star formation from 10 Gyr to 100 Myr ago
(so most stars are old), stellar mass surface density log-uniform in 3 - 60 Msun/pc^2, its own A_V in [0, 0.6],
stars drawn from the same IMF and placed uniformly (including a margin whose light the PSF spreads in).

Observation: PHAT-like HST imaging: WFC3/UVIS F336W, ACS/WFC F475W (or F438W) and F814W, all on the 0.05" ACS
drizzle grid; PSF per band a core Gaussian (FWHM 0.075/0.085/0.095") plus a 15% halo 4x wider, rendered on a 2x
supersampled grid then binned; AB zero points and exposure times close to PHAT's; sky (zodiacal) background,
Poisson noise of sky + sources and read noise, then the sky subtracted. Pixel values are fluxes on the AB zero
point 25 (a pixel value of 1 is an AB magnitude of 25), sky subtracted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.sim.isochrones import (
    IsochroneTable, extinction, integrated_abs_mags, load_table, sample_cluster_masses, sample_imf,
)  # fmt: skip

DISTANCE_KPC = 785.0
DISTANCE_MODULUS = 5 * np.log10(DISTANCE_KPC * 100.0)  # 24.47
PIXEL_SCALE_ARCSEC = 0.05
PC_PER_ARCSEC = DISTANCE_KPC * 1e3 * np.pi / (180 * 3600)  # 3.806
SIZE = 64
SUPERSAMPLE = 2
MARGIN_PX = 8  # field stars beyond the cutout edge whose PSF wings reach in
FLUX_ZERO_POINT = 25.0  # AB magnitude of a pixel value of 1
BANDS = ("F336W", "F475W", "F814W")
ALT_BANDS = ("F336W", "F438W", "F814W")
# Instrument per band: AB zero point (e- / s), PHAT-like exposure [s], zodiacal sky [AB mag / arcsec^2],
# PSF core FWHM [arcsec], read noise per pixel of the combined frame [e-].
ZERO_POINT_AB = {"F336W": 24.64, "F438W": 24.83, "F475W": 26.06, "F814W": 25.94}
EXPOSURE_S = {"F336W": 1600.0, "F438W": 1600.0, "F475W": 1800.0, "F814W": 1800.0}
SKY_MAG_ARCSEC2 = {"F336W": 24.8, "F438W": 23.5, "F475W": 22.9, "F814W": 22.1}
PSF_FWHM_ARCSEC = {"F336W": 0.075, "F438W": 0.080, "F475W": 0.085, "F814W": 0.095}
READ_NOISE_E = {"F336W": 6.0, "F438W": 6.0, "F475W": 8.0, "F814W": 8.0}
PSF_HALO_FRACTION = 0.15
PSF_HALO_SCALE = 4.0

LOG_AGE_RANGE = (6.6, 10.0)  # 10 Myr - 10 Gyr with a 0.4 dex margin below 10 Myr (no pile-up against the edge)
LOG_MASS_RANGE = (2.2, 3.9)
LOG_RH_RANGE = (-1.0, 1.0)  # pc
EFF_GAMMA_RANGE = (2.6, 4.0)
AV_RANGE = (0.0, 1.0)
FIELD_AV_RANGE = (0.0, 0.6)
FIELD_LOG_SIGMA_RANGE = (np.log10(3.0), np.log10(60.0))  # Msun / pc^2
FIELD_LOG_AGES = np.arange(8.0, 10.01, 0.25)
M31_CENTRE = (10.6847, 41.2690)
TRUTH_COLUMNS = ("log_age", "log_mass", "log_rh", "mass_current", "av", "eff_gamma", "n_stars", "field_sigma",
                 "field_av")  # fmt: skip  (+ mag_<band>: the cluster's noiseless total AB magnitude per band)


@dataclass
class SimulatedClusters:
    """Images (n, 3, S, S) float32, per-object columns for the store and truth columns (with object_id)."""

    images: np.ndarray
    columns: dict[str, np.ndarray]
    truth: dict[str, np.ndarray]


def electrons_per_flux(band: str) -> float:
    """Electrons collected in the exposure per unit of pixel flux (AB zero point 25)."""
    return 10 ** (-0.4 * (FLUX_ZERO_POINT - ZERO_POINT_AB[band])) * EXPOSURE_S[band]


def sky_electrons(band: str) -> float:
    return 10 ** (-0.4 * (SKY_MAG_ARCSEC2[band] - ZERO_POINT_AB[band])) * PIXEL_SCALE_ARCSEC**2 * EXPOSURE_S[band]


def noise_flux(band: str) -> float:
    """1-sigma noise of an empty pixel (sky Poisson + read noise) in pixel-flux units: the network's softening."""
    return float(np.sqrt(sky_electrons(band) + READ_NOISE_E[band] ** 2) / electrons_per_flux(band))


def _psf_ffts(bands: tuple[str, ...], n: int) -> np.ndarray:
    """rFFTs (bands, n, n//2+1) of each band's PSF on the supersampled grid, centred at pixel 0 (wrap)."""
    scale = PIXEL_SCALE_ARCSEC / SUPERSAMPLE
    k = np.fft.fftfreq(n) * n
    r2 = k[:, None] ** 2 + k[None, :] ** 2
    out = []
    for band in bands:
        sig = PSF_FWHM_ARCSEC[band] / 2.3548 / scale
        core = np.exp(-0.5 * r2 / sig**2)
        halo = np.exp(-0.5 * r2 / (PSF_HALO_SCALE * sig) ** 2)
        psf = (1 - PSF_HALO_FRACTION) * core / core.sum() + PSF_HALO_FRACTION * halo / halo.sum()
        out.append(np.fft.rfft2(psf))
    return np.stack(out)


def eff_radii(rng: np.random.Generator, n: int, r_h_pc: float, gamma: float) -> np.ndarray:
    """Projected radii [pc] of ``n`` stars from an untruncated EFF profile with half-mass radius ``r_h_pc``."""
    a = r_h_pc / np.sqrt(2 ** (2 / (gamma - 2)) - 1)
    u = rng.random(n)
    return a * np.sqrt((1 - u) ** (1 / (1 - gamma / 2)) - 1)


def eff_enclosed_fraction(radius_pc: np.ndarray, r_h_pc: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """Fraction of an EFF profile's light within projected ``radius_pc`` (used by the classical baseline)."""
    a = r_h_pc / np.sqrt(2 ** (2 / (gamma - 2)) - 1)
    return 1 - (1 + (radius_pc / a) ** 2) ** (1 - gamma / 2)


class ClusterRenderer:
    """Renders star lists into noisy cutouts; holds the PSF FFTs and the isochrone table."""

    def __init__(self, bands: tuple[str, ...] = BANDS, size: int = SIZE, table: IsochroneTable | None = None):
        self.bands = tuple(bands)
        self.size = size
        self.table = table or load_table()
        self.table.band_index(self.bands)
        self.n_super = SUPERSAMPLE * (size + 2 * MARGIN_PX)
        self.psf = _psf_ffts(self.bands, self.n_super)
        self.ext_ratio = extinction(self.bands, 1.0)

    def deposit(self, canvas: np.ndarray, x_arcsec: np.ndarray, y_arcsec: np.ndarray, flux: np.ndarray) -> None:
        """Add point sources (flux (n, bands)) at positions relative to the cutout centre to the super-grid."""
        half = self.n_super / 2
        scale = PIXEL_SCALE_ARCSEC / SUPERSAMPLE
        ix = np.floor(x_arcsec / scale + half).astype(np.int64)
        iy = np.floor(y_arcsec / scale + half).astype(np.int64)
        inside = (ix >= 0) & (ix < self.n_super) & (iy >= 0) & (iy < self.n_super)
        idx = iy[inside] * self.n_super + ix[inside]
        for b in range(len(self.bands)):
            canvas[b] += np.bincount(idx, weights=flux[inside, b], minlength=self.n_super**2).reshape(canvas.shape[1:])

    def observe(self, canvas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """PSF, bin to the detector grid, crop the margin, add sky/Poisson/read noise, subtract the sky."""
        blurred = np.fft.irfft2(np.fft.rfft2(canvas) * self.psf, s=canvas.shape[1:])
        n = self.n_super // SUPERSAMPLE
        binned = blurred.reshape(len(self.bands), n, SUPERSAMPLE, n, SUPERSAMPLE).sum(axis=(2, 4))
        cut = binned[:, MARGIN_PX : MARGIN_PX + self.size, MARGIN_PX : MARGIN_PX + self.size]
        out = np.empty_like(cut)
        for b, band in enumerate(self.bands):
            gain = electrons_per_flux(band)
            sky = sky_electrons(band)
            electrons = rng.poisson(np.maximum(cut[b], 0) * gain + sky) + rng.normal(0, READ_NOISE_E[band], cut[b].shape)
            out[b] = (electrons - sky) / gain
        return out

    def star_flux(self, age_index: int, masses: np.ndarray, a_v: float) -> np.ndarray:
        """Apparent pixel-flux units (n, bands) of stars of initial ``masses`` at M31 behind ``a_v``."""
        mags = self.table.star_abs_mags(age_index, masses, self.bands) + DISTANCE_MODULUS + a_v * self.ext_ratio
        return 10 ** (-0.4 * (mags - FLUX_ZERO_POINT))

    def field(self, canvas: np.ndarray, rng: np.random.Generator, sigma_msun_pc2: float, a_v: float) -> None:
        """Add a field population of surface density ``sigma_msun_pc2`` over the cutout and its margin."""
        width_arcsec = self.n_super / SUPERSAMPLE * PIXEL_SCALE_ARCSEC
        mass = sigma_msun_pc2 * (width_arcsec * PC_PER_ARCSEC) ** 2
        masses = sample_cluster_masses(rng, mass)
        ages_yr = 10**FIELD_LOG_AGES
        weights = np.gradient(ages_yr)
        which = rng.choice(len(FIELD_LOG_AGES), size=len(masses), p=weights / weights.sum())
        x = rng.uniform(-width_arcsec / 2, width_arcsec / 2, len(masses))
        y = rng.uniform(-width_arcsec / 2, width_arcsec / 2, len(masses))
        flux = np.zeros((len(masses), len(self.bands)))
        for k, log_age in enumerate(FIELD_LOG_AGES):
            sel = which == k
            flux[sel] = self.star_flux(int(self.table.age_index(log_age)), masses[sel], a_v)
        self.deposit(canvas, x, y, flux)

    def cluster(self, canvas: np.ndarray, rng: np.random.Generator, log_age: float, log_mass: float,
                r_h_pc: float, gamma: float, a_v: float, centre_px: tuple[float, float]) -> dict[str, float]:
        """Add one cluster; returns its truth (true initial and current mass, star count, noiseless mags)."""
        index = int(self.table.age_index(log_age))
        masses = sample_cluster_masses(rng, 10**log_mass)
        radius = eff_radii(rng, len(masses), r_h_pc, gamma) / PC_PER_ARCSEC
        phi = rng.uniform(0, 2 * np.pi, len(masses))
        x = radius * np.cos(phi) + centre_px[0] * PIXEL_SCALE_ARCSEC
        y = radius * np.sin(phi) + centre_px[1] * PIXEL_SCALE_ARCSEC
        flux = self.star_flux(index, masses, a_v)
        self.deposit(canvas, x, y, flux)
        sl = self.table.rows(index)
        m_ini, m_act = self.table.m_ini[sl], self.table.m_act[sl]
        alive = masses <= m_ini[-1]
        current = float(np.interp(masses[alive], m_ini, m_act).sum())  # remnants left out
        total = flux.sum(axis=0)
        return {"log_mass": float(np.log10(masses.sum())), "mass_current": current, "n_stars": float(len(masses)),
                **{f"mag_{b}": float(FLUX_ZERO_POINT - 2.5 * np.log10(max(t, 1e-30))) for b, t in zip(self.bands, total)}}  # fmt: skip


def draw_parameters(rng: np.random.Generator, n: int, table: IsochroneTable) -> dict[str, np.ndarray]:
    """Cluster and field parameters of ``n`` mocks (the priors of the module doc)."""
    log_age = rng.uniform(*LOG_AGE_RANGE, n)
    log_age = table.log_age[table.age_index(log_age)]  # the grid age actually rendered is the truth
    return {
        "log_age": log_age,
        "log_mass_target": rng.uniform(*LOG_MASS_RANGE, n),
        "log_rh": rng.uniform(*LOG_RH_RANGE, n),
        "eff_gamma": rng.uniform(*EFF_GAMMA_RANGE, n),
        "av": rng.uniform(*AV_RANGE, n),
        "field_sigma": 10 ** rng.uniform(*FIELD_LOG_SIGMA_RANGE, n),
        "field_av": rng.uniform(*FIELD_AV_RANGE, n),
        "centre_x": rng.uniform(-0.5, 0.5, n),
        "centre_y": rng.uniform(-0.5, 0.5, n),
    }


def check_bands(bands: tuple[str, ...]) -> tuple[str, ...]:
    """The bands as a tuple if they are one of the two PHAT-like sets; a ValueError naming them otherwise."""
    bands = tuple(bands)
    if bands not in (BANDS, ALT_BANDS):
        raise ValueError(f"bands must be {','.join(BANDS)} or {','.join(ALT_BANDS)}, got {','.join(bands)}")
    return bands


_RENDERERS: dict[tuple, ClusterRenderer] = {}


def renderer(bands: tuple[str, ...] = BANDS, size: int = SIZE) -> ClusterRenderer:
    key = (tuple(bands), size)
    if key not in _RENDERERS:
        _RENDERERS[key] = ClusterRenderer(tuple(bands), size)
    return _RENDERERS[key]


def simulate_clusters(n: int, *, size: int = SIZE, seed: int = 0, first_id: int = 0,
                      bands: tuple[str, ...] = BANDS, field: bool = True, **_: object) -> SimulatedClusters:
    """``n`` mock clusters on crowded fields; deterministic for a given seed."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    bands = check_bands(bands)
    rng = np.random.default_rng(seed)
    render = renderer(bands, size)
    params = draw_parameters(rng, n, render.table)
    images = np.empty((n, len(bands), size, size), dtype=np.float32)
    columns_out = (*TRUTH_COLUMNS, *(f"mag_{b}" for b in bands))
    truth: dict[str, list] = {k: [] for k in columns_out}
    for i in range(n):
        canvas = np.zeros((len(bands), render.n_super, render.n_super))
        if field:
            render.field(canvas, rng, float(params["field_sigma"][i]), float(params["field_av"][i]))
        info = render.cluster(canvas, rng, float(params["log_age"][i]), float(params["log_mass_target"][i]),
                              float(10 ** params["log_rh"][i]), float(params["eff_gamma"][i]), float(params["av"][i]),
                              (float(params["centre_x"][i]), float(params["centre_y"][i])))  # fmt: skip
        images[i] = render.observe(canvas, rng)
        for key in columns_out:
            truth[key].append(info[key] if key in info else float(params[key][i]))
    ids = np.arange(first_id, first_id + n, dtype=np.int64)
    # Positions scattered over M31's disc (cosmetic: the catalogue needs sky coordinates).
    ra = M31_CENTRE[0] + rng.uniform(-0.6, 0.6, n)
    dec = M31_CENTRE[1] + rng.uniform(-0.4, 0.4, n)
    columns = {"object_id": ids, "ra": ra, "dec": dec}
    out_truth = {"object_id": ids, **{k: np.asarray(v, dtype=np.float64) for k, v in truth.items()}}
    return SimulatedClusters(images=images, columns=columns, truth=out_truth)


def ssp_grid(bands: tuple[str, ...] = BANDS, table: IsochroneTable | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(log ages, absolute AB magnitudes per Msun (ages, bands)) of fully sampled populations: the SSP models
    the classical integrated-photometry baseline fits."""
    table = table or load_table()
    ages = table.log_age[(table.log_age >= LOG_AGE_RANGE[0] - 1e-6) & (table.log_age <= LOG_AGE_RANGE[1] + 1e-6)]
    return ages, np.stack([integrated_abs_mags(table, a, tuple(bands)) for a in ages])


def survey_attrs(bands: tuple[str, ...], seed: int) -> dict:
    """The store's `survey` description of cluster mocks."""
    return {
        "name": "survey-infer mock M31 star clusters (PARSEC isochrones, Kroupa IMF, PHAT-like HST imaging)",
        "bands": list(bands),
        "pixel_scale": PIXEL_SCALE_ARCSEC,
        "native_pixel_scale_arcsec": PIXEL_SCALE_ARCSEC,
        "distance_kpc": DISTANCE_KPC,
        "zero_points_ab": {b: ZERO_POINT_AB[b] for b in bands},
        "exposure_s": {b: EXPOSURE_S[b] for b in bands},
        "psf_fwhm_arcsec": {b: PSF_FWHM_ARCSEC[b] for b in bands},
        "units": f"flux per pixel on the AB zero point {FLUX_ZERO_POINT:g} (1 = AB mag {FLUX_ZERO_POINT:g}), sky subtracted",
        "preprocessing": {"scaling": "none (linear flux); the star_clusters task applies asinh(flux / noise)"},
        "simulator": "training.sim.clusters",
        "seed": seed,
    }
