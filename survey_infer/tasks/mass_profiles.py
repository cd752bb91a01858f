"""mass_profiles: the posterior of a dispersion-supported galaxy's enclosed mass at 10 radii, from its stars.

Input: one `kinematics` store unit = a batch of galaxies with their (ragged) stars: projected positions x, y
about the galaxy's centre (the store converts them to kpc) and line-of-sight velocities v_los with errors
v_err (km/s). Per galaxy (:func:`galaxy_inputs`):

- R_h = the median projected radius of its stars (the projected half-light radius of the kinematic tracer);
  the 10 radii are r = f R_h with f = 0.6, 0.8, ..., 2.4 (3-D radii; M(<r) is the 3-D enclosed mass);
- sigma^2 = var(v_los) - mean(v_err^2) (floored at 10% of var(v_los)), and the mass scale
  M_s = sigma^2 R_h / G;
- a spatial 2-D histogram (x/R_h, y/R_h in [-4, 4], 32 x 32 bins) and a dynamical one (R/R_h in [0, 4] x
  (v_los - mean)/std(v_los) in [-4, 4], 32 x 32), each divided by N x the bin area: the galaxy's 2-D PDFs in
  those normalised coordinates;
- scalars: log10 M_s (added to the outputs, not seen by the layers), log10 N - 2, mean(v_err)/std(v_los),
  log10 of the velocity dispersion inside / outside R_h, and the excess kurtosis of v_los / 3 (clipped to
  [-1, 3.3]): cheap summaries of the dispersion profile and of the anisotropy.

Model (``survey_infer.models.MassProfileNet``): a two-branch CNN (one branch per histogram) merged with the
scalars into a 32-number penultimate layer, then 10 outputs: log10 M(< f R_h) - log10 M_s, to which the
network adds log10 M_s, so it returns physical log masses (``log_mass``, the point estimate) and the 32
``features``. A zuko masked autoregressive flow (4 x MADE affine transforms) conditioned on the 32 features
gives the joint posterior of the 10 residuals log M - log_mass (standardised per radius).

Which runs where: the CNN runs under every engine (ONNX Runtime, TensorRT, torch; its ONNX graph exports
both outputs, ``log_mass`` and ``features``). The flow runs in torch on the worker, in
:meth:`MassProfiles.postprocess`, whatever the engine: sampling a MAF inverts it autoregressively (10
sequential passes through each of the 4 MADE networks) and draws random numbers, which the engines' fixed
ONNX graphs do not carry; keeping it in torch keeps one implementation (zuko's) and exact agreement between
engines (the samples are seeded per unit). It is not free: on one core, 100 samples for 256 galaxies take
~0.9 s against ~0.14 s for the CNN (1,000 samples: ~11 s), so the ``samples`` option sets the cost. The
flow's weights are in the same ``weights.safetensors`` as the CNN's.

Outputs per galaxy: ``r_half_kpc`` (the R_h used), ``n_stars``, ``sigma_los`` [km/s], then for each radius
``log_m_<f>`` (posterior median), ``log_m_<f>_p16``, ``log_m_<f>_p84`` [dex(Msun)], and ``log_mass_samples``,
a list of N posterior samples, each the 10 log masses (N from the run's task option ``samples``, default
:data:`DEFAULT_SAMPLES` or the bundle's ``output_spec.samples``; ``survey-infer run mass_profiles
--task-option samples=N``). A galaxy with fewer than :data:`MIN_STARS` usable stars is kept and flagged
``few_stars`` with null outputs; one with more or fewer stars than the training range is estimated and
flagged ``out_of_range``.
"""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa

from survey_infer.bundle import Bundle
from survey_infer.errors import BundleError, RefusedError, StoreError
from survey_infer.flags import FLAG_BITS
from survey_infer.kinematics import StarBatch
from survey_infer.tasks.base import OutputColumn, Task

G_KPC_KMS2_MSUN = 4.300917270e-6  # G in kpc (km/s)^2 / Msun
RADII_F = (0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2, 2.4)
BINS = 32
SPATIAL_EXTENT = 4.0  # x/R_h, y/R_h in [-4, 4]
RADIUS_EXTENT = 4.0  # R/R_h in [0, 4]
VELOCITY_EXTENT = 4.0  # (v - mean)/std in [-4, 4]
MIN_STARS = 5
SIGMA2_FLOOR = 0.1  # sigma^2 >= 10% of var(v_los)
N_SCALARS = 5
DEFAULT_SAMPLES = 100
MAX_SAMPLES = 10_000


def radius_name(f: float) -> str:
    return f"log_m_{f:.1f}".replace(".", "p")


