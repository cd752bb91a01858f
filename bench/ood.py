"""Does the trust score work? AUROC of ood_score per shift, error vs score, and the coverage of the errors.

    python bench/ood.py [--task mass_to_light,star_clusters,mass_profiles] [--n 2000] [--n-shift 500]
                        [--engine onnxruntime] [--append] [--samples 500] [--kinematics-grid-cache PICKLE]

For each task's default shipped bundle (or ``--bundle``), through the run's path (task.prepare -> engine.run ->
task.postprocess, the bundle's trust description as a unit applies it):

- in-distribution: ``--n`` held-out mocks at the benches' reserved test seed (``EVAL_SEEDS['test']``: never
  trained on, not used by the trust fit, which has its own seeds);
- shifted inputs, ``--n-shift`` each: pure noise, blank sky (noise only), a single star (a point source through
  the PSF), and subtler ones made by the task's own simulator with other settings (seeing/PSF, noise level,
  distance range or field crowding) that keep their truth; for mass_to_light also real SDSS g-band stamps of
  the bright sources in ../shared/realdata/images_sdss_astropydata (skipped if absent; nothing is copied);
- per shift: AUROC of ood_score (in-distribution = 0, shifted = 1; sklearn.metrics.roc_auc_score) and the
  fraction flagged ``ood`` at the bundle's threshold (0.99 quantile of its held-out mocks: ~1% of
  in-distribution rows are flagged by construction);
- error vs score: RMSE of each output against truth in bins of ood_score, over the in-distribution and the
  subtly shifted mocks together;
- coverage of the +-1 err (68.27%) and +-1.96 err (95%) intervals on the in-distribution mocks, with the
  bundle's recalibrated scale and with the scale it had before (``trust.recalibration.previous_scale``).

mass_profiles (kinematics; ``bench_mass_profiles``): in-distribution = ``--n`` galaxies of the bundle's training DF
grid at its reserved test seed (``training.train_mass_profiles.EVAL_SEEDS['test']``; the trust fit used 932001-2);
shifts (seeds 942000+): velocities of pure noise (the measurement errors alone), noise positions (uniform in a
disc), rotating discs, flat-topped velocities (uniform with the same dispersion: the tracer keeps its positions and
dispersion, only the shape of its velocity distribution changes, which the training DFs' own kurtosis range and
the sampling noise of 20-2000 stars blur, so it is listed as subtle), a hotter and a colder tracer, far fewer
stars, a larger tracer (the inputs are scale-free: a control), velocity errors x5, and a Hernquist tracer (DFs
outside the training grid); error vs score as M_pred/M_true of the posterior median; the per-radius coverage of
the posterior's 68% and 95% intervals (``--samples`` flow samples) and TARP.

The score sees the network's features and, where the bundle names them, the task's input statistics
(``Task.input_statistics``: mass_to_light measures how concentrated the light is for the cutout's framing;
mass_profiles the stars' kurtosis, rotation and profile), which is what separates a star framed by its own size
and a rotating disc from the training mocks.

Writes bench/results/ood.txt (the printed tables; --out to change, --append to add to it), ood_<task>.png beside it
(histograms of the score per shift), and prints the exact command.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from survey_infer.bundle import Bundle, default_bundle_path, load_bundle
from survey_infer.engines import make_engine
from survey_infer.engines.base import INT8_ONNX_FILE
from survey_infer.flags import NO_ESTIMATE
from survey_infer.tasks import get_task
from survey_infer.trust import TRUST_KEY, load_trust
from training.trust import STATISTICS_KEY, Z_68, Z_95, coverage, run_rows, simulate_in_distribution

RESULTS = Path(__file__).resolve().parent / "results" / "ood.txt"
SDSS_G = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "images_sdss_astropydata" / "reprojected_sdss_g.fits.bz2"
SHIFT_SEED = 940_000  # + k per shift: none of these is a training, validation, evaluation or trust seed


class Report:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


# ----------------------------------------------------------------------------------------- mass_to_light shifts
def _log_scaled(raw: np.ndarray) -> np.ndarray:
    from survey_infer.imaging import log_scale

    return log_scale(raw, np.ones(len(raw)))[:, None].astype(np.float32)


def _psf_image(size: int, fwhm_px: np.ndarray) -> np.ndarray:
    """The mocks' double-Gaussian seeing (core + 10% at twice the width), unit flux, centred, (n, size, size)."""
    yy, xx = np.indices((size, size)) - (size - 1) / 2
    r2 = (xx**2 + yy**2)[None]
    s2 = ((fwhm_px / 2.3548) ** 2)[:, None, None]
    psf = 0.9 * np.exp(-0.5 * r2 / s2) / (2 * np.pi * s2) + 0.1 * np.exp(-0.5 * r2 / (4 * s2)) / (8 * np.pi * s2)
    return psf


