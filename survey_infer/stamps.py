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

from survey_infer.imaging import border_mask, clipped_sky_and_noise, log_scale

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
        r_half = _half_light_radius(values, yy - py, xx - px, flux)
        if r_half < min_r_half_px:
            continue
        sources.append(Source(float(px + box[1].start), float(py + box[0].start), flux, r_half, area))
    return sorted(sources, key=lambda s: -s.flux)[:n_max]


def _half_light_radius(values: np.ndarray, dy: np.ndarray, dx: np.ndarray, flux: float) -> float:
    """The radius about (0, 0) holding half of ``flux``: the growth curve of the pixels at offsets (dy, dx),
    interpolated between pixel radii."""
    radii, ring = np.unique(np.hypot(dy, dx), return_inverse=True)
    growth = np.maximum.accumulate(np.cumsum(np.bincount(ring, weights=values)))  # flux within each radius
    return float(np.interp(0.5 * flux, growth, radii))


def measure_r_half(
    image: np.ndarray, x: float, y: float, *, box_px: int = 128, smooth_sigma: float = 1.5, nsigma: float = 3.0
) -> float:
    """Half-light radius (pixels) of the source at pixel (x, y), NaN where nothing is detected there.

    Measured like :func:`find_bright_sources` but about the given centre: in a ``box_px`` box, sky-subtracted,
    smoothed and thresholded; the segment under the centre (or the nearest within 3 px) is the source.
    """
    cx, cy = int(round(x)), int(round(y))
    half = box_px // 2
    y0, x0 = max(cy - half, 0), max(cx - half, 0)
    box = np.asarray(image[y0 : cy + half + 1, x0 : cx + half + 1], dtype=np.float64)
    finite = np.isfinite(box)
    if finite.sum() < 25:
        return float("nan")
    _, sky, _ = sigma_clipped_stats(box[finite], sigma=3.0)
    data = np.where(finite, box - sky, 0.0)
    smooth = ndimage.gaussian_filter(data, smooth_sigma)
    _, _, smooth_std = sigma_clipped_stats(smooth[finite], sigma=3.0)
    labels, _ = ndimage.label(smooth > nsigma * smooth_std, structure=np.ones((3, 3)))
    py, px = y - y0, x - x0
    yy, xx = np.indices(box.shape)
    near = (labels > 0) & (np.hypot(yy - py, xx - px) <= 3.0)
    if not near.any():
        return float("nan")
    label = labels[near][np.argmin(np.hypot(yy - py, xx - px)[near])]
    segment = labels == label
    values = data[segment]
    flux = float(values.sum())
    if flux <= 0:
        return float("nan")
    return _half_light_radius(values, yy[segment] - py, xx[segment] - px, flux)


def stamp_fov_px(r_half_px: float) -> float:
    """Width in image pixels of the field the simulator would frame a galaxy of this half-light radius in."""
    return FOV_IN_HALF_LIGHT_RADII * r_half_px


def _resample_matrix(n_in: int, n_out: int, low: float = 0.0, high: float | None = None) -> np.ndarray:
    """(n_out, n_in) weights: the fraction of each output pixel covered by each input pixel.

    Input pixel j spans [j, j+1); the output pixels split [low, high) (default: the whole input) evenly, so a
    sub-pixel ``low`` centres the output anywhere. Rows sum to 1 where the output lies on the input.
    """
    high = float(n_in) if high is None else high
    edges_in, edges_out = np.arange(n_in + 1.0), np.linspace(low, high, n_out + 1)
    overlap_low = np.maximum(edges_out[:-1, None], edges_in[None, :-1])
    overlap_high = np.minimum(edges_out[1:, None], edges_in[None, 1:])
    return np.clip(overlap_high - overlap_low, 0.0, None) / ((high - low) / n_out)


def _apply_weights(image: np.ndarray, weights_y: np.ndarray, weights_x: np.ndarray) -> np.ndarray:
    """weights_y @ image @ weights_x.T, NaN wherever a NaN input pixel or no input pixel lies under the output."""
    bad = ~np.isfinite(image)
    out = weights_y @ np.where(bad, 0.0, image) @ weights_x.T
    coverage = weights_y.sum(axis=1)[:, None] * weights_x.sum(axis=1)[None, :]
    out[(weights_y @ bad.astype(np.float64) @ weights_x.T > 1e-9) | (coverage < 1.0 - 1e-9)] = np.nan
    return out


def resample(image: np.ndarray, out_px: int) -> np.ndarray:
    """Area-weighted resampling of a square image to ``out_px`` x ``out_px`` (a block average that allows
    non-integer factors; mean surface brightness is kept, noise is averaged down as in a coarser pixel grid).
    An output pixel is NaN where any input pixel under it is NaN."""
    return _apply_weights(image, _resample_matrix(image.shape[0], out_px), _resample_matrix(image.shape[1], out_px))


