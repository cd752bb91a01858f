"""Model-ready stamps from real survey images, framed the way the simulator frames its mocks.

The simulator (``training.sim.universe``) renders each galaxy centred on a square field
``FOV_IN_HALF_LIGHT_RADII`` half-light radii across, resamples it to the model's pixel grid, and log-scales it
(:mod:`survey_infer.imaging`). For a real image the steps are:

1. :func:`read_fits_image` - pixels (float64) and WCS; ``.fits.bz2``/``.gz`` are read directly.
2. :func:`find_bright_sources` - bright extended sources with a pixel centre and half-light radius.
3. :func:`cut_stamp` - a cutout ``stamp_fov_px(r_half)`` pixels across, area-resampled to ``out_px``;
   where it runs off the image the pixels are NaN.
4. :func:`prepare_stamp` - local sky subtracted, noise estimated, log-scaled to [-1, 1] as float32
   (1, H, W); NaN pixels stay NaN so the task's row flags (``nan_pixels``/``empty_cutout``) catch them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.nddata import Cutout2D, NoOverlapError
from astropy.stats import sigma_clipped_stats
from astropy.wcs import WCS, FITSFixedWarning
from scipy import ndimage

from survey_infer.imaging import border_mask, log_scale, mad_sigma

# Full width of a stamp in half-light radii. Must equal the simulator's constant of the same name (the
# training mocks' framing): a galaxy framed differently looks bigger or smaller to the model than in training.
FOV_IN_HALF_LIGHT_RADII = 10.0


@dataclass(frozen=True)
class Source:
    """A detected source: pixel centre (0-based, x = column), sky-subtracted flux, size and footprint."""

    x: float
    y: float
    flux: float
    r_half_px: float
    area_px: int


def read_fits_image(path: str | Path, hdu: int | str = 0) -> tuple[np.ndarray, WCS]:
    """Pixels (float64, native byte order) and celestial WCS of one image HDU."""
    with fits.open(path) as hdul:
        header = hdul[hdu].header
        data = np.array(hdul[hdu].data, dtype=np.float64)
    with warnings.catch_warnings():  # SDSS headers: deprecated RADECSYS, MJD-OBS from DATE-OBS
        warnings.simplefilter("ignore", FITSFixedWarning)
        return data, WCS(header).celestial


def find_bright_sources(
    image: np.ndarray,
    n_max: int = 10,
    *,
    smooth_sigma: float = 1.5,
    nsigma: float = 3.0,
    min_area_px: int = 50,
    min_r_half_px: float = 1.5,
    min_extent_px: float = 8.0,
) -> list[Source]:
    """The ``n_max`` brightest extended sources, brightest first.

    The image is sky-subtracted (sigma-clipped median), smoothed with a Gaussian of ``smooth_sigma`` pixels,
    thresholded at ``nsigma`` times the smoothed image's clipped std and labelled (8-connected). Each segment's
    centre is its smoothed peak; its flux is the sum of its sky-subtracted pixels; ``r_half_px`` is the radius
    about the centre holding half of that flux (interpolated between pixel radii; measured inside the
    segment, so an underestimate for large galaxies whose outskirts fall below the threshold). A segment is
    kept as extended when its area, ``r_half_px`` and flux / peak pixel (an effective area: ~2-5 px for SDSS
    stars) pass the minimum values. Bright stars with broad halos or spikes can still pass; blends of
    several sources give one segment.
    """
    image = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(image)
    _, sky, _ = sigma_clipped_stats(image[finite], sigma=3.0)
    data = np.where(finite, image - sky, 0.0)
    smooth = ndimage.gaussian_filter(data, smooth_sigma)
    _, _, smooth_std = sigma_clipped_stats(smooth[finite], sigma=3.0)
    labels, _ = ndimage.label(smooth > nsigma * smooth_std, structure=np.ones((3, 3)))
    sources = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        segment = labels[box] == index
        area = int(segment.sum())
        if area < min_area_px:
            continue
        values = data[box][segment]
        flux = float(values.sum())
        py, px = np.unravel_index(np.argmax(np.where(segment, smooth[box], -np.inf)), segment.shape)
        peak = float(data[box][py, px])
        if flux <= 0 or peak <= 0 or flux / peak < min_extent_px:
            continue
        yy, xx = np.nonzero(segment)
        radii, ring = np.unique(np.hypot(yy - py, xx - px), return_inverse=True)
        growth = np.maximum.accumulate(np.cumsum(np.bincount(ring, weights=values)))  # flux within each radius
        r_half = float(np.interp(0.5 * flux, growth, radii))
        if r_half < min_r_half_px:
            continue
        sources.append(Source(float(px + box[1].start), float(py + box[0].start), flux, r_half, area))
    return sorted(sources, key=lambda s: -s.flux)[:n_max]


def stamp_fov_px(r_half_px: float) -> float:
    """Width in image pixels of the field the simulator would frame a galaxy of this half-light radius in."""
    return FOV_IN_HALF_LIGHT_RADII * r_half_px


def _resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights: the fraction of each output pixel covered by each input pixel (rows sum to 1)."""
    edges_in, edges_out = np.arange(n_in + 1.0), np.linspace(0.0, n_in, n_out + 1)
    low = np.maximum(edges_out[:-1, None], edges_in[None, :-1])
    high = np.minimum(edges_out[1:, None], edges_in[None, 1:])
    return np.clip(high - low, 0.0, None) / (n_in / n_out)