def mass_to_light_shifts(bundle: Bundle, n: int, rng: np.random.Generator) -> list[tuple[str, dict]]:
    """(label, sample) per shift; a sample holds images, columns and (for the simulated ones) truth."""
    from survey_infer.stamps import FOV_IN_HALF_LIGHT_RADII

    size = int(bundle.input_spec["image"]["shape"][-1])
    shifts = [
        ("noise: uniform random pixels in [-1, 1]", {"images": rng.uniform(-1, 1, (n, 1, size, size)).astype(np.float32)}),
        ("blank sky: Gaussian sky noise, no source (log-scaled)", {"images": _log_scaled(rng.normal(0, 1, (n, size, size)))}),
    ]
    # A star framed like a galaxy: its measured half-light radius is the PSF's (~FWHM/2), and the cutout is
    # FOV_IN_HALF_LIGHT_RADII of those across; peak S/N 10-1000 over unit sky noise.
    fwhm = np.full(n, 2 * size / FOV_IN_HALF_LIGHT_RADII) * rng.uniform(0.8, 1.2, n)
    psf = _psf_image(size, fwhm)
    peak_snr = 10 ** rng.uniform(1, 3, n)
    stars = psf / psf.max(axis=(1, 2), keepdims=True) * peak_snr[:, None, None] + rng.normal(0, 1, (n, size, size))
    shifts.append(("star framed by its own size (FOV = 10 x PSF half-width)", {"images": _log_scaled(stars)}))
    # A star in a frame sized for a galaxy (a catalogue size that is not the star's, a fixed-scale cutout):
    # a point source of FWHM 2-4 px.
    psf = _psf_image(size, rng.uniform(2.0, 4.0, n))
    stars = psf / psf.max(axis=(1, 2), keepdims=True) * peak_snr[:, None, None] + rng.normal(0, 1, (n, size, size))
    shifts.append(("star in a galaxy-sized frame (FWHM 2-4 px)", {"images": _log_scaled(stars)}))
    for k, (label, observing) in enumerate([
        ("seeing 2.6\" +- 0.3 (training 1.4\" +- 0.25)", {"seeing_fwhm_arcsec": (2.6, 0.3), "seeing_clip_arcsec": (2.0, 3.5)}),
        ("noise x3 (sky and Poisson sigma)", {"noise_scale": 3.0}),
        ("noise x1.5 (sky and Poisson sigma)", {"noise_scale": 1.5}),
        ("distance 400-650 Mpc (training 30-400)", {"distance_mpc": (400.0, 650.0)}),
    ], start=1):  # fmt: skip
        sim = simulate_in_distribution(bundle, n, SHIFT_SEED + k, **observing)
        shifts.append((f"subtle: {label}", {"images": sim.images, "columns": sim.columns, "truth": sim.truth}))
    real = real_sdss_stamps(size)
    if real is not None:
        shifts.append((f"real SDSS g stamps ({len(real)} bright sources of one field)", {"images": real}))
    return shifts


def real_sdss_stamps(size: int) -> np.ndarray | None:
    """The bright sources of the shared real SDSS g image, cut and scaled like the mocks; None if absent."""
    if not SDSS_G.is_file():
        print(f"real SDSS stamps skipped: {SDSS_G} is absent")
        return None
    from survey_infer.stamps import cut_stamp, find_bright_sources, prepare_stamp, read_fits_image, stamp_fov_px

    image, _ = read_fits_image(SDSS_G)
    stamps = [cut_stamp(image, (s.x, s.y), stamp_fov_px(s.r_half_px), size) for s in find_bright_sources(image, n_max=60)]
    stamps = [prepare_stamp(st) for st in stamps if np.isfinite(st).all()]
    return np.stack(stamps).astype(np.float32) if stamps else None


# ----------------------------------------------------------------------------------------- star_clusters shifts
def _cluster_renderer(bundle: Bundle, psf_scale: float = 1.0):
    from training.sim import clusters as sim

    render = sim.ClusterRenderer(tuple(bundle.input_spec["image"]["bands"]), int(bundle.input_spec["image"]["shape"][-1]))
    if psf_scale != 1.0:  # the same core + halo PSF, every width scaled
        scale = sim.PIXEL_SCALE_ARCSEC / sim.SUPERSAMPLE
        k = np.fft.fftfreq(render.n_super) * render.n_super
        r2 = k[:, None] ** 2 + k[None, :] ** 2
        out = []
        for band in render.bands:
            sig = psf_scale * sim.PSF_FWHM_ARCSEC[band] / 2.3548 / scale
            core, halo = np.exp(-0.5 * r2 / sig**2), np.exp(-0.5 * r2 / (sim.PSF_HALO_SCALE * sig) ** 2)
            out.append(np.fft.rfft2((1 - sim.PSF_HALO_FRACTION) * core / core.sum() + sim.PSF_HALO_FRACTION * halo / halo.sum()))
        render.psf = np.stack(out)
    return render


def _clusters(bundle: Bundle, n: int, seed: int, *, psf_scale=1.0, noise_scale=1.0, field_scale=1.0, cluster=True,
              field=True, star_mag=None) -> dict:  # fmt: skip
    """Mock clusters as training.sim.clusters.simulate_clusters makes them, with the shift's settings."""
    from training.sim import clusters as sim

    rng = np.random.default_rng(seed)
    render = _cluster_renderer(bundle, psf_scale)
    params = sim.draw_parameters(rng, n, render.table)
    size, nb = render.size, len(render.bands)
    noise = np.array([sim.noise_flux(b) for b in render.bands])
    images = np.empty((n, nb, size, size), dtype=np.float32)
    truth = {"log_age": params["log_age"].copy(), "log_mass": np.full(n, np.nan), "log_rh": params["log_rh"].copy()}
    for i in range(n):
        canvas = np.zeros((nb, render.n_super, render.n_super))
        if field:
            render.field(canvas, rng, float(params["field_sigma"][i]) * field_scale, float(params["field_av"][i]))
        if cluster:
            info = render.cluster(canvas, rng, float(params["log_age"][i]), float(params["log_mass_target"][i]),
                                  float(10 ** params["log_rh"][i]), float(params["eff_gamma"][i]), float(params["av"][i]),
                                  (float(params["centre_x"][i]), float(params["centre_y"][i])))  # fmt: skip
            truth["log_mass"][i] = info["log_mass"]
        if star_mag is not None:  # one star of this F814W-like magnitude with an old-star colour, at the centre
            flux = 10 ** (-0.4 * (rng.uniform(*star_mag) + np.array([2.5, 1.2, 0.0])[:nb] - sim.FLUX_ZERO_POINT))
            render.deposit(canvas, np.zeros(1), np.zeros(1), flux[None])
        images[i] = render.observe(canvas, rng)
        if noise_scale != 1.0:  # more noise: add the missing variance (sky + read noise level)
            images[i] += (rng.normal(0, 1, (nb, size, size)) * noise[:, None, None] * np.sqrt(noise_scale**2 - 1)).astype(np.float32)
    sample = {"images": images}
    if cluster:
        sample["truth"] = truth
    return sample


