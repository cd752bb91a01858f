"""Image preprocessing shared by simulated and real cutouts, so both reach the model in the same form.

The workshop's recipe: log-scale each cutout and map it to [-1, 1]. The floor of the logarithm is half the
sky noise, so empty sky maps to -1 and the scaling does not depend on the flux unit (counts, nanomaggies).
"""

from __future__ import annotations

import numpy as np


def border_mask(shape: tuple[int, int]) -> np.ndarray:
    """The outer eighth (at least 2 pixels) of an image on every side: where the sky is measured."""
    band = max(2, min(shape) // 8)
    mask = np.zeros(shape, dtype=bool)
    mask[:band], mask[-band:], mask[:, :band], mask[:, -band:] = True, True, True, True
    return mask


def mad_sigma(values: np.ndarray) -> float:
    """Gaussian-equivalent sigma of sky pixels from their median absolute deviation (1.4826 MAD)."""
    values = np.asarray(values, dtype=np.float64)
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def log_scale(image: np.ndarray, noise_sigma: np.ndarray | float) -> np.ndarray:
    """log10 of each image floored at half its noise sigma, min-max mapped to [-1, 1] per image (float32).

    ``image`` is (..., H, W); ``noise_sigma`` broadcasts against the leading axes.
    """
    image = np.asarray(image, dtype=np.float64)
    floor = 0.5 * np.maximum(np.asarray(noise_sigma, dtype=np.float64), 1e-30)
    logged = np.log10(np.maximum(image, floor[..., None, None] if np.ndim(floor) else floor))
    low = logged.min(axis=(-2, -1), keepdims=True)
    high = logged.max(axis=(-2, -1), keepdims=True)
    return (2.0 * (logged - low) / np.maximum(high - low, 1e-12) - 1.0).astype(np.float32)
