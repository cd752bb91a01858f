"""Image preprocessing shared by simulated and real cutouts, so both reach the model in the same form.

The workshop's recipe: log-scale each cutout and map it to [-1, 1]. The floor of the logarithm is half the
sky noise, so empty sky maps to -1 and the scaling does not depend on the flux unit (counts, nanomaggies).
"""

from __future__ import annotations

import numpy as np


def robust_noise_sigma(image: np.ndarray, axes: tuple[int, ...] = (-2, -1)) -> np.ndarray:
    """Sky noise of each image from the median absolute deviation of its border pixels (1.4826 MAD)."""
    image = np.asarray(image, dtype=np.float64)
    height, width = image.shape[-2:]
    band = max(2, min(height, width) // 8)
    mask = np.zeros((height, width), dtype=bool)
    mask[:band], mask[-band:], mask[:, :band], mask[:, -band:] = True, True, True, True
    border = image[..., mask]
    median = np.median(border, axis=-1, keepdims=True)
    return 1.4826 * np.median(np.abs(border - median), axis=-1)


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
