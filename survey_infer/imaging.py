"""Image preprocessing shared by simulated and real cutouts, so both reach the model in the same form.

The workshop's recipe: log-scale each cutout and map it to [-1, 1]. The floor of the logarithm is half the
sky noise, so empty sky maps to -1 and the scaling does not depend on the flux unit (counts, nanomaggies).
"""

from __future__ import annotations

import functools

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


def _range_median(ordered: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Median of each row's ``ordered[row, low:high]`` (rows sorted ascending; NaN where the range is empty)."""
    count = high - low
    left = np.take_along_axis(ordered, np.clip(low + (count - 1) // 2, 0, ordered.shape[1] - 1)[:, None], 1)[:, 0]
    right = np.take_along_axis(ordered, np.clip(low + count // 2, 0, ordered.shape[1] - 1)[:, None], 1)[:, 0]
    return np.where(count > 0, 0.5 * (left + right), np.nan)


def clipped_sky_and_noise(values: np.ndarray, sigma: float = 3.0, max_iters: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``values`` (N, M; NaN = no pixel): the sigma-clipped median (sky) and the MAD sigma (noise).

    The clipping is astropy's ``sigma_clipped_stats`` default (median centre, std width, +-3 sigma, 5
    iterations), done on sorted rows so that a whole batch is clipped at once: the kept values are always a
    contiguous run of a sorted row, so each iteration is a median and a std of a range. Written here because
    ``sigma_clipped_stats(axis=...)`` costs ~0.5-1 ms per cutout, as much as cutting it.
    """
    ordered = np.sort(np.asarray(values, dtype=np.float64), axis=1)  # NaN last
    n_rows = len(ordered)
    low = np.zeros(n_rows, dtype=np.int64)
    high = np.isfinite(ordered).sum(axis=1)
    filled = np.where(np.isfinite(ordered), ordered, 0.0)
    sums = np.concatenate([np.zeros((n_rows, 1)), np.cumsum(filled, axis=1)], axis=1)
    squares = np.concatenate([np.zeros((n_rows, 1)), np.cumsum(filled**2, axis=1)], axis=1)
    rows = np.arange(n_rows)
    valid = np.where(np.isfinite(ordered), ordered, np.inf)
    for _ in range(max_iters):
        count = np.maximum(high - low, 1)
        centre = _range_median(ordered, low, high)
        mean = (sums[rows, high] - sums[rows, low]) / count
        width = np.sqrt(np.maximum((squares[rows, high] - squares[rows, low]) / count - mean**2, 0.0))
        new_low = (valid < (centre - sigma * width)[:, None]).sum(axis=1)
        new_high = (valid <= (centre + sigma * width)[:, None]).sum(axis=1)
        if np.array_equal(new_low, low) and np.array_equal(new_high, high):
            break
        low, high = new_low, new_high
    sky = _range_median(ordered, low, high)
    n_valid = np.isfinite(ordered).sum(axis=1)
    middle = _range_median(ordered, np.zeros(n_rows, dtype=np.int64), n_valid)
    deviations = np.sort(np.abs(ordered - middle[:, None]), axis=1)
    noise = 1.4826 * _range_median(deviations, np.zeros(n_rows, dtype=np.int64), n_valid)
    return sky, noise


# E[log10(2 z) | z > 0.5] for a standard normal z: the mean height above the log floor (half the noise sigma)
# of the sky pixels that log_scale does not floor, in dex. Measured on a cutout's border it gives back the dex
# range that log_scale mapped to [-1, 1], so that the linear light can be recovered up to a constant.
_SKY_Z = np.linspace(0.5, 9.0, 20001)
_SKY_DEX_ABOVE_FLOOR = float(np.trapezoid(np.log10(2 * _SKY_Z) * np.exp(-0.5 * _SKY_Z**2), _SKY_Z)
                             / np.trapezoid(np.exp(-0.5 * _SKY_Z**2), _SKY_Z))  # fmt: skip
FRAMING_RADII = (0.5, 1.0, 1.5, 2.0)  # in units of the framing radius (the cutout's width / 10)
PROFILE_EDGES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0)
LIGHT_STATISTIC_NAMES = tuple(
    [f"light_fraction_lt_{r:g}" for r in FRAMING_RADII] + ["log_dex_range"]
    + [f"log_scaled_mean_{a:g}_{b:g}" for a, b in zip(PROFILE_EDGES[:-1], PROFILE_EDGES[1:])]
)  # fmt: skip


def centred_offsets(shape: tuple[int, int]) -> np.ndarray:
    """(2, H, W) float64: each pixel's (y, x) offset from the image centre (between pixels for even sizes)."""
    h, w = shape
    return np.indices((h, w)) - (np.array([h, w])[:, None, None] - 1) / 2.0


@functools.lru_cache(maxsize=32)
def radial_weights(shape: tuple[int, int], fov_in_radii: float, edges: tuple[float, ...]) -> np.ndarray:
    """(H*W, K) float32 0/1 matrix: column k marks the pixels whose distance from the centre, in framing radii
    (the width / ``fov_in_radii``), lies in [edges[k][0], edges[k][1]). Aperture sums of a whole batch are then one
    matrix product, which is what keeps the per-row statistics cheap on the run's hot path."""
    yy, xx = centred_offsets(shape)
    radius = (np.hypot(xx, yy) / (shape[1] / fov_in_radii)).ravel()
    columns = [(radius >= low) & (radius < high) for low, high in edges]
    weights = np.stack(columns, axis=1).astype(np.float32)
    weights.setflags(write=False)
    return weights


@functools.lru_cache(maxsize=32)
def sky_sample(shape: tuple[int, int], stride: int = 4) -> np.ndarray:
    """Flat indices of every ``stride``-th border pixel: a MAD over a quarter of the border measures the sky noise
    to ~5% at a quarter of the cost of the whole border's (medians dominate the per-row statistics)."""
    indices = np.flatnonzero(border_mask(shape).ravel())[::stride]
    indices.setflags(write=False)
    return indices


def _discs(radii: tuple[float, ...]) -> tuple[tuple[float, float], ...]:
    return tuple((0.0, r) for r in radii)


@functools.lru_cache(maxsize=32)
def _light_layout(shape: tuple[int, int], fov_in_radii: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where `light_statistics` looks: the border's flat indices, the indices of the pixels within 4 framing
    radii with their disc weights (< 0.5, 1, 1.5, 2, 4), and the annuli's weights over the whole image."""
    border = np.flatnonzero(border_mask(shape).ravel())
    discs = radial_weights(shape, fov_in_radii, _discs(FRAMING_RADII + (4.0,)))
    inner = np.flatnonzero(discs[:, -1] > 0)
    rings = radial_weights(shape, fov_in_radii, tuple(zip(PROFILE_EDGES[:-1], PROFILE_EDGES[1:])))
    ring_means = rings / rings.sum(axis=0)
    return border, inner, np.ascontiguousarray(discs[inner]), ring_means.astype(np.float32)


def light_statistics(images: np.ndarray, fov_in_radii: float = 10.0) -> np.ndarray:
    """How a log-scaled cutout's light is laid out for its framing (N, 12) float32.

    A cutout framed ``fov_in_radii`` half-light radii across puts half a galaxy's intrinsic light inside one
    framing radius; seeing only spreads it. So the fraction of the (recovered linear) light within 0.5, 1, 1.5 and
    2 framing radii (of that within 4), the dex range the log scaling spanned, and the mean log-scaled value in
    seven annuli describe what a galaxy of that framing can look like; a point source framed by its own size
    is too concentrated. Uses the first band. Runs on every row of a run: each step touches only the pixels it
    needs (the border, the inner 4 radii) and aperture sums are matrix products.
    """
    x = np.asarray(images, dtype=np.float32)[:, 0]
    n, h, w = x.shape
    border_idx, inner_idx, disc_weights, ring_means = _light_layout((h, w), float(fov_in_radii))
    flat = x.reshape(n, h * w)
    border = flat[:, border_idx] + np.float32(1.0)  # sky pixels lifted so that the floor (-1) is 0
    lifted = (border > np.float32(0.001)).astype(np.float32)  # 0/1 products: np.where here cost 5x as much
    mean_lift = (lifted * border).sum(axis=1) / np.maximum(lifted.sum(axis=1), 1.0)
    dex_range = 2.0 * _SKY_DEX_ABOVE_FLOOR / np.maximum(mean_lift.astype(np.float64), 1e-3)
    inner = flat[:, inner_idx] + np.float32(1.0)
    rate = (np.log(10.0) * dex_range / 2.0).astype(np.float32)[:, None]
    light = np.exp(np.minimum(inner * rate, np.float32(30 * np.log(10)))) * (inner > np.float32(0.001))  # floor: none
    discs = light @ disc_weights  # (N, 5): within 0.5, 1, 1.5, 2, 4 radii
    fractions = discs[:, :-1].astype(np.float64) / np.maximum(discs[:, -1:].astype(np.float64), 1e-30)
    annuli = flat @ ring_means
    return np.column_stack([fractions, np.log10(dex_range), annuli]).astype(np.float32)


SB_STATISTIC_BANDS = 5
ELLIPTICITY_RADIUS = 2.0  # framing radii: the middle band's second moments are taken inside this disc
_LOGIT_EPS = 1e-3  # light fractions are clipped to [eps, 1 - eps] before the logit (noise can push them past 0 or 1)
SB_STATISTIC_NAMES = tuple(
    [f"log_snr_band{k}" for k in range(SB_STATISTIC_BANDS)]
    + [f"logit_light_fraction_lt_{r:g}" for r in FRAMING_RADII]
    + [f"colour_{k}_{k + 1}" for k in range(SB_STATISTIC_BANDS - 1)]
    + [f"sqrt_ellipticity_lt_{ELLIPTICITY_RADIUS:g}"]
)  # fmt: skip


@functools.lru_cache(maxsize=32)
def _sb_weights(shape: tuple[int, int], fov_in_radii: float) -> np.ndarray:
    """(H*W, 8) float32 weights of `surface_brightness_statistics`: the discs < 0.5, 1, 1.5, 2 and 4 framing
    radii, then x^2 + y^2, x^2 - y^2 and 2xy (in framing radii) inside ELLIPTICITY_RADIUS: every aperture sum and
    second moment of a batch is one matrix product."""
    yy, xx = centred_offsets(shape)
    scale = shape[1] / fov_in_radii  # pixels a framing radius
    x, y = (xx / scale).ravel(), (yy / scale).ravel()
    inside = np.hypot(x, y) < ELLIPTICITY_RADIUS
    moments = np.stack([inside * (x * x + y * y), inside * (x * x - y * y), inside * 2.0 * x * y], axis=1)
    discs = radial_weights(shape, fov_in_radii, _discs(FRAMING_RADII + (4.0,)))
    weights = np.ascontiguousarray(np.concatenate([discs, moments.astype(np.float32)], axis=1))
    weights.setflags(write=False)
    return weights


def surface_brightness_statistics(images: np.ndarray, fov_in_radii: float = 10.0) -> np.ndarray:
    """What a linear, sky-subtracted multi-band cutout (N, 5, H, W) holds for its framing (N, 14) float32.

    Per band, log10 of the S/N of the light inside 2 framing radii (noise: MAD of `sky_sample`): a source
    or none; in the middle band, the logit of the fraction of the light within 0.5, 1, 1.5 and 2 framing radii of
    that within 4 (a star framed by its own size is too concentrated for a galaxy of that framing, see
    `light_statistics`; the logit spreads the fractions' crowded ends, near 1 where such a star lies, so that the
    galaxies' values are closer to Gaussian for the score's single ellipsoid); the colours (-2.5 log10 of
    neighbouring bands' central fluxes, clipped to +-5 mag): the populations; and the square root of the middle
    band's second-moment ellipticity |(Qxx - Qyy, 2 Qxy)| / (Qxx + Qyy) inside 2 framing radii, clipped to [0, 1]
    (the root makes the galaxies' inclination-spread values closer to Gaussian): a star is round, most galaxies
    are not. Runs on every row of a run: the aperture sums and moments are one matrix product (`_sb_weights`) and
    the noise two partitions of the sample (~0.03 ms a row of 5 x 64 x 64 on one core).
    """
    x = np.asarray(images, dtype=np.float32)
    n, c, h, w = x.shape
    if c != SB_STATISTIC_BANDS:
        raise ValueError(f"surface_brightness_statistics needs {SB_STATISTIC_BANDS} bands; got {c}")
    sample = np.take(x.reshape(n * c, h * w), sky_sample((h, w)), axis=1)  # contiguous (N*C, M): partitions are fast
    middle = sample.shape[1] // 2
    sample.partition(middle, axis=1)
    deviation = np.abs(sample - sample[:, middle : middle + 1])
    deviation.partition(middle, axis=1)
    sigma = 1.4826 * deviation[:, middle].astype(np.float64).reshape(n, c)  # (N, C) MAD sigma
    weights = _sb_weights((h, w), float(fov_in_radii))
    sums = (x.reshape(n * c, h * w) @ weights).astype(np.float64).reshape(n, c, -1)  # (N, C, 8)
    snr = sums[:, :, 3] / np.maximum(sigma * np.sqrt(weights[:, 3].sum()), 1e-30)
    mid = sums[:, c // 2]
    fractions = np.clip(mid[:, :4] / np.maximum(np.abs(mid[:, 4:5]), 1e-30), _LOGIT_EPS, 1.0 - _LOGIT_EPS)
    central = np.maximum(sums[:, :, 1], 1e-30)
    colours = np.clip(-2.5 * np.log10(central[:, :-1] / central[:, 1:]), -5.0, 5.0)
    ellipticity = np.clip(np.hypot(mid[:, 6], mid[:, 7]) / np.maximum(mid[:, 5], 1e-30), 0.0, 1.0)
    return np.column_stack([np.log10(np.maximum(snr, 1e-3)), np.log(fractions / (1.0 - fractions)), colours,
                            np.sqrt(ellipticity)]).astype(np.float32)  # fmt: skip


def asinh_transform(images: np.ndarray, softening: np.ndarray | list[float]) -> np.ndarray:
    """``asinh(flux / softening_band)`` of a batch (N, C, H, W) -> float32: the input scaling of the networks that
    read linear fluxes or surface brightness (star_clusters, property_maps)."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W); got shape {images.shape}")
    soft = np.asarray(softening, dtype=np.float32)
    if soft.shape != (images.shape[1],) or not np.all(soft > 0):
        raise ValueError(f"softening must be {images.shape[1]} positive values (one per band); got {softening}")
    scaled = np.divide(images, soft[None, :, None, None], dtype=np.float32)  # a new float32 array
    return np.arcsinh(scaled, out=scaled)  # in place: half the cost of a second temporary on every row of a run
