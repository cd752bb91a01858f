"""The galaxy mock universe: SDSS-like cutouts whose light and mass come from BC03 stellar populations.

Each galaxy is a sum of components, each with its own star-formation history (SFH), metallicity and dust:

- bulge: Sersic (n ~ 2-4), old (delayed-tau starting 9-13 Gyr ago), metal rich;
- disc: exponential, in three radial zones blended smoothly (inner, middle, outer) whose SFHs start later and
  last longer outwards (inside-out growth: younger with radius) and whose metallicity falls with radius;
  quenched galaxies have their disc star formation shut down some Gyr ago;
- burst (half the galaxies): a central starburst of 0.03-4 times the central mass, 30-300 Myr long, ended up to
  3 Gyr ago or still going (the ranges of the Kauffmann+03 / Zibetti+09 Monte Carlo libraries), as concentrated
  as the bulge and dustier while young; it is what scatters galaxies about the colour-M/L relation;
- bar (some discs): an elongated Sersic n = 0.5 component with the inner zone's population;
- spiral arms and clumps (star-forming discs): stars formed in the last 200 Myr, in a logarithmic m = 2
  pattern plus a few compact clumps.

Masses are *surviving* stellar masses (BC03's living stars + remnants), so M/L is M*/L as SED fitting
reports it. Luminosities are rest-frame, include the nebular emission of stars younger than 25 Myr, and are
attenuated by a Calzetti curve whose A_V grows with inclination (birth clouds double it for stars younger
than 10 Myr). Distances are drawn uniformly in volume out to where
the galaxy would still pass the SDSS spectroscopic limit r < 17.77; sizes follow size-mass relations.

Observation: fluxes through the observed-frame SDSS filters (K-correction from the redshifted SSP spectra),
rendered on a square field of view of ``FOV_IN_HALF_LIGHT_RADII`` half-light radii, cropped on the centre and
resampled to ``size`` pixels (the workshop's crop-and-resize), a double-Gaussian seeing PSF (FWHM drawn around
1.4"), sky and Poisson noise from SDSS sky brightness and electrons per nanomaggy at the native 0.396"/px,
then the workshop's per-cutout log scaling (``survey_infer.imaging.log_scale``).

The degeneracies are those of real populations: age, metallicity and dust all redden and raise M/L, and
morphology only correlates with them through the mass- and B/T-dependent quenching.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.fft

from survey_infer.imaging import log_scale
from training.sim.ssp import AV_GRID, BANDS, REDSHIFT_GRID, SUN_ABS_MAG_AB, SSPTable, ssp_table

FOV_IN_HALF_LIGHT_RADII = 10.0  # full width of a cutout; survey_infer.stamps cuts real stamps the same way
PIXEL_SCALE_ARCSEC = 0.396
# Dark-sky surface brightness (AB mag/arcsec^2) and photo-electrons per nanomaggy of a 53.9 s SDSS exposure.
SKY_MAG_ARCSEC2 = {"u": 22.1, "g": 21.9, "r": 20.9, "i": 20.2, "z": 18.9}
ELECTRONS_PER_NMGY = {"u": 190.0, "g": 800.0, "r": 900.0, "i": 650.0, "z": 130.0}
SPEC_LIMIT_R = 17.77
D_MIN_MPC, D_MAX_MPC = 30.0, 400.0
H0 = 70.0
C_KMS = 299_792.458
ZONE_CENTRES_RD = np.array([0.6, 1.8, 3.5])  # disc zones, in disc scale lengths
ARM_AGE_YR = 2e8
MAP_NAMES = ("log_mstar", "log_age", "log_z", "log_sfr")  # per pixel: Msun, yr (mass-weighted), Z/Zsun, Msun/yr
# property_maps (issue 5): six maps per galaxy on the image grid, surface densities so that they do not depend on
# the pixel size; NaN marks an empty pixel (below EMPTY_BELOW of its map's quantity, or of the mass it weights)
PROPERTY_MAP_NAMES = ("log_sigma_mstar", "log_z_star", "log_age_mw", "log_sigma_sfr", "log_sigma_gas", "log_z_gas")
PROPERTY_MAP_UNITS = ("dex(solMass / kpc2)", "dex", "dex(yr)", "dex(solMass / (yr kpc2))", "dex(solMass / kpc2)", "dex")
PROPERTY_MAP_DESCRIPTIONS = (
    "stellar surface mass density (surviving mass)", "mass-weighted log10 stellar metallicity Z/Zsun",
    "mass-weighted log10 stellar age", "star-formation-rate surface density (last 100 Myr)",
    "gas surface mass density (star-forming + extended atomic disc)", "log10 gas-phase metallicity Z/Zsun",
)  # fmt: skip
# Empty pixels, like pixels without particles in a simulation: stellar or gas surface density below 0.1 Msun/pc^2,
# SFR density below what the Kennicutt-Schmidt law gives for 0.1 Msun/pc^2 of gas.
EMPTY_SIGMA_MSUN_KPC2 = 1e5
KS_A = 2.5e-4  # Kennicutt (1998): Sigma_SFR [Msun/yr/kpc^2] = KS_A (Sigma_gas / 1 Msun pc^-2)^KS_N
KS_N = 1.4
EMPTY_SIGMA_SFR = KS_A * (EMPTY_SIGMA_MSUN_KPC2 / 1e6) ** KS_N
HI_SATURATION_MSUN_KPC2 = 1e7  # atomic gas saturates at ~10 Msun/pc^2 (Bigiel et al. 2008)
IMAGE_UNITS = ("log_scaled", "nmgy_arcsec2")  # per-cutout [-1, 1] log scaling, or linear surface brightness
BATCH = 256


@dataclass(frozen=True)
class Observing:
    """Observing conditions of the mocks. The defaults are the training mocks'; other values make the shifted
    mocks of ``bench/ood.py`` (another seeing, noise level or distance range than any bundle was trained on).

    seeing_fwhm_arcsec: mean and sd of the seeing FWHM (normal draw) and its clip range.
    noise_scale: multiplies the noise sigma (sky + Poisson) and the sky noise that the log scaling floors at.
    distance_mpc: (low, high): distances uniform in volume in this range (ignoring the spectroscopic limit);
        None: the training draw (uniform in volume from D_MIN_MPC to where r < 17.77, at most D_MAX_MPC).
    """

    seeing_fwhm_arcsec: tuple[float, float] = (1.4, 0.25)
    seeing_clip_arcsec: tuple[float, float] = (0.9, 2.2)
    noise_scale: float = 1.0
    distance_mpc: tuple[float, float] | None = None


TRAINING_OBSERVING = Observing()


@dataclass
class SimulatedCutouts:
    """Images (N, bands, S, S) float32 in [-1, 1]; per-object columns; truth; optional resolved maps."""

    images: np.ndarray
    columns: dict[str, np.ndarray]
    truth: dict[str, np.ndarray]
    maps: np.ndarray | None = None  # (N, len(MAP_NAMES), S, S) float32 in MAP_NAMES order, no PSF, no noise
    property_maps: np.ndarray | None = None  # (N, 6, S, S) float32 in PROPERTY_MAP_NAMES order, NaN = empty


# ----------------------------------------------------------------------------------------- populations
FINE_TIMES_YR = np.concatenate([[0.0], np.geomspace(1e5, 13.5e9, 600)])  # lookback times SFHs are drawn on


def _bin_mass(sfr: np.ndarray, times: np.ndarray, table: SSPTable) -> np.ndarray:
    """Mass formed per coarse age bin, from SFR (N, T) on lookback ``times`` (yr); normalised to 1 per row."""
    ages = table.ages_yr
    edges = np.concatenate([[0.0], np.sqrt(ages[1:] * ages[:-1]), [times[-1]]])
    cumulative = np.concatenate(
        [np.zeros((sfr.shape[0], 1)), np.cumsum(0.5 * (sfr[:, 1:] + sfr[:, :-1]) * np.diff(times), axis=1)], axis=1
    )
    hi = np.clip(np.searchsorted(times, edges), 1, len(times) - 1)
    t = (edges - times[hi - 1]) / (times[hi] - times[hi - 1])
    at_edges = (1 - t) * cumulative[:, hi - 1] + t * cumulative[:, hi]
    mass = np.diff(at_edges, axis=1)
    return mass / np.maximum(mass.sum(axis=1, keepdims=True), 1e-300)


def _delayed_tau(times: np.ndarray, start: np.ndarray, tau: np.ndarray, quench: np.ndarray) -> np.ndarray:
    """SFR(lookback) of a delayed-tau history starting ``start`` yr ago, shut down ``quench`` yr ago (0: never)."""
    since_start = np.clip(start[:, None] - times[None], 0.0, None)
    sfr = since_start * np.exp(-since_start / tau[:, None])
    after_quench = np.clip(quench[:, None] - times[None], 0.0, None)  # > 0 for lookbacks younger than quench
    return sfr * np.exp(-after_quench / 3e8)


def _interp_index(grid: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values = np.clip(values, grid[0], grid[-1])
    low = np.clip(np.searchsorted(grid, values, side="right") - 1, 0, len(grid) - 2)
    return low, (values - grid[low]) / (grid[low + 1] - grid[low])


def _population(table: SSPTable, weights, log_z, av):
    """Surviving mass, rest-frame luminosities (Lsun) and observed absolute fluxes (maggies at 10 pc) per Msun
    formed, the latter at every node of REDSHIFT_GRID (N, redshifts, bands).

    ``weights`` (N, A) mass formed per age bin; ``log_z``, ``av`` (N,). Stars younger than 10 Myr see twice
    the attenuation (birth clouds).
    """
    n, n_age = weights.shape
    iz, tz = _interp_index(table.log_z, log_z)
    av_age = av[:, None] * np.where(table.ages_yr < 1e7, 2.0, 1.0)[None]
    iav, tav = _interp_index(AV_GRID, av_age)
    ages = np.arange(n_age)[None]
    obs_flux = table.obs_flux
    live = np.zeros(n)
    lum = np.zeros((n, len(BANDS)))
    flux = np.zeros((n, len(REDSHIFT_GRID), len(BANDS)))
    for dz, wz in ((0, 1 - tz), (1, tz)):
        zi = (iz + dz)[:, None]
        live += wz * (weights * table.live_frac[zi, ages]).sum(axis=1)
        for da, wa in ((0, 1 - tav), (1, tav)):
            ai = iav + da
            w = (weights * wz[:, None] * wa)[..., None]
            lum += (w * table.lum[zi, ages, ai]).sum(axis=1)
            flux += np.einsum("na,narb->nrb", w[..., 0], obs_flux[zi, ages, ai])
    return live, lum, flux


def _at_redshift(flux_grid: np.ndarray, redshift: np.ndarray) -> np.ndarray:
    """Interpolate (N, redshifts, bands) fluxes to each galaxy's redshift: (N, bands)."""
    low, t = _interp_index(REDSHIFT_GRID, redshift)
    rows = np.arange(len(redshift))
    return (1 - t)[:, None] * flux_grid[rows, low] + t[:, None] * flux_grid[rows, low + 1]