def _segment_sum(values: np.ndarray, gal: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(gal, weights=values, minlength=n)


def galaxy_inputs(stars: StarBatch) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Network inputs for a batch of galaxies, and per-galaxy summaries (r_half_kpc, sigma_los, n_stars).

    Inputs: ``spatial`` and ``dynamical`` (n, 1, 32, 32) float32, ``scalars`` (n, 3) float32. Galaxies with
    fewer than MIN_STARS stars get zeros (the caller flags them).
    """
    n = len(stars)
    counts = stars.counts
    gal = np.repeat(np.arange(n), counts)
    safe = np.maximum(counts, 1)
    radius = np.hypot(stars.x, stars.y)
    r_half = np.full(n, np.nan)
    for k in np.flatnonzero(counts >= 1):  # a median per galaxy: a short loop of numpy calls
        r_half[k] = np.median(radius[stars.offsets[k] : stars.offsets[k + 1]])
    v_mean = _segment_sum(stars.v_los, gal, n) / safe
    dv = stars.v_los - v_mean[gal]
    var_v = _segment_sum(dv**2, gal, n) / np.maximum(counts - 1, 1)
    mean_err2 = _segment_sum(stars.v_err**2, gal, n) / safe
    sigma2 = np.maximum(var_v - mean_err2, SIGMA2_FLOOR * var_v)
    usable = (counts >= MIN_STARS) & (r_half > 0) & (var_v > 0)
    rh = np.where(usable, r_half, 1.0)
    std_v = np.sqrt(np.where(usable, var_v, 1.0))
    log_mscale = np.where(usable, np.log10(np.where(usable, sigma2, 1.0) * rh / G_KPC_KMS2_MSUN), 0.0)

    def histogram(a: np.ndarray, lo: float, hi: float, b: np.ndarray, blo: float, bhi: float) -> np.ndarray:
        ia = np.floor((a - lo) / (hi - lo) * BINS).astype(np.int64)
        ib = np.floor((b - blo) / (bhi - blo) * BINS).astype(np.int64)
        inside = (ia >= 0) & (ia < BINS) & (ib >= 0) & (ib < BINS)
        flat = np.bincount((gal * BINS + ia)[inside] * BINS + ib[inside], minlength=n * BINS * BINS)
        bin_area = (hi - lo) * (bhi - blo) / BINS**2  # a 2-D PDF in the normalised coordinates: values ~0.1-1
        return (flat.reshape(n, 1, BINS, BINS) / (safe[:, None, None, None] * bin_area)).astype(np.float32)

    xs, ys = stars.x / rh[gal], stars.y / rh[gal]
    spatial = histogram(ys, -SPATIAL_EXTENT, SPATIAL_EXTENT, xs, -SPATIAL_EXTENT, SPATIAL_EXTENT)
    dynamical = histogram(dv / std_v[gal], -VELOCITY_EXTENT, VELOCITY_EXTENT, radius / rh[gal], 0.0, RADIUS_EXTENT)
    mean_err = np.sqrt(mean_err2)
    inner = radius < rh[gal]
    n_in = np.maximum(_segment_sum(inner.astype(float), gal, n), 1)
    n_out = np.maximum(counts - n_in, 1)
    var_in = _segment_sum(dv**2 * inner, gal, n) / n_in
    var_out = _segment_sum(dv**2 * ~inner, gal, n) / n_out
    ratio = np.where(usable & (var_in > 0) & (var_out > 0), 0.5 * np.log10(np.maximum(var_in, 1e-30) / np.maximum(var_out, 1e-30)), 0.0)
    kurtosis = _segment_sum(dv**4, gal, n) / safe / np.maximum(var_v, 1e-30) ** 2 - 3.0
    scalars = np.stack([log_mscale, np.log10(safe) - 2.0, np.where(usable, mean_err / std_v, 0.0), ratio,
                        np.clip(np.where(usable, kurtosis, 0.0), -3.0, 10.0) / 3.0], axis=1)
    spatial[~usable] = 0.0
    dynamical[~usable] = 0.0
    scalars[~usable] = 0.0
    summary = {"r_half_kpc": np.where(usable, r_half, np.nan), "sigma_los": np.where(usable, np.sqrt(sigma2), np.nan),
               "n_stars": counts.astype(np.int32), "usable": usable}  # fmt: skip
    return {"spatial": spatial, "dynamical": dynamical, "scalars": scalars.astype(np.float32)}, summary


# The flow, per bundle, built once per process (from the same safetensors as the engine's CNN).
_FLOWS: dict[str, object] = {}
_FLOW_LOCK = threading.Lock()


def posterior_model(bundle: Bundle):
    """The bundle's torch model (CNN + flow) in eval mode, cached per bundle path."""
    key = str(bundle.path.resolve())
    with _FLOW_LOCK:
        if key not in _FLOWS:
            _FLOWS[key] = bundle.build_torch_model()
        return _FLOWS[key]


# zuko samples from torch's global generator: two units in threads of one worker would interleave their seeds
_SAMPLE_LOCK = threading.Lock()


def sample_posterior(model, features: np.ndarray, log_mass: np.ndarray, n_samples: int, seed: int | None = 0) -> np.ndarray:
    """Posterior samples (n, n_samples, 10) of log10 M(< f R_h) given the CNN's features and point estimate.

    Seeded sampling holds a process-wide lock (the generator is global), so it is reproducible under threads."""
    import torch

    with _SAMPLE_LOCK, torch.inference_mode():
        gen_state = torch.random.get_rng_state()
        if seed is not None:
            torch.manual_seed(seed)
        try:
            samples = model.sample_posterior(torch.from_numpy(np.ascontiguousarray(features, np.float32)),
                                             torch.from_numpy(np.ascontiguousarray(log_mass, np.float32)), n_samples)  # fmt: skip
        finally:
            if seed is not None:
                torch.random.set_rng_state(gen_state)
    return samples.numpy().astype(np.float32)


KINEMATIC_STATISTIC_NAMES = ("velocity_kurtosis", "rotation_over_dispersion", "star_fraction_lt_half_rh",
                             "star_fraction_gt_2rh", "log_n_stars")  # fmt: skip


def kinematic_statistics(stars: StarBatch) -> np.ndarray:
    """What a dispersion-supported tracer's stars look like, per galaxy (N, 5) float32, for the ood score.

    The kurtosis of the line-of-sight velocities; the velocity gradient of a plane ``v = a x + b y`` fitted to
    them, times R_h, over their dispersion (rotation, which the training DFs do not have); the fractions of
    stars inside R_h / 2 and beyond 2 R_h (the tracer's profile; R_h = their median radius); log10 of the number
    of stars. Galaxies without stars get zeros (they are flagged few_stars and get no score).
    """
    n, counts = len(stars), stars.counts
    gal = np.repeat(np.arange(n), counts)
    safe = np.maximum(counts, 1).astype(np.float64)
    radius = np.hypot(stars.x, stars.y)
    r_half = np.ones(n)
    for k in np.flatnonzero(counts >= 1):
        r_half[k] = max(float(np.median(radius[stars.offsets[k] : stars.offsets[k + 1]])), 1e-12)
    dv = stars.v_los - (_segment_sum(stars.v_los, gal, n) / safe)[gal]
    var = np.maximum(_segment_sum(dv**2, gal, n) / safe, 1e-12)
    kurtosis = _segment_sum(dv**4, gal, n) / safe / var**2
    sxx, syy, sxy = (_segment_sum(a * b, gal, n) for a, b in ((stars.x, stars.x), (stars.y, stars.y), (stars.x, stars.y)))
    sxv, syv = _segment_sum(stars.x * dv, gal, n), _segment_sum(stars.y * dv, gal, n)
    det = sxx * syy - sxy**2
    det = np.where(det > 0, det, np.inf)  # fewer than 3 stars in general position: no gradient
    gradient = np.hypot((syy * sxv - sxy * syv) / det, (sxx * syv - sxy * sxv) / det)
    scaled = radius / r_half[gal]
    inner = _segment_sum((scaled < 0.5).astype(np.float64), gal, n) / safe
    outer = _segment_sum((scaled > 2.0).astype(np.float64), gal, n) / safe
    return np.stack([kurtosis, gradient * r_half / np.sqrt(var), inner, outer, np.log10(safe)], 1).astype(np.float32)


class MassProfiles(Task):
    name = "mass_profiles"
    input_statistic_names = KINEMATIC_STATISTIC_NAMES  # the ood score's view of the stars (trust)

    def input_statistics(self, batch: StarBatch, bundle: Bundle) -> np.ndarray:
        return kinematic_statistics(batch)
    store_kind = "kinematics"

    option_names = ("samples",)

    def with_options(self, options):
        configured = super().with_options(options)
        if "samples" in configured.options:
            raw = configured.options["samples"]
            if not raw.isdigit() or not 1 <= int(raw) <= MAX_SAMPLES:
                raise RefusedError(f"task option samples={raw!r}: an integer number of posterior samples per galaxy, "
                                   f"1 to {MAX_SAMPLES}, was expected")  # fmt: skip
        return configured

    def n_samples(self, bundle: Bundle) -> int:
        """Posterior samples per galaxy: the run's ``samples`` option, else the bundle's default."""
        return int(self.options.get("samples", bundle.output_spec.get("samples", DEFAULT_SAMPLES)))

    def output_columns(self, bundle: Bundle) -> list[OutputColumn]:
        cols = [OutputColumn("r_half_kpc", "float32", "kpc", "R_h: median projected radius of the stars; radii are f R_h"),
                OutputColumn("sigma_los", "float32", "km/s", "line-of-sight velocity dispersion, error-corrected"),
                OutputColumn("n_stars", "int32", "", "stars used")]  # fmt: skip
        for f in RADII_F:
            base = radius_name(f)
            what = f"log10 enclosed (3-D) mass within r = {f:.1f} R_h"
            cols += [OutputColumn(base, "float32", "dex(Msun)", f"{what}: posterior median"),
                     OutputColumn(f"{base}_p16", "float32", "dex(Msun)", f"{what}: posterior 16th percentile"),
                     OutputColumn(f"{base}_p84", "float32", "dex(Msun)", f"{what}: posterior 84th percentile")]  # fmt: skip
        cols.append(OutputColumn(
            "log_mass_samples", "float32", "dex(Msun)",
            f"{self.n_samples(bundle)} joint posterior samples, each log10 M(< f R_h) at f = "
            f"{', '.join(f'{f:.1f}' for f in RADII_F)}", arrow_type=pa.list_(pa.list_(pa.float32(), len(RADII_F)))))  # fmt: skip
        return cols

    def input_columns(self, bundle: Bundle) -> list[str]:
        """Per-galaxy columns read besides galaxy_id, ra, dec: none (the stars carry everything)."""
        return []

    def check_store(self, info, bundle: Bundle) -> None:
        if info.kind != "kinematics":
            raise StoreError(f"task {self.name} reads kinematics stores; {info.path} is a {info.kind!r} store")
        if tuple(bundle.meta.get("radii_f", RADII_F)) != RADII_F:
            raise BundleError(f"bundle {bundle.id} has radii {bundle.meta.get('radii_f')}; this version expects {RADII_F}")
        return None

    def prepare(self, stars: StarBatch, columns, bundle):
        inputs, summary = galaxy_inputs(stars)
        flags = np.zeros(len(stars), np.int32)
        flags[~summary["usable"]] |= FLAG_BITS["few_stars"]
        lo, hi = bundle.input_spec.get("n_stars_range", (0, np.inf))
        counts = summary["n_stars"]
        flags[summary["usable"] & ((counts < lo) | (counts > hi))] |= FLAG_BITS["out_of_range"]
        columns.update({"_" + k: v for k, v in summary.items()})  # handed to postprocess with the batch's columns
        return inputs, flags

    def postprocess(self, outputs, columns, flags, bundle):
        log_mass = outputs["log_mass"].astype(np.float32)
        features = outputs["features"].astype(np.float32)
        if log_mass.ndim != 2 or log_mass.shape[1] != len(RADII_F):
            raise BundleError(f"bundle {bundle.id}: engine output 'log_mass' has shape {log_mass.shape}; (N, 10) expected")
        n, n_s = len(log_mass), self.n_samples(bundle)
        usable = columns["_usable"]
        samples = np.full((n, n_s, len(RADII_F)), np.nan, np.float32)
        if usable.any():
            samples[usable] = sample_posterior(posterior_model(bundle), features[usable], log_mass[usable], n_s,
                                               seed=int(columns["object_id"][0]) if n else 0)  # fmt: skip
        p16, p50, p84 = np.percentile(samples, [15.865, 50.0, 84.135], axis=1) if n_s > 1 else (samples[:, 0],) * 3
        result = {"r_half_kpc": columns["_r_half_kpc"].astype(np.float32),
                  "sigma_los": columns["_sigma_los"].astype(np.float32),
                  "n_stars": columns["_n_stars"].astype(np.int32)}  # fmt: skip
        for k, f in enumerate(RADII_F):
            base = radius_name(f)
            result[base] = p50[:, k].astype(np.float32)
            result[f"{base}_p16"] = p16[:, k].astype(np.float32)
            result[f"{base}_p84"] = p84[:, k].astype(np.float32)
        result["log_mass_samples"] = samples
        return result

    def example_inputs(self, bundle, n_rows, seed=0):
        rng = np.random.default_rng(seed)
        spatial = rng.exponential(0.2, (n_rows, 1, BINS, BINS)).astype(np.float32)
        dynamical = rng.exponential(0.2, (n_rows, 1, BINS, BINS)).astype(np.float32)
        scalars = np.stack([rng.uniform(6, 9, n_rows), rng.uniform(-0.7, 1.3, n_rows), rng.uniform(0, 1, n_rows),
                            rng.normal(0, 0.1, n_rows), rng.normal(0, 0.3, n_rows)], 1)
        return {"spatial": spatial, "dynamical": dynamical, "scalars": scalars.astype(np.float32)}


TASK = MassProfiles()