def cut_stamp(image: np.ndarray, centre_xy: Any, fov_px: float, out_px: int, wcs: WCS | None = None) -> np.ndarray:
    """A ``fov_px``-wide square about ``centre_xy``, area-resampled to ``out_px`` x ``out_px`` (float64).

    ``centre_xy`` is a 0-based pixel (x, y), or a SkyCoord when ``wcs`` is given. ``Cutout2D`` (mode
    'partial') takes a window a little larger than the field; the field is then resampled about the exact,
    sub-pixel centre (``Cutout2D`` alone would round it to a whole pixel). Output pixels that reach off the
    image are NaN; a field wholly off the image is all NaN.
    """
    size = int(np.ceil(fov_px)) + 2
    try:
        cutout = Cutout2D(np.asarray(image, dtype=np.float64), centre_xy, (size, size), wcs=wcs,
                          mode="partial", fill_value=np.nan, copy=True)  # fmt: skip
    except NoOverlapError:
        return np.full((out_px, out_px), np.nan)
    # The exact centre in the window's 0-based pixels (pixel j spans j-0.5..j+0.5): position_cutout is the
    # whole pixel that holds position_original, the rounded centre.
    x, y = (np.add(cutout.position_cutout, cutout.input_position_original) - cutout.position_original).tolist()
    half = fov_px / 2.0
    weights_y = _resample_matrix(cutout.data.shape[0], out_px, y + 0.5 - half, y + 0.5 + half)
    weights_x = _resample_matrix(cutout.data.shape[1], out_px, x + 0.5 - half, x + 0.5 + half)
    return _apply_weights(cutout.data, weights_y, weights_x)


def off_image_mask(centre_xy: tuple[float, float], fov_px: float, out_px: int, shape: tuple[int, int]) -> np.ndarray:
    """(out_px, out_px) bool: the output pixels of :func:`cut_stamp` that reach beyond an image of ``shape``."""
    edges = np.linspace(-fov_px / 2.0, fov_px / 2.0, out_px + 1)

    def off(centre: float, n: int) -> np.ndarray:
        return (centre + edges[:-1] < -0.5 - 1e-9) | (centre + edges[1:] > n - 0.5 + 1e-9)

    return off(centre_xy[1], shape[0])[:, None] | off(centre_xy[0], shape[1])[None, :]


def prepare_stamp(stamp: np.ndarray, subtract_sky: bool = True, pad: np.ndarray | None = None) -> np.ndarray:
    """One stamp (H, W) as model input: float32 (1, H, W); see :func:`prepare_stamps`."""
    return prepare_stamps(np.asarray(stamp)[None], subtract_sky, None if pad is None else np.asarray(pad)[None])


def prepare_stamps(stamps: np.ndarray, subtract_sky: bool = True, pad: np.ndarray | None = None) -> np.ndarray:
    """Stamps (N, H, W) as model input: float32 (N, H, W) in [-1, 1], NaN where a stamp is NaN.

    The mocks have zero-mean sky, so (by default) the sigma-clipped median of each stamp's border is
    subtracted first; the noise sigma is the MAD sigma of the same finite border pixels. Each stamp is
    :func:`log_scale`-d (the one normalisation of every cutout, simulated or real) with NaN pixels filled by
    the finite median, which are put back to NaN after: a partial stamp still gets a (flagged) image; an
    all-NaN stamp comes back all NaN. Pixels in ``pad`` (bool, e.g. beyond a tile's edge) are instead padded
    with empty sky, which scales to the floor like the mocks' sky. Vectorised over the batch.
    """
    stamps = np.asarray(stamps, dtype=np.float64)
    pad = np.zeros(stamps.shape, dtype=bool) if pad is None else np.asarray(pad, dtype=bool)
    finite = np.isfinite(stamps) & ~pad
    border = border_mask(stamps.shape[1:])
    sky_pixels = np.where(finite[:, border], stamps[:, border], np.nan)  # (N, border pixels)
    no_border = ~np.isfinite(sky_pixels).any(axis=1)
    if no_border.any():  # the border is all NaN or padded: measure on every finite pixel instead
        everywhere = np.where(finite, stamps, np.nan).reshape(len(stamps), -1)
        padding = np.full((len(stamps), everywhere.shape[1] - sky_pixels.shape[1]), np.nan)
        sky_pixels = np.where(no_border[:, None], everywhere, np.concatenate([sky_pixels, padding], axis=1))
    sky, noise = clipped_sky_and_noise(sky_pixels)
    if not subtract_sky:
        sky = np.zeros(len(stamps))
    fill = np.zeros(len(stamps))
    holes = (~finite & ~pad).any(axis=(1, 2)) & finite.any(axis=(1, 2))
    for row in np.flatnonzero(holes):  # NaN pixels inside the data are filled with the finite median
        fill[row] = np.median(stamps[row][finite[row]])
    sky, fill = sky[:, None, None], fill[:, None, None]
    filled = np.where(finite, stamps - sky, fill - sky)
    filled[pad] = 0.0  # empty sky
    filled[~np.isfinite(filled)] = 0.0
    scaled = log_scale(filled, np.nan_to_num(noise, nan=1.0))
    scaled[~finite & ~pad] = np.nan
    scaled[~finite.any(axis=(1, 2))] = np.nan
    return scaled
