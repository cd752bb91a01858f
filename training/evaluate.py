"""Metrics of estimates against known truth, shared by training (validation) and the accuracy benchmarks."""

from __future__ import annotations

import numpy as np


def regression_metrics(pred: np.ndarray, sigma: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """RMSE, R^2, bias, median |error|, the fraction within 1 sigma, and the Gaussian NLL of ``pred +- sigma``."""
    pred, sigma, truth = (np.asarray(a, dtype=np.float64) for a in (pred, sigma, truth))
    err = pred - truth
    var = sigma**2
    return {
        "rmse": float(np.sqrt(np.mean(err**2))),
        "r2": float(1.0 - np.sum(err**2) / np.sum((truth - truth.mean()) ** 2)),
        "bias": float(np.mean(err)),
        "median_abs_error": float(np.median(np.abs(err))),
        "within_1sigma": float(np.mean(np.abs(err) < sigma)),
        "gaussian_nll": float(np.mean(0.5 * (np.log(var) + err**2 / var))),
    }
