"""Metrics of estimates against known truth, shared by training (validation) and the accuracy benchmarks."""

from __future__ import annotations

import numpy as np


def regression_metrics(pred: np.ndarray, sigma: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """RMSE, R^2, bias, median |error|, the fractions within 1 and 1.96 sigma (the 68.27% and 95% intervals'
    coverage), and the Gaussian NLL of ``pred +- sigma``."""
    pred, sigma, truth = (np.asarray(a, dtype=np.float64) for a in (pred, sigma, truth))
    err = pred - truth
    var = sigma**2
    return {
        "rmse": float(np.sqrt(np.mean(err**2))),
        "r2": float(1.0 - np.sum(err**2) / np.sum((truth - truth.mean()) ** 2)),
        "bias": float(np.mean(err)),
        "median_abs_error": float(np.median(np.abs(err))),
        "within_1sigma": float(np.mean(np.abs(err) < sigma)),
        "within_1.96sigma": float(np.mean(np.abs(err) < 1.959964 * sigma)),  # the 95% interval's coverage
        "gaussian_nll": float(np.mean(0.5 * (np.log(var) + err**2 / var))),
    }


PHOTOMETRIC_NOISE_MAG = 0.03  # per band, Gaussian, independent in g and i: a typical SDSS galaxy colour error


def observed_colour(truth: dict, rng: np.random.Generator, noise_mag: float = PHOTOMETRIC_NOISE_MAG) -> np.ndarray:
    """Observed-frame g - i of the mock's model magnitudes with independent photometric noise in each band."""
    noise = rng.normal(0.0, noise_mag, (2, len(truth["mag_g"])))
    return np.asarray(truth["mag_g"]) + noise[0] - np.asarray(truth["mag_i"]) - noise[1]


def fit_colour_relation(colour: np.ndarray, log_ml: np.ndarray) -> tuple[float, float, float]:
    """Least-squares a, b of log10 M/L = a + b colour, and the rms of the residuals (dex)."""
    b, a = np.polyfit(colour, log_ml, 1)
    return float(a), float(b), float(np.sqrt(np.mean((log_ml - a - b * colour) ** 2)))
