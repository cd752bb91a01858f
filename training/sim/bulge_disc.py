"""A first galaxy simulator: bulge + disc light profiles, PSF, sky noise, and an M/L set by the populations.

Each galaxy has a stellar mass, a bulge-to-total light ratio that rises with mass, an old bulge population
(high M/L_g) and a disc whose M/L_g depends on whether it still forms stars, on metallicity and on dust
(which grows with inclination). The total M/L_g is the light-weighted mix, so morphology (B/T, concentration,
inclination) carries real but incomplete information on M/L: age, metallicity and dust scatter it at fixed
morphology, which is the degeneracy that limits the workshop's CNN. Images are rendered on a field of view
that scales with the galaxy's half-light radius (the workshop's cutouts are cropped on the galaxy and
resized), convolved with a seeing PSF, given sky and source noise, then log-scaled to [-1, 1] per image.

The issue "Galaxy mock universe" replaces the population recipe with real stellar population synthesis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

SUN_ABS_MAG_G = 5.11  # AB absolute magnitude of the Sun in SDSS g
ZERO_POINT = 28.0  # mag giving one count in the exposure
SKY_MAG_ARCSEC2 = 22.0  # g-band dark sky
SEEING_FWHM_ARCSEC = 1.4
FOV_IN_HALF_LIGHT_RADII = 9.0


@dataclass
class SimulatedCutouts:
    """Images (N, 1, S, S) float32 in [-1, 1]; per-object columns; truth columns (not given to models)."""

    images: np.ndarray
    columns: dict[str, np.ndarray]
    truth: dict[str, np.ndarray]


def _sersic_b(n: float) -> float:
    return 2.0 * n - 1.0 / 3.0 + 4.0 / (405.0 * n)


def _sersic_image(size: int, r_e_pix: float, n: float, q: float, theta: float) -> np.ndarray:
    """A unit-flux Sersic profile centred in a size x size grid."""
    coords = np.arange(size) - (size - 1) / 2.0
    y, x = np.meshgrid(coords, coords, indexing="ij")
    xr = x * np.cos(theta) + y * np.sin(theta)
    yr = -x * np.sin(theta) + y * np.cos(theta)
    r = np.sqrt(xr**2 + (yr / q) ** 2)
    image = np.exp(-_sersic_b(n) * ((r / r_e_pix) ** (1.0 / n) - 1.0))
    return image / image.sum()


def _populations(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Masses, morphologies and stellar-population M/L per galaxy."""
    log_mstar = np.clip(rng.normal(10.3, 0.55, n), 9.0, 11.8)
    bt = np.clip(0.75 / (1 + np.exp(-(log_mstar - 10.6) / 0.3)) + rng.normal(0, 0.15, n), 0.0, 1.0)
    p_quenched = 1 / (1 + np.exp(-((log_mstar - 10.5) / 0.3 + 3.0 * (bt - 0.4))))
    quenched = rng.uniform(size=n) < p_quenched
    cos_i = rng.uniform(0.1, 1.0, n)
    metallicity = 0.3 * (log_mstar - 10.5) + rng.normal(0, 0.15, n)  # log Z/Zsun
    log_ml_bulge = 0.42 + 0.25 * metallicity + rng.normal(0, 0.06, n)
    log_ml_disc = np.where(quenched, 0.25, -0.2) + 0.2 * metallicity + rng.normal(0, 0.12, n)
    dust = 0.25 * (1 - cos_i) * (1 - bt) * ~quenched  # dex of extra M/L from attenuation
    log_ml_disc = log_ml_disc + dust
    ml_g = bt * 10**log_ml_bulge + (1 - bt) * 10**log_ml_disc
    ml_g = np.clip(ml_g, 0.05, 6.0)
    # g - i from the populations through a Bell & de Jong-like relation with its own scatter
    g_i = (np.log10(ml_g) + 0.379) / 0.914 + rng.normal(0, 0.06, n)
    return {"log_mstar": log_mstar, "bt": bt, "quenched": quenched, "cos_i": cos_i,
            "metallicity": metallicity, "ml_g": ml_g, "g_i": g_i}  # fmt: skip


