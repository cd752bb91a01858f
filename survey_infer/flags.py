"""Row flags: a bit per reason, so a row that cannot be (fully) processed is kept and explained."""

from __future__ import annotations

import numpy as np

FLAG_BITS: dict[str, int] = {
    "nan_pixels": 1,  # the cutout holds NaN or infinite pixels: no estimate
    "empty_cutout": 2,  # the cutout is constant (blank, zero-filled or saturated): no estimate
    "missing_metadata": 4,  # a per-object input the model uses is missing; filled with its training mean
    "no_luminosity": 8,  # no luminosity given: quantities that need it are null
    "off_tile": 16,  # the source lies off every tile
    "edge_padded": 32,  # the cutout was padded at a tile edge
    "missing_band": 64,  # a band the model needs is missing
    "out_of_range": 128,  # an input lies outside the range the model was trained on
    "no_size": 256,  # no half-light radius given or measurable: the cutout cannot be framed like the training data
    # ood_score above the run's threshold: unlike the training mocks, so the estimate (kept) may be unreliable
    "ood": 512,
    "few_stars": 1024,  # kinematics: too few stars with usable velocities for an estimate
}
NO_ESTIMATE = FLAG_BITS["nan_pixels"] | FLAG_BITS["empty_cutout"] | FLAG_BITS["off_tile"] | FLAG_BITS["missing_band"] | FLAG_BITS["no_size"] | FLAG_BITS["few_stars"]


def flag_reasons(flags: np.ndarray) -> list[str]:
    """Comma-separated reason names for each row ('' where the flag is 0)."""
    names = list(FLAG_BITS.items())
    cache: dict[int, str] = {}
    out = []
    for value in np.asarray(flags, dtype=np.int64).tolist():
        if value not in cache:
            cache[value] = ",".join(name for name, bit in names if value & bit)
        out.append(cache[value])
    return out


def image_flags(images: np.ndarray) -> np.ndarray:
    """Flag NaN/inf and constant cutouts: a batch (N, C, H, W) -> int32 flags (N,).

    Two plain reductions per row (min and max propagate NaN and inf) decide almost every row; only rows with a
    non-finite pixel take the slow, NaN-aware path. This runs on every batch, so it is kept cheap.
    """
    flat = images.reshape(len(images), -1)
    flags = np.zeros(len(flat), dtype=np.int32)
    if not flat.shape[1]:
        return flags | FLAG_BITS["empty_cutout"]
    low, high = flat.min(axis=1), flat.max(axis=1)
    finite = np.isfinite(low) & np.isfinite(high)
    flags[finite & (low == high)] = FLAG_BITS["empty_cutout"]
    bad = np.flatnonzero(~finite)
    if bad.size:
        flags[bad] = FLAG_BITS["nan_pixels"]
        all_nan = ~np.isfinite(flat[bad]).any(axis=1)
        flags[bad[all_nan]] |= FLAG_BITS["empty_cutout"]
    return flags