def star_clusters_shifts(bundle: Bundle, n: int, rng: np.random.Generator) -> list[tuple[str, dict]]:
    from training.sim import clusters as sim

    size, nb = int(bundle.input_spec["image"]["shape"][-1]), int(bundle.input_spec["image"]["shape"][0])
    noise = np.array([sim.noise_flux(b) for b in bundle.input_spec["image"]["bands"]])
    s = SHIFT_SEED + 100
    return [
        ("noise: Gaussian pixels, 10x the sky noise", {"images": (rng.normal(0, 1, (n, nb, size, size)) * 10 * noise[:, None, None]).astype(np.float32)}),
        ("blank sky: sky + read noise only, no field, no cluster", _clusters(bundle, n, s + 1, cluster=False, field=False)),
        ("star: one bright star (F814W 18-22 mag) on sky, no field", _clusters(bundle, n, s + 2, cluster=False, field=False, star_mag=(18, 22))),
        ("field only: a crowded field without a cluster", _clusters(bundle, n, s + 3, cluster=False)),
        ("subtle: field crowding x5 (3-60 -> 15-300 Msun/pc^2)", _clusters(bundle, n, s + 4, field_scale=5.0)),
        ("subtle: PSF x2 wider (all bands)", _clusters(bundle, n, s + 5, psf_scale=2.0)),
        ("subtle: noise x3 (sky + read noise level)", _clusters(bundle, n, s + 6, noise_scale=3.0)),
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------- property_maps shifts
STAR_COLOURS_UGRIZ = (1.25, 0.45, 0.0, -0.15, -0.2)  # mag relative to r of a G-type star (u-g 0.8, g-r 0.45, ...)


def _band_noise(images: np.ndarray) -> np.ndarray:
    """Per-cutout, per-band sky noise (N, C) of linear cutouts from their border (MAD sigma)."""
    from survey_infer.imaging import border_mask

    border = images[:, :, border_mask(images.shape[-2:])]
    return 1.4826 * np.median(np.abs(border - np.median(border, axis=2, keepdims=True)), axis=2)


def property_maps_shifts(bundle: Bundle, n: int, rng: np.random.Generator) -> list[tuple[str, dict]]:
    """Linear ugriz surface-brightness shifts: noise levels are those of fresh in-distribution mocks."""
    from training.mock_property_maps import IMAGE_UNITS
    from training.sim.universe import Observing, simulate

    spec = bundle.input_spec["image"]
    size, bands = int(spec["shape"][-1]), tuple(spec["bands"])
    colours = np.array([STAR_COLOURS_UGRIZ["ugriz".index(b)] for b in bands])

    def mocks(seed: int, **observing) -> dict:
        sim = simulate(n, size=size, seed=seed, first_id=0, bands=bands, property_maps=False, image_units=IMAGE_UNITS,
                       observing=Observing(**observing) if observing else Observing())  # fmt: skip
        return {"images": sim.images, "columns": sim.columns, "truth": sim.truth}

    reference = mocks(SHIFT_SEED + 31)
    sigma = _band_noise(reference["images"])  # (n, C): each shifted cutout borrows one mock's noise and metadata
    columns = {k: v for k, v in reference["columns"].items()}

    def noisy(signal: np.ndarray, factor: float = 1.0) -> np.ndarray:
        return (signal + factor * sigma[:, :, None, None] * rng.normal(0, 1, signal.shape)).astype(np.float32)

    def stars(fwhm_px: np.ndarray) -> np.ndarray:
        psf = _psf_image(size, fwhm_px)
        peak_snr = 10 ** rng.uniform(1, 3, n)  # in the r band (or the first band)
        flux = 10 ** (-0.4 * colours)[None, :, None, None] * (psf / psf.max(axis=(1, 2), keepdims=True))[:, None]
        return noisy(flux * (peak_snr[:, None] * sigma[:, [min(2, len(bands) - 1)]])[:, :, None, None])

    zero = np.zeros((n, len(bands), size, size))
    return [
        ("noise: Gaussian pixels, 10x the sky noise, no source", {"images": noisy(zero, 10.0), "columns": columns}),
        ("blank sky: sky noise only, no source", {"images": noisy(zero), "columns": columns}),
        ("star framed by its own size (FOV = 10 x PSF half-width)",
         {"images": stars(np.full(n, 2 * size / 10.0) * rng.uniform(0.8, 1.2, n)), "columns": columns}),
        ("star in a galaxy-sized frame (FWHM 2-4 px)", {"images": stars(rng.uniform(2.0, 4.0, n)), "columns": columns}),
        ("subtle: seeing 2.6\" +- 0.3 (training 1.4\" +- 0.25)",
         mocks(SHIFT_SEED + 32, seeing_fwhm_arcsec=(2.6, 0.3), seeing_clip_arcsec=(2.0, 3.5))),
        ("subtle: noise x3 (sky and Poisson sigma)", mocks(SHIFT_SEED + 33, noise_scale=3.0)),
        ("subtle: distance 400-650 Mpc (training 30-400)", mocks(SHIFT_SEED + 34, distance_mpc=(400.0, 650.0))),
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------- sfh shifts
HST_PIVOT_A = (2710.0, 3355.0, 4326.0, 5308.0, 8048.0)  # F275W, F336W, F438W, F555W, F814W


def _planck(wave_a: np.ndarray, temperature: np.ndarray) -> np.ndarray:
    """f_lambda of blackbodies (N,) at wavelengths (L,) in Angstrom, up to a constant: (N, L)."""
    x = 1.4388e8 / (wave_a[None, :] * temperature[:, None])  # hc / (lambda k T), lambda in A
    return 1.0 / (wave_a[None, :] ** 5 * np.expm1(np.minimum(x, 700.0)))


def sfh_shifts(bundle: Bundle, n: int, rng: np.random.Generator) -> list[tuple[str, dict]]:
    """Spectra + photometry shifts; noise levels and redshifts are those of fresh in-distribution mocks."""
    import dataclasses

    from training.trust import SpectraChunks, sfh_spectra

    base = sfh_spectra(n, SHIFT_SEED + 51)

    def replaced(make) -> dict:
        """The base sample with each chunk's flux and photometry from ``make(chunk, level, sigma)``, noise added."""
        batches = []
        for chunk in base.images.batches:
            sigma = 1.0 / np.sqrt(np.maximum(chunk.ivar, 1e-30))
            phot_sigma = 1.0 / np.sqrt(np.maximum(chunk.photometry_ivar, 1e-30))
            level = np.median(chunk.flux, axis=1)
            flux, phot = make(chunk, level)
            flux = flux + sigma * rng.normal(0, 1, flux.shape)
            phot = phot + phot_sigma * rng.normal(0, 1, phot.shape)
            batches.append(dataclasses.replace(chunk, flux=flux.astype(np.float32), photometry=phot.astype(np.float32)))
        return {"images": SpectraChunks(batches), "columns": base.columns}

    def flat(chunk, level):
        return np.repeat(level[:, None], chunk.flux.shape[1], 1), np.repeat(level[:, None], 5, 1)

    def zero(chunk, level):
        return np.zeros_like(chunk.flux), np.zeros_like(chunk.photometry)

    def blackbody(chunk, level):
        temperature = 10 ** rng.uniform(np.log10(4000.0), np.log10(20000.0), len(chunk))
        spectrum = _planck(chunk.wave, temperature)
        scale = level / np.median(spectrum, axis=1)
        return spectrum * scale[:, None], _planck(np.array(HST_PIVOT_A), temperature) * scale[:, None]

    return [
        ("noise: flux and photometry of no source (noise only)", replaced(zero)),
        ("blank: a flat, featureless continuum (same S/N)", replaced(flat)),
        ("star: a blackbody of 4,000-20,000 K (same S/N)", replaced(blackbody)),
        ("subtle: S/N 2-5 per pixel (training 5-100)", _with_truth(sfh_spectra(n, SHIFT_SEED + 52, snr=(2.0, 5.0)))),
        ("subtle: dispersion 300-450 km/s (training 30-250)", _with_truth(sfh_spectra(n, SHIFT_SEED + 53, sigma=(300.0, 450.0)))),
        ("subtle: dust A_V 2-3 (training 0-1.5)", _with_truth(sfh_spectra(n, SHIFT_SEED + 54, av=(2.0, 3.0)))),
    ]  # fmt: skip


def _with_truth(sample) -> dict:
    return {"images": sample.images, "columns": sample.columns, "truth": sample.truth}


SHIFTS = {"mass_to_light": mass_to_light_shifts, "star_clusters": star_clusters_shifts,
          "property_maps": property_maps_shifts, "sfh": sfh_shifts}  # fmt: skip
# Outputs compared with a truth column of another name, or that are per-spaxel, not catalog columns (error vs
# score, coverage): property_maps' map totals; sfh's per-spaxel means
TRUTH_OF = {("property_maps", "log_mstar_map"): "log_mstar",
            **{("sfh", m): m for m in ("age_lw", "age_mw", "log_z_lw", "log_z_mw")}}  # fmt: skip


# ----------------------------------------------------------------------------------------- the bench
# ----------------------------------------------------------------------------------------- mass_profiles shifts
KIN_SHIFT_SEED = 942_000  # + k per shift (mass_profiles): not a training (5_000-5_300_000), evaluation or trust seed


def _kinematics_grid(bundle: Bundle, cache: Path | None) -> list:
    """The bundle's training DF grid (~4 min on one core), or a pickle of it written by an earlier run (cloudpickle:
    galpy's DFs hold lambdas; ~3 MB a DF)."""
    import cloudpickle as pickle

    from training.trust import mass_profiles_halos

    if cache is not None and cache.exists():
        return pickle.loads(cache.read_bytes())
    halos = mass_profiles_halos(bundle)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(pickle.dumps(halos))
    return halos


def _with_prior(seed: int, halos: list, n: int, **ranges) -> list:
    """Galaxies from the training grid with some of the simulator's prior ranges replaced (truth kept)."""
    from training.sim import kinematics as sim

    saved = {k: getattr(sim, k) for k in ranges}
    try:
        for k, v in ranges.items():
            setattr(sim, k, v)
        return sim.simulate_split(halos, n, seed, 1, 0)
    finally:
        for k, v in saved.items():
            setattr(sim, k, v)


def _other_tracer_halos(seed: int) -> list:
    """DFs outside the training grid: a Hernquist (cuspy) tracer instead of the Plummer one, isotropic and
    Osipkov-Merritt r_a = 1 tracer scale, in NFW and Burkert haloes (b_ratio = the measured median projected
    radius, in halo scale radii, so the simulator's rescaling by R_h holds)."""
    import warnings

    import galpy.potential as gp
    from galpy.df import osipkovmerrittdf

    from training.sim import kinematics as sim

    halos = []
    for k, (family, a_tracer, ra) in enumerate([("nfw", 0.15, np.inf), ("nfw", 0.3, 1.0), ("burkert", 0.3, np.inf),
                                               ("burkert", 0.6, 1.0)]):  # fmt: skip
        pot = sim.halo_potential(family)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            df = osipkovmerrittdf(pot=pot, denspot=gp.HernquistPotential(amp=1.0, a=a_tracer),
                                  ra=ra * a_tracer if np.isfinite(ra) else 1e8, rmax=sim.RMAX)  # fmt: skip
            halo = sim.Halo(family, 0.0, 1.0, float(ra), df, pot)
            np.random.seed(seed + k)
            pos, v = sim.sample_stars(halo, sim.DF_CALIBRATION_STARS)
            halo.sigma_los = float(np.std(v[:, 2]))
            halo.b_ratio = float(np.median(np.hypot(pos[:, 0], pos[:, 1])))
            halo.log_mass_table = np.log10([float(pot.mass(10.0**lr)) for lr in sim._LOG_R_TABLE])
        halos.append(halo)
    return halos


def _rotating_discs(n: int, rng: np.random.Generator) -> list:
    """Inclined rotating exponential discs: v_los = V(R) sin(phi) sin(i) + a small dispersion, no truth."""
    from training.sim.kinematics import Projection

    out = []
    for _ in range(n):
        m = int(np.exp(rng.uniform(np.log(20), np.log(2000))))
        h = np.exp(rng.uniform(np.log(0.06), np.log(0.6)))  # kpc
        radius = rng.gamma(2.0, h, m)  # exponential surface density
        phi = rng.uniform(0, 2 * np.pi, m)
        inc = np.arccos(rng.uniform(0.1, 0.8))  # 37-84 deg
        v_max = rng.uniform(10.0, 40.0)
        v_circ = v_max * radius / np.hypot(radius, h)
        err = np.clip(rng.uniform(1, 5) * np.exp(rng.normal(0, 0.3, m)), 0.3, 15.0)
        v = v_circ * np.sin(phi) * np.sin(inc) + rng.normal(0, 0.15 * v_max, m) + rng.normal(0, err)
        x, y = radius * np.cos(phi), radius * np.sin(phi) * np.cos(inc)
        out.append(Projection(x, y, v + rng.uniform(-300, 300), err, {}))
    return out


def mass_profiles_shifts(bundle: Bundle, n: int, halos: list) -> list[tuple[str, dict]]:
    """(label, sample) per shift; the sample holds a StarBatch as "images", object_id, and truth when it has one."""
    from training.trust import galaxies_sample

    def sample(projections, truth=True) -> dict:
        s = galaxies_sample(projections)
        return {"images": s.images, "columns": s.columns, **({"truth": s.truth} if truth else {})}

    seed = iter(range(KIN_SHIFT_SEED, KIN_SHIFT_SEED + 100))
    rng = np.random.default_rng(next(seed))
    shifts = []
    base = _with_prior(next(seed), halos, n)
    for p in base:  # the same stars (positions), velocities replaced by uniform noise over +-sqrt(3) x 5-20 km/s
        half = np.sqrt(3) * rng.uniform(5.0, 20.0)
        p.v_los = rng.uniform(-half, half, len(p.x)) + rng.normal(0, p.v_err) + p.truth["v_sys_kms"]
    shifts.append(("subtle: flat-topped velocities (uniform, same dispersion; Plummer positions)", sample(base, truth=False)))
    quiet = _with_prior(next(seed), halos, n)
    for p in quiet:  # the velocities are the measurement noise alone: no intrinsic dispersion
        p.v_los = rng.normal(0, p.v_err) + p.truth["v_sys_kms"]
    shifts.append(("noise: velocities = measurement errors only (Plummer positions)", sample(quiet, truth=False)))
    noise = _with_prior(next(seed), halos, n)
    for p in noise:  # positions uniform in a disc too: nothing of a galaxy left
        r = p.truth["r_half_kpc"] * 2.0 * np.sqrt(rng.uniform(0, 1, len(p.x)))
        phi = rng.uniform(0, 2 * np.pi, len(p.x))
        p.x, p.y = r * np.cos(phi), r * np.sin(phi)
        p.v_los = rng.normal(0, rng.uniform(5.0, 20.0), len(p.x)) + rng.normal(0, p.v_err) + p.truth["v_sys_kms"]
    shifts.append(("noise: uniform-disc positions, Gaussian velocities", sample(noise, truth=False)))
    shifts.append(("rotating disc (V_max 10-40 km/s, sigma 0.15 V_max)", sample(_rotating_discs(n, rng), truth=False)))
    for label, ranges in [
        ("hotter tracer: sigma 60-150 km/s (training 5-20)", {"SIGMA_KMS_RANGE": (60.0, 150.0)}),
        ("colder tracer: sigma 1-2.5 km/s (training 5-20)", {"SIGMA_KMS_RANGE": (1.0, 2.5)}),
        ("few stars: 6-15 (training 20-2000)", {"N_STARS_RANGE": (6, 15)}),
        ("larger tracer: R_h 2-5 kpc (training 0.1-1)", {"R_HALF_KPC_RANGE": (2.0, 5.0)}),
    ]:  # fmt: skip
        shifts.append((f"subtle: {label}", sample(_with_prior(next(seed), halos, n, **ranges))))
    errs = _with_prior(next(seed), halos, n)
    for p in errs:  # 5x the velocity errors: 24 v_err^2 more noise, and v_err reported x5
        p.v_los = p.v_los + rng.normal(0, np.sqrt(24.0) * p.v_err)
        p.v_err = 5.0 * p.v_err
    shifts.append(("subtle: velocity errors x5 (level 5-25 km/s; training 1-5)", sample(errs)))
    other = _other_tracer_halos(next(seed))
    shifts.append(("subtle: Hernquist tracer (training: Plummer), iso + OM r_a=a", sample(_with_prior(next(seed), other, n))))
    return shifts


def bench_mass_profiles(bundle: Bundle, args, report: Report) -> None:
    """AUROC per shift, M_pred/M_true vs score, and the per-radius coverage of the posterior intervals."""
    from survey_infer.tasks.mass_profiles import RADII_F, radius_name
    from training.train_mass_profiles import EVAL_SEEDS
    from training.trust import galaxies_sample, interval_coverage

    if load_trust(bundle) is None:
        report(f"{bundle.id}: no trust description (run `survey-infer trust {bundle.path}`); skipped")
        return
    from training.sim import kinematics as sim

    section = bundle.meta[TRUST_KEY]
    engine = make_engine(args.engine, bundle, threads=args.threads)
    tick = time.time()
    halos = _kinematics_grid(bundle, args.kinematics_grid_cache)
    grid_s = time.time() - tick
    seed = EVAL_SEEDS["test"]
    sample = galaxies_sample(sim.simulate_split(halos, args.n, seed, 1, 0))
    options = {"samples": str(args.samples)}
    s_in, out_in = _scores(bundle, engine, {"images": sample.images, "columns": sample.columns}, options)
    threshold = float(section["threshold"])
    report(f"\n== mass_profiles: bundle {bundle.id}; in-distribution: {args.n} held-out galaxies of the training DF grid, "
           f"seed {seed} (bench/accuracy_mass_profiles.py's test seed; {time.time() - tick:.0f} s, DF grid {grid_s:.0f} s); "
           f"threshold {threshold:.4g} (quantile {section['threshold_quantile']} of the trust fit's "
           f"{section['mocks']['held_out_rows']} held-out mocks, seeds {section['mocks']['seeds']}; features: the "
           f"32-number layer the flow is conditioned on, transform {section['transform']!r})")  # fmt: skip
    ok_in = np.isfinite(s_in)
    report(f"in-distribution rows flagged ood: {np.mean(s_in[ok_in] > threshold):.3f} (nominal 0.010); score median "
           f"{np.median(s_in[ok_in]):.2f}, 99th pct {np.quantile(s_in[ok_in], 0.99):.2f}")  # fmt: skip

    header = f"{'shift':<66} {'n':>5} {'AUROC':>6} {'flagged':>8} {'median score':>12}"
    report(f"\n{header}\n{'-' * len(header)}")
    names = [radius_name(f) for f in RADII_F]
    binned = [(s_in, out_in, sample.truth)]
    hists = [("in-distribution", s_in[ok_in])]
    for label, shift in mass_profiles_shifts(bundle, args.n_shift, halos):
        score, out = _scores(bundle, engine, shift, options)
        ok = np.isfinite(score)
        no_est = int((~ok).sum())
        if not ok.any():
            report(f"{label:<66} {len(score):5d} {'-':>6} {'-':>8} {'no estimate':>12}")
            continue
        y = np.r_[np.zeros(ok_in.sum()), np.ones(ok.sum())]
        auroc = roc_auc_score(y, np.r_[s_in[ok_in], score[ok]])
        note = f"  ({no_est} few_stars: no estimate)" if no_est else ""
        report(f"{label:<66} {int(ok.sum()):5d} {auroc:6.3f} {np.mean(score[ok] > threshold):8.3f} {np.median(score[ok]):12.2f}{note}")
        hists.append((label.removeprefix("subtle: ")[:48], score[ok]))
        if "truth" in shift:
            binned.append((score, out, shift["truth"]))

    report("\nerror vs ood_score (in-distribution + shifted galaxies with truth): M_pred/M_true of the posterior median, "
           "median [16-84%], and the 68% interval's coverage, at R_h and 1.8 R_h; bins of score")  # fmt: skip
    scores = np.concatenate([b[0] for b in binned])
    edges = [0.0, *np.quantile(s_in[ok_in], [0.5, 0.9, 0.99]), 1.5 * threshold, 2.5 * threshold, np.inf]
    header = f"{'ood_score bin':<20} {'n':>6} {'M/M_true at R_h':>24} {'cov68':>6} {'M/M_true at 1.8 R_h':>24} {'cov68':>6}"
    report(f"{header}\n{'-' * len(header)}")
    cells = {}
    for name in ("log_m_1p0", "log_m_1p8"):
        pred = np.concatenate([b[1][name].astype(np.float64) for b in binned])
        true = np.concatenate([np.asarray(b[2][name], np.float64) for b in binned])
        lo = np.concatenate([b[1][f"{name}_p16"].astype(np.float64) for b in binned])
        hi = np.concatenate([b[1][f"{name}_p84"].astype(np.float64) for b in binned])
        cells[name] = (pred - true, (lo <= true) & (true <= hi))
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = np.isfinite(scores) & (scores >= lo) & (scores < hi)
        row = f"[{lo:7.2f}, {hi:7.2f}) {int(sel.sum()):6d}"
        for name in ("log_m_1p0", "log_m_1p8"):
            d, inside = cells[name]
            if sel.sum() >= 5:
                p16, p50, p84 = 10 ** np.percentile(d[sel], [15.865, 50, 84.135])
                row += f" {p50:9.3f} [{p16:5.2f}, {p84:5.2f}]    {np.mean(inside[sel]):6.2f}"
            else:
                row += f" {'-':>24} {'-':>6}"
        report(row)
    _plot("mass_profiles", bundle, hists, threshold, args.out.with_name("ood_mass_profiles.png"))

    truth = np.stack([np.asarray(sample.truth[k], np.float64) for k in names], 1)
    cov = interval_coverage(out_in["log_mass_samples"], truth)
    report(f"\ncoverage of the posterior intervals on the {int(ok_in.sum())} in-distribution held-out galaxies ({args.samples} "
           "flow samples each): central 68.27% (15.87-84.13 percentiles of the samples) and 95% (2.5-97.5); binomial "
           f"std ~{np.sqrt(0.68 * 0.32 / ok_in.sum()):.3f} and ~{np.sqrt(0.05 * 0.95 / ok_in.sum()):.3f}; recalibrate if "
           "outside +-0.05 of nominal")  # fmt: skip
    header = f"{'radius':<10} {'68%':>6} {'95%':>6}"
    report(f"{header}\n{'-' * len(header)}")
    for i, k in enumerate(names):
        report(f"{k:<10} {cov['68'][i]:6.3f} {cov['95'][i]:6.3f}")
    worst = max(np.max(np.abs(cov["68"] - 0.682689)), np.max(np.abs(cov["95"] - 0.95)))
    report(f"largest miss {worst:.3f}: " + ("every radius within +-0.05 of nominal, no recalibration applied" if worst <= 0.05
                                           else "outside +-0.05: a recalibration is needed"))  # fmt: skip
    try:
        import tarp

        ok = np.isfinite(out_in["log_mass_samples"]).all(axis=(1, 2))
        ecp, alpha = tarp.get_tarp_coverage(np.transpose(out_in["log_mass_samples"][ok], (1, 0, 2)).astype(np.float64), truth[ok],
                                            references="random", metric="euclidean", norm=True, seed=5)  # fmt: skip
        band = 2 * np.sqrt(alpha * (1 - alpha) / ok.sum())
        report(f"TARP (10-D joint, tarp package, these galaxies): max |ECP - alpha| = {np.max(np.abs(ecp - alpha)):.3f}; "
               f"inside the binomial 2-sigma band at {np.mean(np.abs(ecp - alpha) <= band + 1e-12):.0%} of levels")  # fmt: skip
    except ImportError:
        report("TARP: the tarp package is not installed (bench/accuracy_mass_profiles.py reports it)")


def _scores(bundle, engine, sample: dict, task_options: dict | None = None) -> tuple[np.ndarray, dict]:
    trust = load_trust(bundle)
    out = run_rows(bundle, sample["images"], sample.get("columns", {}), engine_obj=engine, task_options=task_options,
                   statistics=trust.n_statistics > 0)  # fmt: skip
    score = trust.score(out["features"], out.get(STATISTICS_KEY))
    score[(out["flag"] & NO_ESTIMATE) != 0] = np.nan
    return score, out


def _targets(bundle: Bundle) -> list[str]:
    names = [c.name for c in get_task(bundle.task).output_columns(bundle)]
    return [n for n in names if f"{n}_err" in names]


def _error_targets(bundle: Bundle) -> list[tuple[str, str]]:
    """(catalog output, truth column) pairs for the error-vs-score table."""
    names = [c.name for c in get_task(bundle.task).output_columns(bundle)]
    return [(t, t) for t in _targets(bundle)] + [(n, TRUTH_OF[bundle.task, n]) for n in names if (bundle.task, n) in TRUTH_OF]


def bench_task(task: str, bundle: Bundle, args, report: Report) -> None:
    from training.train import EVAL_SEEDS as ML_EVAL_SEEDS
    from training.train_star_clusters import EVAL_SEEDS as SC_EVAL_SEEDS

    if load_trust(bundle) is None:
        report(f"{bundle.id}: no trust description (run `survey-infer trust {bundle.path}`); skipped")
        return
    section = bundle.meta[TRUST_KEY]
    engine = make_engine(args.engine, bundle, threads=args.threads)
    from training.train_property_maps import EVAL_SEEDS as PM_EVAL_SEEDS

    from training.train_sfh import EVAL_SEEDS as SFH_EVAL_SEEDS

    seed = {"mass_to_light": ML_EVAL_SEEDS, "star_clusters": SC_EVAL_SEEDS, "property_maps": PM_EVAL_SEEDS,
            "sfh": {"test": SFH_EVAL_SEEDS["bench"]}}[task]["test"]  # fmt: skip
    tick = time.time()
    sample = simulate_in_distribution(bundle, args.n, seed)
    s_in, out_in = _scores(bundle, engine, {"images": sample.images, "columns": sample.columns})
    threshold = float(section["threshold"])
    report(f"\n== {task}: bundle {bundle.id}; in-distribution: {args.n} held-out mocks, seed {seed} "
           f"({time.time() - tick:.0f} s); threshold {threshold:.4g} (quantile {section['threshold_quantile']} of the trust "
           f"fit's held-out mocks, seeds {section['mocks']['seeds']})")  # fmt: skip
    ok_in = np.isfinite(s_in)
    report(f"in-distribution rows flagged ood: {np.mean(s_in[ok_in] > threshold):.3f} (nominal 0.010); score median "
           f"{np.median(s_in[ok_in]):.2f}, 99th pct {np.quantile(s_in[ok_in], 0.99):.2f}")  # fmt: skip

    if INT8_ONNX_FILE in bundle.meta["files"]:  # the fp32 threshold serves int8 runs too: how well?
        int8 = make_engine("onnxruntime", bundle, threads=args.threads, precision="int8")
        s8, _ = _scores(bundle, int8, {"images": sample.images, "columns": sample.columns})
        ok8 = ok_in & np.isfinite(s8)
        report(f"--precision int8 on the same mocks: flagged ood {np.mean(s8[ok8] > threshold):.3f}; |score int8 - fp32| "
               f"median {np.median(np.abs(s8 - s_in)[ok8]):.2f}, 99th pct {np.quantile(np.abs(s8 - s_in)[ok8], 0.99):.2f}")  # fmt: skip

    rng = np.random.default_rng(SHIFT_SEED)
    header = f"{'shift':<62} {'n':>5} {'AUROC':>6} {'flagged':>8} {'median score':>12}"
    report(f"\n{header}\n{'-' * len(header)}")
    binned = [(s_in, out_in, sample.truth)]
    hists = [("in-distribution", s_in[ok_in])]
    for label, shift in SHIFTS[task](bundle, args.n_shift, rng):
        score, out = _scores(bundle, engine, shift)
        ok = np.isfinite(score)
        if not ok.any():
            report(f"{label:<62} {len(score):5d} {'-':>6} {'-':>8} {'no estimate':>12}")
            continue
        y = np.r_[np.zeros(ok_in.sum()), np.ones(ok.sum())]
        auroc = roc_auc_score(y, np.r_[s_in[ok_in], score[ok]])
        report(f"{label:<62} {int(ok.sum()):5d} {auroc:6.3f} {np.mean(score[ok] > threshold):8.3f} {np.median(score[ok]):12.2f}")
        hists.append((label.removeprefix("subtle: ")[:48], score[ok]))
        if "truth" in shift:
            binned.append((score, out, shift["truth"]))
    report("(rows without an estimate never reach the score: constant or NaN cutouts, spectra without usable pixels are "
           "flagged empty_cutout / nan_pixels with a null score, and n counts only the scored rows)")

    report("\nerror vs ood_score (in-distribution + subtly shifted mocks with truth), RMSE per output; bins of score")
    scores = np.concatenate([b[0] for b in binned])
    edges = [0.0, *np.quantile(s_in[ok_in], [0.5, 0.9, 0.99]), 1.5 * threshold, 2.5 * threshold, np.inf]
    pairs = _error_targets(bundle)
    targets = [t for t, _ in pairs]
    header = f"{'ood_score bin':<20} {'n':>6} " + " ".join(f"{t + ' RMSE':>14}" for t in targets)
    report(f"{header}\n{'-' * len(header)}")
    errors = {t: np.concatenate([b[1][t].astype(np.float64) - np.asarray(b[2][truth], dtype=np.float64) for b in binned])
              for t, truth in pairs}  # fmt: skip
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = np.isfinite(scores) & (scores >= lo) & (scores < hi)
        cells = " ".join(f"{np.sqrt(np.nanmean(errors[t][sel] ** 2)) if sel.sum() else np.nan:14.3f}" for t in targets)
        report(f"[{lo:7.2f}, {hi:7.2f}) {int(sel.sum()):6d} {cells}")

    _plot(task, bundle, hists, threshold, args.out.with_name(f"ood_{task}.png"))
    report(f"\ncoverage on the {args.n} in-distribution held-out mocks (nominal 0.683 and 0.950): raw = the network's "
           "sigma (scale 1); before = the scale the bundle had from training; now = after `survey-infer trust`")
    header = (f"{'output':<10} {'raw 68%':>7} {'raw 95%':>7} {'scale before':>12} {'68% before':>10} {'95% before':>10} "
              f"{'scale now':>10} {'68% now':>8} {'95% now':>8}")  # fmt: skip
    report(f"{header}\n{'-' * len(header)}")
    recal = section.get("recalibration", {}).get("outputs", {})
    per_row = [(t, truth) for t, truth in pairs if t not in _targets(bundle) and f"{t}_err" in out_in]
    if not _targets(bundle) and not per_row:
        report("(no catalog output with an _err column: the per-pixel coverage of the maps is in the task's accuracy bench)")
    for t, truth in per_row:  # errors the task scales itself (e.g. sfh's output_spec err_scale): as the run gives them
        residual = out_in[t].astype(np.float64) - np.asarray(sample.truth[truth], dtype=np.float64)
        err = out_in[f"{t}_err"].astype(np.float64)
        report(f"{t:<10} {'-':>7} {'-':>7} {'-':>12} {'-':>10} {'-':>10} {'task':>10} "
               f"{coverage(residual, err, Z_68):8.3f} {coverage(residual, err, Z_95):8.3f}")  # fmt: skip
    for t in _targets(bundle):
        residual = out_in[t].astype(np.float64) - np.asarray(sample.truth[t], dtype=np.float64)
        err = out_in[f"{t}_err"].astype(np.float64)
        now = float(bundle.output_spec.get(f"{t}_err", {}).get("scale", 1.0))
        before = float(recal.get(t, {}).get("previous_scale", now))
        old, raw = err * before / now, err / now
        report(f"{t:<10} {coverage(residual, raw, Z_68):7.3f} {coverage(residual, raw, Z_95):7.3f} {before:12.4f} {coverage(residual, old, Z_68):10.3f} {coverage(residual, old, Z_95):10.3f} "
               f"{now:10.4f} {coverage(residual, err, Z_68):8.3f} {coverage(residual, err, Z_95):8.3f}")  # fmt: skip


def _plot(task: str, bundle: Bundle, hists: list[tuple[str, np.ndarray]], threshold: float, path: Path) -> None:
    """Histograms of log10 ood_score: in-distribution and every shift, with the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.8))
    bins = np.linspace(np.log10(min(h.min() for _, h in hists if len(h))), np.log10(max(h.max() for _, h in hists if len(h))), 60)
    for label, values in hists:
        ax.hist(np.log10(values), bins=bins, density=True, histtype="step", lw=2.5 if label == "in-distribution" else 1.2,
                label=f"{label} (n={len(values)})")  # fmt: skip
    ax.axvline(np.log10(threshold), color="k", ls="--", label="threshold (0.99 quantile)")
    ax.set_xlabel("log10 ood_score")
    ax.set_ylabel("density")
    ax.set_title(f"{task}: {bundle.id}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="trust: ood_score AUROC per shift, error vs score, coverage")
    parser.add_argument("--task", default="mass_to_light,star_clusters,mass_profiles")
    parser.add_argument("--bundle", type=Path, action="append", help="bundle directory per task (default: shipped)")
    parser.add_argument("--n", type=int, default=2000, help="in-distribution held-out mocks")
    parser.add_argument("--n-shift", type=int, default=500, help="rows per shift")
    parser.add_argument("--engine", default="onnxruntime")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--append", action="store_true", help="append to --out instead of rewriting it (other tasks' tables kept)")
    parser.add_argument("--samples", type=int, default=500, help="mass_profiles: flow samples per galaxy (default 500)")
    parser.add_argument("--kinematics-grid-cache", type=Path,
                        help="mass_profiles: pickle of the training DF grid (read if present, else built, ~4 min, and written)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = Report()
    report("command: " + shlex.join(["python", "bench/ood.py", *(sys.argv[1:] if argv is None else argv)]))
    bundles = {load_bundle(p).task: load_bundle(p) for p in args.bundle or []}
    tick = time.time()
    for task in args.task.split(","):
        bundle = bundles.get(task) or load_bundle(default_bundle_path(task), task=task)
        if task == "mass_profiles":
            bench_mass_profiles(bundle, args, report)
        else:
            bench_task(task, bundle, args, report)
    report(f"\n({time.time() - tick:.0f} s; AUROC: in-distribution = 0, shifted = 1, sklearn.metrics.roc_auc_score; flagged: "
           "fraction above the bundle's threshold)")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = args.out.read_text() + "\n" if args.append and args.out.exists() else ""
    args.out.write_text(previous + "\n".join(report.lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