def simulate(n: int, size: int = 69, seed: int = 0, first_id: int = 0) -> SimulatedCutouts:
    """Simulate ``n`` g-band galaxy cutouts of ``size`` x ``size`` pixels with their truth."""
    rng = np.random.default_rng(seed)
    pops = _populations(rng, n)
    lum_g = 10 ** pops["log_mstar"] / pops["ml_g"]
    distance_mpc = (rng.uniform(40.0**3, 300.0**3, n)) ** (1 / 3)
    r_disc_kpc = 10 ** (0.55 + 0.22 * (pops["log_mstar"] - 10.0) + rng.normal(0, 0.15, n))
    r_bulge_kpc = r_disc_kpc * np.clip(rng.normal(0.35, 0.08, n), 0.12, 0.7)
    size_kpc = pops["bt"] * r_bulge_kpc + (1 - pops["bt"]) * r_disc_kpc  # light-weighted half-light radius
    kpc_per_arcsec = distance_mpc * 1e3 * np.pi / (180 * 3600)
    size_arcsec = size_kpc / kpc_per_arcsec
    arcsec_per_pix = FOV_IN_HALF_LIGHT_RADII * 2 * size_arcsec / size
    app_mag = SUN_ABS_MAG_G - 2.5 * np.log10(lum_g) + 5 * np.log10(distance_mpc * 1e5)
    total_counts = 10 ** (-0.4 * (app_mag - ZERO_POINT))
    sky_counts = 10 ** (-0.4 * (SKY_MAG_ARCSEC2 - ZERO_POINT)) * arcsec_per_pix**2

    images = np.empty((n, 1, size, size), dtype=np.float32)
    theta = rng.uniform(0, np.pi, n)
    q_bulge = rng.uniform(0.65, 1.0, n)
    for i in range(n):
        scale = size / (2 * FOV_IN_HALF_LIGHT_RADII * size_kpc[i])  # pixels per kpc
        disc = _sersic_image(size, r_disc_kpc[i] * scale, 1.0, max(pops["cos_i"][i], 0.12), theta[i])
        bulge = _sersic_image(size, r_bulge_kpc[i] * scale, 4.0, q_bulge[i], theta[i])
        light = total_counts[i] * (pops["bt"][i] * bulge + (1 - pops["bt"][i]) * disc)
        light = gaussian_filter(light, SEEING_FWHM_ARCSEC / 2.355 / arcsec_per_pix[i], mode="constant")
        noisy = light + rng.normal(size=light.shape) * np.sqrt(sky_counts[i] + np.clip(light, 0, None))
        images[i, 0] = _log_scale(noisy, np.sqrt(sky_counts[i]))

    columns = {
        "object_id": np.arange(first_id, first_id + n, dtype=np.int64),
        "ra": rng.uniform(150.0, 160.0, n),
        "dec": np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(0.0)), np.sin(np.radians(10.0)), n))),
        "distance_mpc": distance_mpc,
        "lum_g": lum_g,
        "size_kpc": size_kpc,
    }
    truth = {"object_id": columns["object_id"], "ml_g": pops["ml_g"], "log_mstar": pops["log_mstar"],
             "g_i": pops["g_i"], "bt": pops["bt"], "quenched": pops["quenched"], "cos_i": pops["cos_i"]}  # fmt: skip
    return SimulatedCutouts(images=images, columns=columns, truth=truth)


def _log_scale(image: np.ndarray, noise_sigma: float) -> np.ndarray:
    """log10 of the image floored at half the sky noise, mapped to [-1, 1] per image."""
    logged = np.log10(np.clip(image, 0.5 * noise_sigma, None))
    low, high = logged.min(), logged.max()
    return (2.0 * (logged - low) / max(high - low, 1e-12) - 1.0).astype(np.float32)