def resample(image: np.ndarray, out_px: int) -> np.ndarray:
    """Area-weighted resampling of a square image to ``out_px`` x ``out_px`` (a block average that allows
    non-integer factors; mean surface brightness is kept, noise is averaged down as in a coarser pixel grid).
    An output pixel is NaN where any input pixel under it is NaN."""
    weights = _resample_matrix(image.shape[0], out_px), _resample_matrix(image.shape[1], out_px)
    bad = ~np.isfinite(image)
    out = weights[0] @ np.where(bad, 0.0, image) @ weights[1].T
    out[weights[0] @ bad.astype(np.float64) @ weights[1].T > 1e-9] = np.nan
    return out


def cut_stamp(image: np.ndarray, centre_xy: Any, fov_px: float, out_px: int, wcs: WCS | None = None) -> np.ndarray:
    """A ``fov_px``-wide square cutout about ``centre_xy`` resampled to ``out_px`` x ``out_px`` (float64).

    ``centre_xy`` is a 0-based pixel (x, y), or a SkyCoord when ``wcs`` is given. Uses ``Cutout2D`` with
    mode='partial': the part off the image is NaN, and a cutout wholly off the image is all NaN.
    """
    size = max(1, int(round(fov_px)))
    try:
        data = Cutout2D(np.asarray(image, dtype=np.float64), centre_xy, (size, size), wcs=wcs,
                        mode="partial", fill_value=np.nan, copy=True).data  # fmt: skip
    except NoOverlapError:
        return np.full((out_px, out_px), np.nan)
    return resample(data, out_px)


def prepare_stamp(stamp: np.ndarray, subtract_sky: bool = True) -> np.ndarray:
    """A stamp (H, W) as model input: float32 (1, H, W) in [-1, 1], NaN where the stamp is NaN.

    The mocks have zero-mean sky, so (by default) the sigma-clipped median of the stamp's border is
    subtracted first; the noise sigma is the MAD sigma of the same finite border pixels. The stamp is
    :func:`log_scale`-d with NaN pixels filled by the finite median, which are put back to NaN after: a
    partial stamp still gets a (flagged) image; an all-NaN stamp comes back all NaN.
    """
    stamp = np.asarray(stamp, dtype=np.float64)
    finite = np.isfinite(stamp)
    if not finite.any():
        return np.full((1, *stamp.shape), np.nan, dtype=np.float32)
    border = border_mask(stamp.shape) & finite
    sky_pixels = stamp[border] if border.any() else stamp[finite]
    sky = sigma_clipped_stats(sky_pixels, sigma=3.0)[1] if subtract_sky else 0.0
    filled = np.where(finite, stamp - sky, np.median(stamp[finite]) - sky)
    scaled = log_scale(filled, mad_sigma(sky_pixels))
    scaled[~finite] = np.nan
    return scaled[None]
