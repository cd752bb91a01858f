"""Synthetic survey tiles: multi-band FITS images with a TAN WCS and galaxies at known sky positions.

For tests and benchmarks of the `tiles` store. Each galaxy is an elliptical Sersic profile (n 1-4, r_half
1-4 arcsec) at a sub-pixel position, rendered 3x3-subsampled, seen through a Gaussian PSF (FWHM 1.4"),
in nanomaggies on SDSS-like 0.396"/px pixels with sky and Poisson noise (SDSS r-band e-/nanomaggy). Tiles
overlap, and the source catalog also holds sources on no tile and near edges, so the ingest's assignment
and the run's edge padding are exercised. Truth: the pixel position on every tile and the half-light radius.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy import ndimage
from scipy.special import gammaincinv

PIXEL_SCALE = 0.396  # arcsec/px, SDSS
PSF_FWHM = 1.4  # arcsec
NMGY_PER_COUNT = 0.0048  # SDSS r, the frame's NMGY keyword
SKY_SIGMA = {"g": 0.025, "r": 0.035, "i": 0.05, "u": 0.06, "z": 0.1}  # nanomaggies per pixel
COLOUR = {"u": 0.25, "g": 0.6, "r": 1.0, "i": 1.3, "z": 1.5}  # flux relative to r


@dataclass(frozen=True)
class TileLayout:
    """Where the tiles of a mock field lie: a row of square tiles overlapping by ``overlap_px``."""

    n_tiles: int = 2
    size_px: int = 512
    overlap_px: int = 64
    ra0: float = 150.0
    dec0: float = 2.0

    def wcs(self, index: int) -> WCS:
        wcs = WCS(naxis=2)
        wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        wcs.wcs.crval = [self.ra0, self.dec0]
        shift = index * (self.size_px - self.overlap_px)
        wcs.wcs.crpix = [1.0 - shift, 1.0]  # every tile on one tangent plane, shifted along x
        scale = PIXEL_SCALE / 3600.0
        wcs.wcs.cd = [[-scale, 0.0], [0.0, scale]]
        return wcs

    def field_wcs(self) -> WCS:
        return self.wcs(0)

    @property
    def field_shape(self) -> tuple[int, int]:
        return self.size_px, self.n_tiles * (self.size_px - self.overlap_px) + self.overlap_px


def _sersic_image(shape, x, y, r_half_px, n, q, theta, flux, oversample: int = 3) -> np.ndarray:
    """A Sersic profile of total ``flux`` centred at pixel (x, y), integrated over pixels by subsampling."""
    ny, nx = shape
    sub = (np.arange(ny * oversample) + 0.5) / oversample - 0.5, (np.arange(nx * oversample) + 0.5) / oversample - 0.5
    yy, xx = np.meshgrid(sub[0] - y, sub[1] - x, indexing="ij")
    c, s = np.cos(theta), np.sin(theta)
    major, minor = xx * c + yy * s, -xx * s + yy * c
    radius = np.hypot(major, minor / q)
    b = gammaincinv(2 * n, 0.5)
    profile = np.exp(-b * (radius / r_half_px) ** (1.0 / n))
    image = profile.reshape(ny, oversample, nx, oversample).mean(axis=(1, 3))
    return flux * image / image.sum()


def write_mock_tiles(
    directory: str | Path,
    *,
    layout: TileLayout = TileLayout(),
    n_sources: int = 60,
    bands: tuple[str, ...] = ("g", "r", "i"),
    n_off_tile: int = 3,
    seed: int = 0,
) -> dict:
    """Write ``tile-<k>_<band>.fits`` for every tile and band and ``sources.ecsv`` under ``directory``.

    Returns ``{"tiles": [{band: path}], "sources": path}``: the arguments of the tiles ingest. The sources
    table has object_id, ra, dec, r_half_arcsec (the truth) and x_field, y_field (pixel on tile 0's plane).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    field_ny, field_nx = layout.field_shape
    x = rng.uniform(-4, field_nx + 3, n_sources)  # a few just past the edges: padded cutouts
    y = rng.uniform(-4, field_ny + 3, n_sources)
    r_half_arcsec = rng.uniform(1.0, 4.0, n_sources)
    sersic_n = rng.uniform(1.0, 4.0, n_sources)
    q, theta = rng.uniform(0.3, 1.0, n_sources), rng.uniform(0, np.pi, n_sources)
    mag_r = rng.uniform(15.0, 17.5, n_sources)
    flux_r = 10 ** (-0.4 * (mag_r - 22.5))

    truth_pixels = np.zeros((field_ny, field_nx), np.float64)
    psf_sigma = PSF_FWHM / PIXEL_SCALE / 2.3548
    for i in range(n_sources):  # each galaxy in a box of +-8 r_half around it
        r_px = r_half_arcsec[i] / PIXEL_SCALE
        half = int(np.ceil(8 * r_px + 4 * psf_sigma))
        x0, y0 = int(np.floor(x[i])) - half, int(np.floor(y[i])) - half
        box = _sersic_image((2 * half + 1, 2 * half + 1), x[i] - x0, y[i] - y0, r_px, sersic_n[i], q[i], theta[i], flux_r[i])
        box = ndimage.gaussian_filter(box, psf_sigma, mode="constant")
        ys, xs = slice(max(y0, 0), min(y0 + box.shape[0], field_ny)), slice(max(x0, 0), min(x0 + box.shape[1], field_nx))
        if ys.start < ys.stop and xs.start < xs.stop:
            truth_pixels[ys, xs] += box[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]

    tiles = []
    for index in range(layout.n_tiles):
        x_start = index * (layout.size_px - layout.overlap_px)
        files = {}
        for band in bands:
            signal = COLOUR[band] * truth_pixels[:, x_start : x_start + layout.size_px]
            noise = rng.normal(0.0, 1.0, signal.shape) * np.sqrt(SKY_SIGMA[band] ** 2 + NMGY_PER_COUNT * signal)
            header = layout.wcs(index).to_header()
            header["BUNIT"] = "nanomaggy"
            header["NMGY"] = NMGY_PER_COUNT
            path = directory / f"tile-{index}_{band}.fits"
            fits.PrimaryHDU((signal + noise).astype(np.float32), header=header).writeto(path, overwrite=True)
            files[band] = str(path)
        tiles.append(files)

    world = layout.field_wcs().pixel_to_world_values(x, y)
    far_ra = layout.ra0 + rng.uniform(1.0, 2.0, n_off_tile)  # degrees away from every tile
    sources = Table(
        {
            "object_id": np.arange(1, n_sources + n_off_tile + 1, dtype=np.int64),
            "ra": np.concatenate([world[0], far_ra]),
            "dec": np.concatenate([world[1], np.full(n_off_tile, layout.dec0)]),
            "r_half_arcsec": np.concatenate([r_half_arcsec, np.full(n_off_tile, 2.0)]),
            "x_field": np.concatenate([x, np.full(n_off_tile, np.nan)]),
            "y_field": np.concatenate([y, np.full(n_off_tile, np.nan)]),
        }
    )
    sources["ra"].unit = sources["dec"].unit = "deg"
    sources["r_half_arcsec"].unit = "arcsec"
    catalog = directory / "sources.ecsv"
    sources.write(catalog, overwrite=True)
    return {"tiles": tiles, "sources": str(catalog)}