def _mean_log_age(weights: np.ndarray, table: SSPTable) -> np.ndarray:
    return (weights * np.log10(table.ages_yr)[None]).sum(axis=1)


def _draw_galaxies(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Masses, morphologies, SFH, metallicity and dust parameters per galaxy and component."""
    g: dict[str, np.ndarray] = {}
    g["log_mstar"] = np.clip(rng.normal(10.45, 0.5, n), 9.0, 11.8)
    m = g["log_mstar"] - 10.5
    bt = 0.05 + 0.8 / (1 + np.exp(-(m - 0.2) / 0.3)) + rng.normal(0, 0.18, n)
    g["bt"] = np.where(bt < 0.05, 0.0, np.where(bt > 0.92, 1.0, np.clip(bt, 0, 1)))
    p_quench = 1 / (1 + np.exp(-(m - 0.1) / 0.25 - 3.0 * (g["bt"] - 0.5)))
    g["quenched"] = rng.uniform(size=n) < p_quench
    g["t_quench"] = np.where(g["quenched"], 10 ** rng.uniform(np.log10(3e8), np.log10(8e9), n), 0.0)
    g["bulge_start"] = rng.uniform(7e9, 12.5e9, n)
    g["bulge_tau"] = 10 ** rng.uniform(np.log10(3e8), np.log10(1.5e9), n)
    g["disc_start"] = rng.uniform(8e9, 12.5e9, n)
    g["disc_tau"] = 10 ** rng.uniform(np.log10(7e8), np.log10(1.5e10), n)
    # central bursts as in the Monte Carlo libraries of Kauffmann+03 / Zibetti+09: 0.03-4 times the central
    # (bulge + inner disc + bar) mass, 30-300 Myr long, ended in the last 3 Gyr or still going; dusty while young
    g["burst"] = rng.uniform(size=n) < 0.5
    g["burst_age"] = 10 ** rng.uniform(6.0, np.log10(3e9), n)
    g["burst_fraction"] = np.where(g["burst"], 10 ** rng.uniform(np.log10(0.03), np.log10(4.0), n), 0.0)
    g["burst_duration"] = 10 ** rng.uniform(np.log10(3e7), np.log10(3e8), n)
    g["log_z_bulge"] = np.clip(0.05 + 0.2 * m + rng.normal(0, 0.28, n), -1.5, 0.4)
    g["log_z_disc"] = np.clip(-0.15 + 0.3 * m + rng.normal(0, 0.36, n), -1.5, 0.4)
    g["z_gradient"] = rng.normal(-0.08, 0.03, n)  # dex per disc scale length
    g["cos_i"] = rng.uniform(0.05, 1.0, n)
    av0 = np.clip(rng.normal(0.3 + 0.25 * m, 0.2, n), 0.0, None) * np.where(g["quenched"], 0.3, 1.0)
    av0 = av0 * rng.lognormal(0.0, 0.5, n)  # dust content varies at fixed mass
    g["av_disc"] = np.clip(av0 * g["cos_i"] ** -0.4, 0.0, 2.5)
    g["av_bulge"] = np.clip(0.4 * g["av_disc"], 0.0, 3.0)
    g["log_z_burst"] = np.clip(0.5 * (g["log_z_bulge"] + g["log_z_disc"]) + rng.normal(0, 0.2, n), -1.5, 0.4)
    starburst_dust = rng.uniform(0.0, 1.5, n) * np.clip(1.5 - np.log10(g["burst_age"] / 1e7), 0.0, 1.0)
    g["av_burst"] = np.clip(g["av_disc"] + starburst_dust, 0.0, 3.0)
    g["has_bar"] = (g["bt"] < 0.7) & (rng.uniform(size=n) < 0.35)
    g["bar_fraction"] = np.where(g["has_bar"], rng.uniform(0.05, 0.2, n), 0.0)
    star_forming = ~g["quenched"] & (g["bt"] < 1)
    g["arm_fraction"] = np.where(star_forming, rng.uniform(0.3, 0.8, n), 0.0)
    g["arm_pitch"] = np.radians(rng.uniform(12, 30, n))
    g["arm_phase"] = rng.uniform(0, 2 * np.pi, n)
    g["n_clumps"] = np.where(star_forming, rng.integers(0, 7, n), 0)
    return g


@lru_cache(maxsize=1)
def _zone_mass_fractions() -> np.ndarray:
    """Share of an exponential disc's mass in each blended radial zone."""
    x = np.linspace(1e-3, 20, 4000)
    return np.trapezoid(_zone_weights(x) * x * np.exp(-x), x, axis=-1) / np.trapezoid(x * np.exp(-x), x)


def _zone_weights(x: np.ndarray) -> np.ndarray:
    """Smooth partition of unity over the disc zones at radius ``x`` (scale lengths): (zones, ...)."""
    logs = np.log((x[None] + 0.2) / (ZONE_CENTRES_RD.reshape(-1, *[1] * x.ndim) + 0.2))
    w = np.exp(-0.5 * (logs / 0.45) ** 2)
    return w / w.sum(axis=0, keepdims=True)


@dataclass
class _Component:
    mass: np.ndarray  # (N,) surviving stellar mass, Msun
    lum: np.ndarray  # (N, bands) rest-frame Lsun
    flux_grid: np.ndarray  # (N, redshifts, bands) observed-frame absolute maggies (at 10 pc) on REDSHIFT_GRID
    log_age: np.ndarray  # mass-weighted log10 age (yr)
    log_z: np.ndarray
    sfr: np.ndarray  # Msun/yr averaged over 100 Myr
    flux_10pc: np.ndarray | None = None  # (N, bands) at the galaxy's own redshift, set once it is drawn


def _components(g: dict[str, np.ndarray], table: SSPTable) -> dict[str, _Component]:
    """Each component's masses and light, scaled so that the surviving masses add up to M*."""
    n = len(g["log_mstar"])
    times = FINE_TIMES_YR
    mstar = 10 ** g["log_mstar"]
    zone_frac = _zone_mass_fractions()
    recent = table.ages_yr < 1e8

    def build(sfr, log_z, av, surviving_mass):
        weights = _bin_mass(sfr, times, table)
        live, lum, flux = _population(table, weights, log_z, av)
        formed = surviving_mass / np.maximum(live, 1e-12)
        sfr_now = formed * weights[:, recent].sum(axis=1) / 1e8
        return _Component(surviving_mass, lum * formed[:, None], flux * formed[:, None, None],
                          _mean_log_age(weights, table), log_z, sfr_now)  # fmt: skip

    comps = {}
    bulge_sfr = _delayed_tau(times, g["bulge_start"], g["bulge_tau"], np.zeros(n))
    comps["bulge"] = build(bulge_sfr, g["log_z_bulge"], g["av_bulge"], g["bt"] * mstar)
    disc_mass = (1 - g["bt"]) * mstar
    for k, centre in enumerate(ZONE_CENTRES_RD):
        start = g["disc_start"] - 1.5e9 * k
        sfr = _delayed_tau(times, start, g["disc_tau"] * (1 + 0.6 * k), g["t_quench"])
        log_z = g["log_z_disc"] + g["z_gradient"] * (centre - ZONE_CENTRES_RD[0])
        comps[f"disc{k}"] = build(sfr, log_z, g["av_disc"], disc_mass * (1 - g["bar_fraction"]) * zone_frac[k])
        if k == 0:  # the bar holds the inner zone's stars
            comps["bar"] = _rescaled(comps["disc0"], disc_mass * g["bar_fraction"])
    arm_sfr = np.where(times[None] < ARM_AGE_YR, 1.0, 0.0).repeat(n, axis=0)
    disc_sfr_now = sum(comps[f"disc{k}"].sfr for k in range(len(ZONE_CENTRES_RD)))
    arm_mass = g["arm_fraction"] * disc_sfr_now * ARM_AGE_YR * 0.85  # ~85% of 200 Myr of stars survive
    comps["arms"] = build(arm_sfr, g["log_z_disc"], 1.5 * g["av_disc"], arm_mass)
    end, length = g["burst_age"][:, None], g["burst_duration"][:, None]
    burst_sfr = ((times[None] >= end) & (times[None] < end + length)).astype(float)
    central_mass = comps["bulge"].mass + comps["disc0"].mass + comps["bar"].mass
    comps["burst"] = build(burst_sfr, g["log_z_burst"], g["av_burst"], g["burst_fraction"] * central_mass)
    return comps


def _rescaled(comp: _Component, mass: np.ndarray) -> _Component:
    """The same population with a different surviving mass (light and SFR scale with it)."""
    factor = np.where(comp.mass > 0, mass / np.where(comp.mass > 0, comp.mass, 1.0), 0.0)
    return _Component(mass, comp.lum * factor[:, None], comp.flux_grid * factor[:, None, None], comp.log_age,
                      comp.log_z, comp.sfr * factor)  # fmt: skip


# ------------------------------------------------------------------------------------------- rendering
def _sersic_b(n: np.ndarray) -> np.ndarray:
    return 2.0 * n - 1.0 / 3.0 + 4.0 / (405.0 * n)


def _normalise(profile: np.ndarray) -> np.ndarray:
    total = profile.sum(axis=(-2, -1), keepdims=True)
    return np.where(total > 0, profile / np.where(total > 0, total, 1), 0).astype(profile.dtype, copy=False)


def _profiles(g, geom, size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Unit-sum mass profiles (N, S, S) float32 of every component on the cutout grid."""
    n = len(g["log_mstar"])
    f32 = np.float32

    def col(values) -> np.ndarray:
        return np.asarray(values, dtype=f32)[:, None, None]

    coords = (np.arange(size, dtype=f32) - f32((size - 1) / 2.0))[None] * col(geom["pix_kpc"])[:, 0]  # kpc
    x, y = coords[:, None, :], coords[:, :, None]
    cos_pa, sin_pa = col(np.cos(geom["pa"])), col(np.sin(geom["pa"]))
    xr = x * cos_pa + y * sin_pa  # along the major axis
    yr = -x * sin_pa + y * cos_pa
    q = col(geom["q_disc"])
    yq = yr / q  # in-plane minor-axis coordinate
    r_disc = np.sqrt(xr**2 + yq**2) / col(geom["rd_kpc"])  # in-plane radius / R_d
    disc = np.exp(-r_disc)
    out = {}
    lookup = np.minimum((r_disc * f32(1 / ZONE_LOOKUP_STEP)).astype(np.int32), len(ZONE_LOOKUP_X) - 1)
    for k, weight in enumerate(_zone_weight_lookup()):
        out[f"disc{k}"] = _normalise(disc * weight[lookup])
    soft2 = col((0.3 * geom["pix_kpc"]) ** 2)
    r_bulge = np.sqrt(xr**2 + (yr / col(geom["q_bulge"])) ** 2 + soft2) / col(geom["re_kpc"])
    nb = col(geom["sersic_n"])
    out["bulge"] = _normalise(np.exp(-col(_sersic_b(geom["sersic_n"])) * (np.exp(np.log(r_bulge) / nb) - 1)))
    out["burst"] = out["bulge"]  # nuclear starbursts: as concentrated as the bulge
    cos_b, sin_b = col(np.cos(g["bar_angle"])), col(np.sin(g["bar_angle"]))
    bx, by = xr * cos_b + yq * sin_b, -xr * sin_b + yq * cos_b
    r_bar2 = (bx**2 + (by / f32(0.3)) ** 2 + soft2) / col(geom["bar_len_kpc"] ** 2)
    out["bar"] = _normalise(np.exp(-f32(_sersic_b(0.5)) * (r_bar2 - 1)))
    theta = np.arctan2(yq, xr)
    winding = np.log(np.maximum(r_disc, f32(1e-3))) / col(np.tan(g["arm_pitch"]))
    arms = disc * (f32(0.5) + f32(0.5) * np.cos(2 * (theta - winding) + col(g["arm_phase"]))) ** 3
    out["arms"] = _normalise(f32(0.8) * _normalise(arms) + _clumps(g, geom, xr, yr, rng))
    return out


def _clumps(g, geom, xr: np.ndarray, yr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A few compact star-forming clumps (Gaussian, >= 0.25 kpc) scattered over the disc, 15% of arm light each."""
    n = len(g["log_mstar"])
    clumps = np.zeros_like(xr)
    for c in range(int(g["n_clumps"].max(initial=0))):
        present = g["n_clumps"] > c
        radius = rng.gamma(2.0, 1.0, n) * geom["rd_kpc"]
        angle = rng.uniform(0, 2 * np.pi, n)
        brightness = rng.uniform(0.3, 1.0, n)
        idx = np.flatnonzero(present)
        cx = (radius * np.cos(angle))[idx, None, None].astype(np.float32)
        cy = (radius * np.sin(angle) * geom["q_disc"])[idx, None, None].astype(np.float32)
        width2 = (np.maximum(0.25, 0.6 * geom["pix_kpc"]) ** 2)[idx, None, None].astype(np.float32)
        blob = np.exp(-0.5 * ((xr[idx] - cx) ** 2 + (yr[idx] - cy) ** 2) / width2)
        clumps[idx] += np.float32(0.15) * _normalise(blob) * brightness[idx, None, None].astype(np.float32)
    return clumps


ZONE_LOOKUP_STEP = 0.01
ZONE_LOOKUP_X = np.arange(0.0, 60.0, ZONE_LOOKUP_STEP)


@lru_cache(maxsize=1)
def _zone_weight_lookup() -> np.ndarray:
    return _zone_weights(ZONE_LOOKUP_X).astype(np.float32)


def _convolve_psf(images: np.ndarray, fwhm_pix: np.ndarray) -> np.ndarray:
    """Double-Gaussian seeing (core + 10% wing at twice the width), by FFT on a zero-padded grid."""
    size = images.shape[-1]
    pad = scipy.fft.next_fast_len(size + int(min(size, np.ceil(3 * fwhm_pix.max()))), real=True)
    k2 = (np.fft.fftfreq(pad)[:, None] ** 2 + np.fft.rfftfreq(pad)[None, :] ** 2).astype(np.float32)
    sigma2 = ((fwhm_pix / 2.3548) ** 2)[:, None, None, None].astype(np.float32)
    factor = np.float32(-2 * np.pi**2)
    otf = np.float32(0.9) * np.exp(factor * sigma2 * k2) + np.float32(0.1) * np.exp(factor * 4 * sigma2 * k2)
    spectrum = scipy.fft.rfft2(images.astype(np.float32), s=(pad, pad)) * otf
    return scipy.fft.irfft2(spectrum, s=(pad, pad))[..., :size, :size]


def _geometry(g, comps, rng: np.random.Generator, size: int, observing: Observing = TRAINING_OBSERVING) -> dict[str, np.ndarray]:
    """Sizes (kpc), shapes, distance, redshift-free pixel scale, seeing."""
    n = len(g["log_mstar"])
    m = g["log_mstar"] - 10.5
    geom: dict[str, np.ndarray] = {}
    r50_disc = 10 ** (0.62 + 0.18 * m + rng.normal(0, 0.15, n))  # kpc, late-type size-mass (Shen+03 like)
    geom["rd_kpc"] = r50_disc / 1.678
    bulge_mass = np.log10(np.maximum(g["bt"], 1e-3)) + g["log_mstar"]
    re = 10 ** (0.45 + 0.56 * (bulge_mass - 11.0) + rng.normal(0, 0.12, n))  # early-type relation
    geom["re_kpc"] = np.where(g["bt"] < 0.9, np.minimum(re, 0.5 * r50_disc), re)
    geom["sersic_n"] = np.clip(2.0 + 2.0 * np.sqrt(g["bt"]) + rng.normal(0, 0.3, n), 1.5, 4.5)
    geom["q_bulge"] = rng.uniform(0.6, 1.0, n)
    geom["q_disc"] = np.sqrt(g["cos_i"] ** 2 + 0.15**2 * (1 - g["cos_i"] ** 2))
    geom["pa"] = rng.uniform(0, np.pi, n)
    g["bar_angle"] = rng.uniform(0, np.pi, n)
    geom["bar_len_kpc"] = rng.uniform(0.8, 1.5, n) * geom["rd_kpc"]
    lum_g = sum(c.lum[:, 1] for c in comps.values())
    lum_bulge = comps["bulge"].lum[:, 1] + comps["burst"].lum[:, 1]
    geom["size_kpc"] = (lum_bulge * geom["re_kpc"] + (lum_g - lum_bulge) * r50_disc) / lum_g
    geom["fov_kpc"] = FOV_IN_HALF_LIGHT_RADII * geom["size_kpc"]
    geom["pix_kpc"] = geom["fov_kpc"] / size
    geom["psf_fwhm_arcsec"] = np.clip(rng.normal(*observing.seeing_fwhm_arcsec, n), *observing.seeing_clip_arcsec)
    return geom


def _distances(rng: np.random.Generator, abs_mag_r: np.ndarray, observing: Observing = TRAINING_OBSERVING) -> np.ndarray:
    """Luminosity distances (Mpc), uniform in volume up to where r < 17.77 still holds."""
    if observing.distance_mpc is not None:
        low, high = observing.distance_mpc
        u = rng.uniform(size=len(abs_mag_r))
        return (low**3 + u * (high**3 - low**3)) ** (1 / 3)
    d_limit = 10 ** ((SPEC_LIMIT_R - abs_mag_r) / 5 + 1) / 1e6
    d_hi = np.clip(d_limit, D_MIN_MPC * 1.01, D_MAX_MPC)
    u = rng.uniform(size=len(abs_mag_r))
    return (D_MIN_MPC**3 + u * (d_hi**3 - D_MIN_MPC**3)) ** (1 / 3)


def _simulate_batch(rng, n, size, bands, with_maps, table, observing: Observing = TRAINING_OBSERVING,
                    gas_rng: np.random.Generator | None = None, image_units: str = "log_scaled"):
    g = _draw_galaxies(rng, n)
    comps = _components(g, table)
    # the spectroscopic limit uses rest-frame r-band magnitudes (the K-correction at z < 0.1 is small)
    abs_r = 4.65 - 2.5 * np.log10(sum(c.lum[:, 2] for c in comps.values()))
    distance = _distances(rng, abs_r, observing)
    redshift = H0 * distance / C_KMS
    for comp in comps.values():
        comp.flux_10pc = _at_redshift(comp.flux_grid, redshift)
    geom = _geometry(g, comps, rng, size, observing)
    profiles = _profiles(g, geom, size, rng)
    pix_arcsec = geom["pix_kpc"] / distance * 206.265
    band_index = [BANDS.index(b) for b in bands]
    distance_modulus_flux = (10.0 / (distance * 1e6)) ** 2 * 1e9  # absolute maggies -> nanomaggies
    light = np.zeros((n, len(bands), size, size), dtype=np.float32)
    for name, comp in comps.items():
        light += (comp.flux_10pc[:, band_index] * distance_modulus_flux[:, None]).astype(np.float32)[..., None, None] * profiles[name][:, None]
    seeing = _convolve_psf(light, geom["psf_fwhm_arcsec"] / pix_arcsec)
    images = np.empty((n, len(bands), size, size), dtype=np.float32)
    native_per_pixel = np.minimum((pix_arcsec / PIXEL_SCALE_ARCSEC) ** 2, 1.0)
    for j, band in enumerate(bands):
        sky = 10 ** (-0.4 * (SKY_MAG_ARCSEC2[band] - 22.5)) * pix_arcsec**2  # nmgy per output pixel
        variance = (sky[:, None, None] + np.clip(seeing[:, j], 0, None)) / ELECTRONS_PER_NMGY[band]
        variance = variance * native_per_pixel[:, None, None] * observing.noise_scale**2
        noisy = seeing[:, j] + rng.standard_normal(seeing[:, j].shape) * np.sqrt(variance)
        sky_sigma = np.sqrt(sky / ELECTRONS_PER_NMGY[band] * native_per_pixel) * observing.noise_scale
        if image_units == "nmgy_arcsec2":  # linear surface brightness: the same draws, another scaling
            images[:, j] = noisy / (pix_arcsec**2)[:, None, None]
        else:
            images[:, j] = log_scale(noisy, sky_sigma)
    truth = _truth(g, comps, geom, distance, redshift)
    maps = _maps(comps, profiles) if with_maps else None
    if gas_rng is not None:  # its own generator: the galaxies, images and truth above do not change
        pmaps, gas_truth = _property_maps(g, comps, profiles, geom, gas_rng)
        truth.update(gas_truth, pix_arcsec=pix_arcsec)
        maps = (maps, pmaps)
    return images, geom, distance, truth, maps


def _truth(g, comps, geom, distance, redshift) -> dict[str, np.ndarray]:
    mass = sum(c.mass for c in comps.values())
    lum = sum(c.lum for c in comps.values())
    truth = {f"ml_{b}": mass / lum[:, k] for k, b in enumerate(BANDS)}
    abs_mag = {b: SUN_ABS_MAG_AB[k] - 2.5 * np.log10(lum[:, k]) for k, b in enumerate(BANDS)}
    flux = sum(c.flux_10pc for c in comps.values())
    app = -2.5 * np.log10(flux) + 5 * np.log10(distance * 1e5)[:, None]
    truth.update(
        log_mstar=np.log10(mass), lum_g=lum[:, 1], g_i=abs_mag["g"] - abs_mag["i"], g_r=abs_mag["g"] - abs_mag["r"],
        u_r=abs_mag["u"] - abs_mag["r"], **{f"mag_{b}": app[:, k] for k, b in enumerate(BANDS)},
        sfr=sum(c.sfr for c in comps.values()), redshift=redshift, distance_mpc=distance,
        log_age_mw=sum(c.mass * c.log_age for c in comps.values()) / mass,
        log_z_mw=sum(c.mass * c.log_z for c in comps.values()) / mass,
        bt_mass=g["bt"], bt_light_g=comps["bulge"].lum[:, 1] / lum[:, 1], quenched=g["quenched"],
        cos_i=g["cos_i"], av_disc=g["av_disc"], has_bar=g["has_bar"], n_clumps=g["n_clumps"].astype(np.int32),
        sersic_n=geom["sersic_n"], re_bulge_kpc=geom["re_kpc"], rd_disc_kpc=geom["rd_kpc"],
        size_kpc=geom["size_kpc"], psf_fwhm_arcsec=geom["psf_fwhm_arcsec"],
        log_z_bulge=g["log_z_bulge"], log_z_disc=g["log_z_disc"], t_quench_yr=g["t_quench"],
        burst_fraction=g["burst_fraction"], arm_mass=comps["arms"].mass,
    )  # fmt: skip
    return truth


def _maps(comps, profiles) -> np.ndarray:
    mass = sum(c.mass[:, None, None] * profiles[k] for k, c in comps.items())
    age = sum(c.mass[:, None, None] * c.log_age[:, None, None] * profiles[k] for k, c in comps.items())
    metal = sum(c.mass[:, None, None] * c.log_z[:, None, None] * profiles[k] for k, c in comps.items())
    sfr = sum(c.sfr[:, None, None] * profiles[k] for k, c in comps.items())
    safe = np.maximum(mass, 1e-30)
    with np.errstate(divide="ignore"):
        stack = [np.log10(safe), age / safe, metal / safe, np.log10(np.maximum(sfr, 1e-30))]
    return np.stack(stack, axis=1).astype(np.float32)


def _disc_radius(geom, size: int, scale_kpc: np.ndarray) -> np.ndarray:
    """In-plane radius of every pixel (N, S, S) in units of ``scale_kpc`` (N,), for the disc's inclination."""
    f32 = np.float32
    coords = (np.arange(size, dtype=f32) - f32((size - 1) / 2.0))[None] * geom["pix_kpc"][:, None].astype(f32)
    x, y = coords[:, None, :], coords[:, :, None]
    cos_pa = np.cos(geom["pa"]).astype(f32)[:, None, None]
    sin_pa = np.sin(geom["pa"]).astype(f32)[:, None, None]
    xr, yr = x * cos_pa + y * sin_pa, -x * sin_pa + y * cos_pa
    yq = yr / geom["q_disc"].astype(f32)[:, None, None]
    return np.sqrt(xr**2 + yq**2) / scale_kpc.astype(f32)[:, None, None]


def _property_maps(g, comps, profiles, geom, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The six maps of PROPERTY_MAP_NAMES (N, 6, S, S) float32 (NaN = empty pixel) and per-galaxy gas truth.

    Stars: every component's surviving mass, mass-weighted log age and log Z and its SFR (last 100 Myr) spread
    on its own unit-sum profile: the same populations and profiles whose light makes the images.
    Gas = star-forming gas + an extended atomic disc:
    - star-forming gas is the Kennicutt (1998) law inverted on the stars' SFR map,
      Sigma_sf = (Sigma_SFR / KS_A)^(1/KS_N) Msun/pc^2, so that Sigma_SFR = KS_A Sigma_sf^KS_N holds in every
      pixel and the SFR map is the young stars' (arms, clumps, bursts included);
    - the atomic disc is exponential with the stellar disc's inclination and position angle, scale length
      1.5-3 R_d, mass from a gas-fraction scaling, log(M_HI/M*) = -0.3 - 0.5 (log M* - 10) +- 0.3 dex (x0.1
      for quenched galaxies, x0.02 without a disc), saturating at 10 Msun/pc^2; it forms no stars (below the
      star-formation threshold, as outer HI discs do).
    Gas metallicity: log Z/Zsun = (the disc's stellar log Z) + 0.15 + gradient x (r/R_d - 0.6), the gradient
    the stellar disc's plus N(-0.03, 0.02) dex per R_d (gas is younger and more enriched than its stars).
    """
    n, size = len(g["log_mstar"]), profiles["bulge"].shape[-1]
    area = (geom["pix_kpc"] ** 2)[:, None, None]  # kpc^2 per pixel
    mass = sum(c.mass[:, None, None] * profiles[k] for k, c in comps.items())
    age = sum(c.mass[:, None, None] * c.log_age[:, None, None] * profiles[k] for k, c in comps.items())
    metal = sum(c.mass[:, None, None] * c.log_z[:, None, None] * profiles[k] for k, c in comps.items())
    sigma_sfr = sum(c.sfr[:, None, None] * profiles[k] for k, c in comps.items()) / area
    sigma_mstar = mass / area
    sigma_sf_gas = 1e6 * (np.maximum(sigma_sfr, 0.0) / KS_A) ** (1.0 / KS_N)  # Msun/kpc^2
    frac = -0.3 - 0.5 * (g["log_mstar"] - 10.0) + rng.normal(0.0, 0.3, n)
    frac = frac + np.where(g["quenched"], -1.0, 0.0) + np.where(g["bt"] >= 1.0, -1.7, 0.0)
    m_hi = 10 ** (g["log_mstar"] + frac)
    r_gas = geom["rd_kpc"] * rng.uniform(1.5, 3.0, n)
    face_on = (m_hi / (2 * np.pi * r_gas**2))[:, None, None]
    raw = face_on / geom["q_disc"][:, None, None] * np.exp(-_disc_radius(geom, size, r_gas))
    sigma_hi = HI_SATURATION_MSUN_KPC2 * -np.expm1(-raw / HI_SATURATION_MSUN_KPC2)
    sigma_gas = sigma_sf_gas + sigma_hi
    gradient = g["z_gradient"] + rng.normal(-0.03, 0.02, n)
    r_disc = _disc_radius(geom, size, geom["rd_kpc"])
    z_gas = np.clip(g["log_z_disc"][:, None, None] + 0.15 + gradient[:, None, None] * (r_disc - ZONE_CENTRES_RD[0]),
                    -2.0, 0.7)  # fmt: skip
    stars = sigma_mstar >= EMPTY_SIGMA_MSUN_KPC2
    gas = sigma_gas >= EMPTY_SIGMA_MSUN_KPC2
    sfr = sigma_sfr >= EMPTY_SIGMA_SFR
    safe = np.maximum(mass, 1e-30)
    with np.errstate(divide="ignore", invalid="ignore"):
        stack = [
            np.where(stars, np.log10(np.maximum(sigma_mstar, 1e-30)), np.nan), np.where(stars, metal / safe, np.nan),
            np.where(stars, age / safe, np.nan), np.where(sfr, np.log10(np.maximum(sigma_sfr, 1e-30)), np.nan),
            np.where(gas, np.log10(np.maximum(sigma_gas, 1e-30)), np.nan), np.where(gas, z_gas, np.nan),
        ]  # fmt: skip
    in_fov = area[:, 0, 0]
    truth = {
        "log_mgas_fov": np.log10(np.maximum((sigma_gas.sum(axis=(1, 2))) * in_fov, 1e-30)),
        "log_mstar_fov": np.log10((sigma_mstar.sum(axis=(1, 2))) * in_fov),
        "log_sfr_fov": np.log10(np.maximum(sigma_sfr.sum(axis=(1, 2)) * in_fov, 1e-30)),
        "log_mhi_disc": np.log10(m_hi), "r_gas_kpc": r_gas, "z_gas_gradient": gradient, "pix_kpc": geom["pix_kpc"],
    }  # fmt: skip
    return np.stack(stack, axis=1).astype(np.float32), truth


def simulate(
    n: int, size: int = 69, seed: int = 0, first_id: int = 0, bands: tuple[str, ...] = ("g",), maps: bool = False,
    observing: Observing = TRAINING_OBSERVING, property_maps: bool = False, image_units: str = "log_scaled",
) -> SimulatedCutouts:
    """Simulate ``n`` galaxies as ``size``-pixel cutouts in ``bands`` with their truth (and maps if asked);
    ``observing`` changes the observing conditions (default: the training mocks').

    ``property_maps``: also the six maps of PROPERTY_MAP_NAMES (stars and gas, see `_property_maps`), drawn
    from a second generator so that images and truth are those of the same seed without them.
    ``image_units``: "log_scaled" (the workshop's per-cutout scaling) or "nmgy_arcsec2" (linear surface
    brightness in nanomaggies per arcsec^2, sky subtracted, with its noise: what property_maps reads).
    """
    unknown = set(bands) - set(BANDS)
    if unknown:
        raise ValueError(f"bands must be among {BANDS}; got {sorted(unknown)}")
    if image_units not in IMAGE_UNITS:
        raise ValueError(f"image_units must be one of {IMAGE_UNITS}; got {image_units!r}")
    rng = np.random.default_rng(seed)
    gas_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 5])) if property_maps else None
    table = ssp_table()
    images, truths, map_parts, pmap_parts, geoms, distances = [], [], [], [], [], []
    for start in range(0, n, BATCH):
        count = min(BATCH, n - start)
        img, geom, distance, truth, mp = _simulate_batch(rng, count, size, tuple(bands), maps, table, observing,
                                                         gas_rng=gas_rng, image_units=image_units)  # fmt: skip
        if property_maps:
            mp, pm = mp
            pmap_parts.append(pm)
        images.append(img), truths.append(truth), geoms.append(geom), distances.append(distance)
        if maps:
            map_parts.append(mp)
    truth = {k: np.concatenate([t[k] for t in truths]) for k in truths[0]}
    ids = np.arange(first_id, first_id + n, dtype=np.int64)
    columns = {
        "object_id": ids,
        "ra": rng.uniform(150.0, 160.0, n),
        "dec": np.degrees(np.arcsin(rng.uniform(0.0, np.sin(np.radians(10.0)), n))),
        "distance_mpc": truth["distance_mpc"],
        "lum_g": truth["lum_g"],
        "size_kpc": truth["size_kpc"],
    }
    return SimulatedCutouts(
        images=np.concatenate(images), columns=columns, truth={"object_id": ids, **truth},
        maps=np.concatenate(map_parts) if maps else None,
        property_maps=np.concatenate(pmap_parts) if property_maps else None,
    )  # fmt: skip
