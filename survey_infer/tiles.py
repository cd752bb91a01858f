"""The `tiles` store: multi-band survey images with WCS and a source catalog; cutouts are cut on the fly.

Layout (a Zarr v3 group, attrs ``{"survey_infer": {"format": 1, "kind": "tiles"}}``, ``bands``, ``tiles``):

- ``tiles/<tile_id>/image``: (C, Y, X) float32, the bands of one tile on one pixel grid. Its attrs hold
  ``wcs`` (the FITS header cards of the celestial WCS), ``bands``, ``files`` (where each band was read from),
  ``bunit`` and ``zero_points`` (the header keywords found, per band) and ``pixel_scale_arcsec``.
- ``sources/<column>``: 1-D arrays: ``object_id``, ``ra``, ``dec`` (deg), ``tile`` (int32 index into the
  ``tiles`` attr; -1 for a source on no tile), ``x``, ``y`` (0-based pixel centre on its tile), optional
  ``r_half_arcsec``, and any columns kept from the catalog.

Sources are sorted by tile (those on no tile last, kept and flagged ``off_tile``, never dropped) and by ``y``
within a tile, so one tile's sources are one contiguous row range: one unit of work. A run cuts each source's
cutout from its tile at the bundle's framing (:class:`CutSpec`), resampled to the bundle's pixel grid, and
prepares it with :func:`survey_infer.stamps.prepare_stamp`, the same log scaling as every cutout.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_scales
from zarr.codecs import BloscCodec

from survey_infer.errors import StoreError
from survey_infer.flags import FLAG_BITS
from survey_infer.stamps import cut_stamp, measure_r_half, off_image_mask, prepare_stamps
from survey_infer.store import STORE_FORMAT, open_store, store_fingerprint

TILES_GROUP = "tiles"
SOURCES_GROUP = "sources"
IMAGE_ARRAY = "image"
OFF_TILE = -1
TILE_CHUNK = 512
SIZE_COLUMN = "r_half_arcsec"
ZERO_POINT_KEYS = ("MAGZP", "MAGZERO", "ZEROPT", "ZP", "PHOTZP", "NMGY", "FLUXMAG0")
CATALOG_FORMATS = {".fits": "fits", ".fit": "fits", ".ecsv": "ascii.ecsv", ".csv": "ascii.csv", ".parquet": "parquet"}
GRID_TOLERANCE_PX = 0.01
MEASURE_BOX_PX = 128  # the box a source's half-light radius is measured in, when the catalog gives none


# ---------------------------------------------------------------------------------------------- reading FITS


@dataclass
class BandImage:
    """One band of a tile as read from FITS: pixels, WCS, shape and what the header says about units."""

    band: str
    source: str
    data: np.ndarray
    wcs: WCS
    bunit: str | None
    zero_points: dict[str, float]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]


def parse_images_spec(spec: str) -> dict[str, str]:
    """``'g=a_g.fits,r=a_r.fits[1]'`` -> ``{'g': 'a_g.fits', 'r': 'a_r.fits[1]'}`` (band order kept)."""
    bands: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        band, sep, path = item.partition("=")
        if not sep or not band.strip() or not path.strip():
            raise StoreError(f"--images item {item!r} is not BAND=FILE (e.g. 'g=tile_g.fits,r=tile_r.fits')")
        if band.strip() in bands:
            raise StoreError(f"--images {spec!r} names band {band.strip()!r} twice")
        bands[band.strip()] = path.strip()
    if not bands:
        raise StoreError(f"--images {spec!r} names no band; BAND=FILE[,BAND=FILE...] was expected")
    return bands


def _split_hdu(path_spec: str) -> tuple[str, int | str | None]:
    match = re.fullmatch(r"(.+)\[([^\]]+)\]", path_spec)
    if not match:
        return path_spec, None
    hdu = match.group(2)
    return match.group(1), int(hdu) if hdu.lstrip("-").isdigit() else hdu


def _image_hdu(hdul: fits.HDUList, hdu: int | str | None, path: str) -> fits.ImageHDU | fits.PrimaryHDU:
    """The HDU asked for, or the first one holding a 2-D image (compressed HDUs included)."""
    if hdu is not None:
        try:
            return hdul[hdu]
        except (KeyError, IndexError) as exc:
            raise StoreError(f"{path} has no HDU {hdu!r} (it has {len(hdul)} HDUs)") from exc
    for candidate in hdul:
        if candidate.is_image and candidate.data is not None and np.squeeze(candidate.data).ndim == 2:
            return candidate
    raise StoreError(f"{path} has no HDU holding a 2-D image")


def read_band(band: str, path_spec: str) -> BandImage:
    """Read one band's image and WCS (``.fits``, ``.fits.gz``/``.bz2``, tile-compressed; ``FILE[HDU]``)."""
    path, hdu = _split_hdu(path_spec)
    if not Path(path).is_file():
        raise StoreError(f"band {band}: file {path} does not exist")
    try:
        with fits.open(path) as hdul:
            image_hdu = _image_hdu(hdul, hdu, path)
            header = image_hdu.header.copy()
            data = np.squeeze(np.asarray(image_hdu.data, dtype=np.float32))
            name = f"{path}[{image_hdu.name or hdul.index_of(image_hdu)}]"
    except OSError as exc:
        raise StoreError(f"band {band}: {path} is not a readable FITS file: {exc}") from exc
    if data.ndim != 2:
        raise StoreError(f"band {band}: {name} holds an image of shape {data.shape}; a 2-D image was expected")
    zero_points = {key: float(header[key]) for key in ZERO_POINT_KEYS if isinstance(header.get(key), (int, float))}
    return BandImage(band, name, data, celestial_wcs(header, f"band {band}: {name}"), header.get("BUNIT"), zero_points)


def celestial_wcs(header: fits.Header, where: str) -> WCS:
    """The header's celestial WCS, refused when absent, not celestial or not invertible."""
    if not any(key.startswith("CTYPE") for key in header):
        raise StoreError(f"{where} has no WCS (no CTYPEn keywords); a celestial WCS (e.g. RA---TAN/DEC--TAN) is needed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(header)
        except Exception as exc:  # astropy raises several types for malformed WCS
            raise StoreError(f"{where} has a WCS astropy cannot read: {exc}") from exc
    if not wcs.has_celestial:
        ctypes = [header.get(f"CTYPE{i}") for i in range(1, wcs.naxis + 1)]
        raise StoreError(f"{where} has a non-celestial WCS (CTYPE {ctypes}); RA/Dec axes are needed")
    wcs = wcs.celestial
    probe = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [37.5, 61.25]])
    with np.errstate(all="ignore"):
        try:
            back = wcs.wcs_world2pix(wcs.wcs_pix2world(probe, 0), 0)
        except Exception as exc:
            raise StoreError(f"{where} has a WCS that cannot be inverted: {exc}") from exc
    if not np.all(np.isfinite(back)) or np.abs(back - probe).max() > GRID_TOLERANCE_PX:
        raise StoreError(f"{where} has a WCS that does not invert (pixel -> sky -> pixel misses by > 0.01 px)")
    return wcs


def grid_offset_px(reference: BandImage, other: BandImage) -> float:
    """Largest offset (pixels) between two bands' grids at the reference's corners and centre; inf if the
    shapes differ."""
    if reference.shape != other.shape:
        return float("inf")
    ny, nx = reference.shape
    probe = np.array([[0, 0], [nx - 1, 0], [0, ny - 1], [nx - 1, ny - 1], [(nx - 1) / 2, (ny - 1) / 2]], float)
    with np.errstate(all="ignore"):
        moved = other.wcs.wcs_world2pix(reference.wcs.wcs_pix2world(probe, 0), 0)
    offset = np.abs(moved - probe).max()
    return float(offset) if np.isfinite(offset) else float("inf")


def _reproject(reference: BandImage, other: BandImage) -> BandImage:
    try:
        from reproject import reproject_interp
    except ImportError as exc:  # an optional extra
        raise StoreError("--reproject needs the 'reproject' package: pip install 'survey-infer[tiles]'") from exc
    data, footprint = reproject_interp((other.data, other.wcs), reference.wcs, shape_out=reference.shape)
    data = np.where(footprint > 0, data, np.nan).astype(np.float32)
    return BandImage(other.band, other.source + " (reprojected)", data, reference.wcs, other.bunit, other.zero_points)


def read_tile(images: dict[str, str], *, reproject: bool = False) -> list[BandImage]:
    """Read every band of one tile; bands on another pixel grid are refused (naming them) or reprojected."""
    bands = [read_band(band, path) for band, path in images.items()]
    reference = bands[0]
    for index, other in enumerate(bands[1:], start=1):
        offset = grid_offset_px(reference, other)
        if offset <= GRID_TOLERANCE_PX:
            continue
        if not reproject:
            what = f"shape {other.shape} against {reference.shape}" if other.shape != reference.shape else \
                f"a WCS offset by {offset:.3g} px"  # fmt: skip
            raise StoreError(
                f"band {other.band} ({other.source}) is not on band {reference.band}'s pixel grid ({what}); "
                f"give bands of one tile on one grid, or pass --reproject to resample them onto band {reference.band}'s"
            )
        bands[index] = _reproject(reference, other)
    return bands


# --------------------------------------------------------------------------------------- the source catalog


def _column(table: Table, spec: str, path: Path) -> np.ndarray:
    """A catalog column by name, or one element of a vector column as ``NAME[i]`` (e.g. ``petroR50[1]``)."""
    match = re.fullmatch(r"(.+)\[(\d+)\]", spec)
    name, index = (match.group(1), int(match.group(2))) if match else (spec, None)
    if name not in table.colnames:
        raise StoreError(f"source catalog {path} has no column {name!r}; it has {', '.join(table.colnames)}")
    column = table[name]
    values = column.quantity if getattr(column, "unit", None) is not None else column
    values = np.ma.filled(np.asanyarray(values), np.nan) if np.ma.isMaskedArray(values) else values
    if index is not None:
        if np.ndim(values) != 2 or index >= np.shape(values)[1]:
            raise StoreError(f"column {name!r} of {path} has shape {np.shape(values)}; {spec} needs a vector column")
        values = values[:, index]
    return values


def _degrees(values: Any, name: str, path: Path) -> np.ndarray:
    if isinstance(values, u.Quantity):
        try:
            return values.to_value(u.deg).astype(np.float64)
        except u.UnitConversionError as exc:
            raise StoreError(f"column {name!r} of {path} has unit {values.unit}; an angle was expected") from exc
    return np.asarray(values, dtype=np.float64)


def _integer_ids(ids: np.ndarray, name: str, path: Path) -> np.ndarray:
    """Integer object ids; digit strings (SDSS photoObj's OBJID is text) are parsed."""
    if ids.dtype.kind in "SU":
        try:
            return np.char.strip(ids.astype(str)).astype(np.int64)
        except ValueError as exc:
            raise StoreError(f"column {name!r} of {path} holds text that is not integer object ids: {exc}") from exc
    if ids.dtype.kind not in "iu":
        raise StoreError(f"column {name!r} of {path} has dtype {ids.dtype}; integer object ids were expected")
    return ids


def read_table(path: Path, what: str = "table"):
    """Any table astropy reads (format from the suffix, CATALOG_FORMATS), refused with ``what`` and the path
    named when it is missing, of an unknown format, unreadable or empty."""
    if not path.is_file():
        raise StoreError(f"{what} {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in CATALOG_FORMATS:
        raise StoreError(f"{what} {path}: unknown format {suffix!r}; one of {', '.join(CATALOG_FORMATS)}")
    try:
        table = Table.read(path, format=CATALOG_FORMATS[suffix])
    except Exception as exc:  # astropy's readers raise many types
        raise StoreError(f"{what} {path} cannot be read as {CATALOG_FORMATS[suffix]}: {exc}") from exc
    if len(table) == 0:
        raise StoreError(f"{what} {path} has no rows")
    return table


def read_sources(
    path: str | Path,
    *,
    ra_col: str = "ra",
    dec_col: str = "dec",
    id_col: str = "object_id",
    size_col: str | None = None,
    size_unit: str = "arcsec",
    keep: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """The source catalog's columns, checked: ids unique integers, coordinates finite, at least one row."""
    path = Path(path)
    table = read_table(path, "source catalog")
    ra = _degrees(_column(table, ra_col, path), ra_col, path)
    dec = _degrees(_column(table, dec_col, path), dec_col, path)
    ids = _integer_ids(np.asarray(_column(table, id_col, path)), id_col, path)
    for name, values in ((ra_col, ra), (dec_col, dec)):
        bad = ~np.isfinite(values)
        if bad.any():
            raise StoreError(f"column {name!r} of {path} has {bad.sum()} NaN/inf values (object ids "
                             f"{ids[bad][:5].tolist()}...); every source needs finite coordinates")  # fmt: skip
    if np.any(np.abs(dec) > 90):
        raise StoreError(f"column {dec_col!r} of {path} has values beyond +-90 deg")
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise StoreError(f"column {id_col!r} of {path} repeats object ids {unique[counts > 1][:5].tolist()}")
    columns = {"object_id": ids.astype(np.int64), "ra": np.mod(ra, 360.0), "dec": dec}
    if size_col:
        size = _column(table, size_col, path)
        size = size if isinstance(size, u.Quantity) else np.asarray(size, dtype=np.float64) * u.Unit(size_unit)
        columns[SIZE_COLUMN] = size.to_value(u.arcsec).astype(np.float64)
    for name in keep:
        values = np.asarray(_column(table, name, path))
        if values.ndim != 1 or values.dtype.kind not in "biuf":
            raise StoreError(f"column {name!r} of {path} is {values.dtype} {values.shape}; --keep takes 1-D numbers")
        columns[name] = values
    return columns


def assign_to_tiles(ra: np.ndarray, dec: np.ndarray, tiles: list[tuple[WCS, tuple[int, int]]]) -> tuple[np.ndarray, ...]:
    """(tile index or -1, x, y) per source: each source goes to the one tile where it lies farthest from an edge."""
    n = len(ra)
    best = np.full(n, OFF_TILE, dtype=np.int32)
    margin_best = np.zeros(n)
    x_best, y_best = np.full(n, np.nan), np.full(n, np.nan)
    coords = SkyCoord(ra * u.deg, dec * u.deg)
    for index, (wcs, (ny, nx)) in enumerate(tiles):
        centre = wcs.pixel_to_world((nx - 1) / 2, (ny - 1) / 2)
        radius = 0.6 * np.hypot(nx, ny) * proj_plane_pixel_scales(wcs).max() * u.deg
        near = coords.separation(centre) < radius  # never project the far side of the sky
        x, y = np.full(n, np.nan), np.full(n, np.nan)
        if near.any():
            with np.errstate(all="ignore"):
                x[near], y[near] = wcs.world_to_pixel_values(ra[near], dec[near])
        margin = np.fmin.reduce([x + 0.5, nx - 0.5 - x, y + 0.5, ny - 0.5 - y])
        better = np.isfinite(margin) & (margin > margin_best)
        best[better], margin_best[better], x_best[better], y_best[better] = index, margin[better], x[better], y[better]
    return best, x_best, y_best


# ------------------------------------------------------------------------------------------------ the store


def ingest_tiles(
    store: str | Path,
    tiles: list[dict[str, str]],
    sources: str | Path,
    *,
    reproject: bool = False,
    overwrite: bool = False,
    **catalog_columns: Any,
) -> dict[str, Any]:
    """Write a `tiles` store from FITS images (one ``{band: file}`` per tile) and a source catalog.

    ``catalog_columns`` names the catalog's columns as :func:`read_sources` takes them (``ra_col``,
    ``dec_col``, ``id_col``, ``size_col``, ``size_unit``, ``keep``). Everything is read and checked before the
    store is created, so a refused ingest writes nothing. Returns a summary: tiles, bands, sources per tile,
    sources on no tile.
    """
    if not tiles:
        raise StoreError("no tiles given; pass --images 'g=tile_g.fits,...' once per tile")
    if Path(store).exists() and not overwrite:
        raise StoreError(f"store {store} already exists; pass --overwrite to replace it")
    columns = read_sources(sources, **catalog_columns)
    read = [read_tile(images, reproject=reproject) for images in tiles]
    bands = [b.band for b in read[0]]
    for index, tile in enumerate(read[1:], start=1):
        if [b.band for b in tile] != bands:
            raise StoreError(f"tile {index} has bands {[b.band for b in tile]}; tile 0 has {bands}: every tile "
                             f"needs the same bands in the same order")  # fmt: skip
    tile_of, x, y = assign_to_tiles(columns["ra"], columns["dec"], [(t[0].wcs, t[0].shape) for t in read])
    order = np.lexsort((y, np.where(tile_of == OFF_TILE, len(read), tile_of)))
    columns = {name: values[order] for name, values in columns.items()}
    columns.update(tile=tile_of[order], x=x[order], y=y[order])

    tile_ids = [f"tile-{index:05d}" for index in range(len(read))]
    group = zarr.open_group(str(store), mode="w" if overwrite else "w-", zarr_format=3)
    group.attrs.update({"survey_infer": {"format": STORE_FORMAT, "kind": "tiles"}, "bands": bands, "tiles": tile_ids,
                        "sources_file": str(Path(sources).resolve()), "reprojected": reproject})  # fmt: skip
    for tile_id, tile in zip(tile_ids, read):
        _write_tile(group, tile_id, tile)
    source_group = group.create_group(SOURCES_GROUP)
    chunk = max(1, min(len(order), 1 << 20))
    for name, values in columns.items():
        source_group.create_array(name, data=np.ascontiguousarray(values), chunks=(chunk,))
    counts = np.bincount(tile_of[tile_of >= 0], minlength=len(read))
    return {"store": str(store), "tiles": dict(zip(tile_ids, counts.tolist())), "bands": bands,
            "sources": len(order), "off_tile": int((tile_of == OFF_TILE).sum())}  # fmt: skip


def _write_tile(group: zarr.Group, tile_id: str, bands: list[BandImage]) -> None:
    data = np.stack([b.data for b in bands]).astype(np.float32)
    array = group.create_array(
        f"{TILES_GROUP}/{tile_id}/{IMAGE_ARRAY}", shape=data.shape, dtype="float32",
        chunks=(1, min(TILE_CHUNK, data.shape[1]), min(TILE_CHUNK, data.shape[2])),
        compressors=BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"), fill_value=np.nan,
    )  # fmt: skip
    array[:] = data
    wcs = bands[0].wcs
    array.attrs.update({
        "wcs": {key: value for key, value in wcs.to_header(relax=True).items()},
        "bands": [b.band for b in bands],
        "files": {b.band: b.source for b in bands},
        "bunit": {b.band: b.bunit for b in bands},
        "zero_points": {b.band: b.zero_points for b in bands},
        "pixel_scale_arcsec": float(proj_plane_pixel_scales(wcs).mean() * 3600.0),
    })  # fmt: skip


@dataclass(frozen=True)
class TilesStoreInfo:
    """What the pipeline needs to know about a validated `tiles` store."""

    path: Path
    n_rows: int
    bands: list[str]
    tile_ids: list[str]
    tile_shapes: dict[str, tuple[int, ...]]
    pixel_scales: dict[str, float]
    unit_bounds: tuple[tuple[int, int], ...]
    unit_tiles: tuple[int, ...]
    columns: dict[str, np.dtype]
    attrs: dict[str, Any] = field(default_factory=dict)
    kind: str = "tiles"

    @property
    def columns_path(self) -> Path:
        return self.path / SOURCES_GROUP

    def fingerprint(self) -> str:
        return store_fingerprint(self.path)

    def describe(self) -> dict[str, Any]:
        off = [b for b, t in zip(self.unit_bounds, self.unit_tiles) if t == OFF_TILE]
        return {"tiles": len(self.tile_ids), "bands": self.bands, "pixel_scale_arcsec": self.pixel_scales,
                "off_tile_rows": sum(stop - start for start, stop in off)}  # fmt: skip


def open_tiles(path: str | Path) -> TilesStoreInfo:
    """Open and validate a `tiles` store; refuse it with a message naming the array at fault."""
    path = Path(path)
    group = open_store(path, "tiles")
    bands, tile_ids = list(group.attrs.get("bands", [])), list(group.attrs.get("tiles", []))
    shapes, scales = {}, {}
    for tile_id in tile_ids:
        name = f"{TILES_GROUP}/{tile_id}/{IMAGE_ARRAY}"
        try:
            image = group[name]
        except KeyError as exc:
            raise StoreError(f"store {path} lists tile {tile_id} but has no array '{name}'") from exc
        if image.ndim != 3 or image.shape[0] != len(bands):
            raise StoreError(f"array '{name}' in {path} has shape {image.shape}; ({len(bands)}, Y, X) was expected")
        if "wcs" not in image.attrs:
            raise StoreError(f"array '{name}' in {path} has no 'wcs' attribute (FITS WCS header cards)")
        shapes[tile_id], scales[tile_id] = tuple(image.shape), float(image.attrs.get("pixel_scale_arcsec", np.nan))
    if SOURCES_GROUP not in group:
        raise StoreError(f"store {path} has no '{SOURCES_GROUP}' group")
    sources = group[SOURCES_GROUP]
    columns = {name: np.dtype(array.dtype) for name, array in sources.arrays()}
    for name in ("object_id", "ra", "dec", "tile", "x", "y"):
        if name not in columns:
            raise StoreError(f"store {path} has no '{SOURCES_GROUP}/{name}' column")
    try:
        tile_of = np.asarray(sources["tile"][:])
    except Exception as exc:  # a damaged chunk: zarr and its codecs raise many types
        raise StoreError(f"column '{SOURCES_GROUP}/tile' in {path} cannot be read: {type(exc).__name__}: {exc}") from exc
    n_rows = len(tile_of)
    for name, array in sources.arrays():
        if array.shape != (n_rows,):
            raise StoreError(f"column '{SOURCES_GROUP}/{name}' in {path} has shape {array.shape}; ({n_rows},) expected")
    sort_key = np.where(tile_of == OFF_TILE, len(tile_ids), tile_of)
    if np.any(np.diff(sort_key) < 0) or np.any((tile_of < OFF_TILE) | (tile_of >= len(tile_ids))):
        raise StoreError(f"column '{SOURCES_GROUP}/tile' in {path} is not sorted by tile or names unknown tiles")
    bounds, unit_tiles = [], []
    for tile in np.unique(sort_key):  # one unit per tile with sources, then the off-tile rows
        rows = np.flatnonzero(sort_key == tile)
        bounds.append((int(rows[0]), int(rows[-1]) + 1))
        unit_tiles.append(OFF_TILE if tile == len(tile_ids) else int(tile))
    return TilesStoreInfo(path, n_rows, bands, tile_ids, shapes, scales, tuple(bounds), tuple(unit_tiles), columns,
                          dict(group.attrs))  # fmt: skip


# ------------------------------------------------------------------------------------------ cutting at run time


@dataclass(frozen=True)
class CutSpec:
    """How a run cuts its cutouts: the bundle's bands, pixel grid and framing.

    framing ``half_light``: a field ``fov_r_half`` half-light radii across (the source's ``r_half_arcsec``,
    or measured on the tile when the catalog gives none), as the simulator frames its mocks. ``pixel_scale``:
    a fixed field of ``out_px`` pixels of ``arcsec_per_px``. Either way the field is area-resampled to
    ``out_px`` x ``out_px``.
    """

    band_indices: tuple[int, ...]
    out_px: int
    framing: str
    fov_r_half: float | None = None
    arcsec_per_px: float | None = None

    def fov_px(self, r_half_px: np.ndarray, tile_scale_arcsec: float) -> np.ndarray:
        if self.framing == "half_light":
            return self.fov_r_half * r_half_px
        return np.full(len(r_half_px), self.out_px * self.arcsec_per_px / tile_scale_arcsec)


def make_cut_spec(info: TilesStoreInfo, bands: list[str], shape: tuple[int, int, int], framing: dict) -> CutSpec:
    """Check that a tiles store can feed a bundle (bands, square grid, framing) and say how to cut for it."""
    missing = [band for band in bands if band not in info.bands]
    if missing:
        raise StoreError(f"store {info.path} has bands {info.bands}; the bundle needs {bands} (missing {missing})")
    if shape[1] != shape[2]:
        raise StoreError(f"the bundle's cutouts are {shape[1]}x{shape[2]}; only square cutouts can be cut from tiles")
    kind, indices = framing.get("kind"), tuple(info.bands.index(b) for b in bands)
    if kind == "half_light":
        return CutSpec(indices, shape[1], kind, fov_r_half=float(framing["fov_r_half"]))
    if kind == "pixel_scale":
        return CutSpec(indices, shape[1], kind, arcsec_per_px=float(framing["arcsec_per_px"]))
    raise StoreError(f"the bundle's framing {framing!r} is neither 'half_light' nor 'pixel_scale'")


def iter_tile_batches(
    path: Path, tile: int, start: int, stop: int, cut: CutSpec, rows_per_read: int, stats: dict[str, Any]
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (offset, images (n, C, H, W) float32, flags (n,)) for source rows [start, stop) of one tile.

    Each batch reads only the part of the tile its sources' fields cover (sources are sorted by y). Fields
    reaching past the tile's edge are padded with empty sky and flagged ``edge_padded``; sources on no tile
    (``tile`` -1) come back all NaN and flagged ``off_tile``. ``stats`` collects how much was resampled.
    """
    group = zarr.open_group(str(path), mode="r")
    sources = group[SOURCES_GROUP]
    channels, size = len(cut.band_indices), cut.out_px
    if tile == OFF_TILE:
        for offset in range(0, stop - start, rows_per_read):
            n = min(rows_per_read, stop - start - offset)
            yield offset, np.full((n, channels, size, size), np.nan, np.float32), np.full(n, FLAG_BITS["off_tile"], np.int32)
        return
    tile_id = group.attrs["tiles"][tile]
    image = group[f"{TILES_GROUP}/{tile_id}/{IMAGE_ARRAY}"]
    scale = float(image.attrs["pixel_scale_arcsec"])
    shape = tuple(image.shape[1:])
    stats.update(tile_pixel_scale_arcsec=scale)
    has_size = SIZE_COLUMN in sources
    for offset in range(0, stop - start, rows_per_read):
        lo, hi = start + offset, min(start + offset + rows_per_read, stop)
        x, y = np.asarray(sources["x"][lo:hi]), np.asarray(sources["y"][lo:hi])
        r_half_px = np.asarray(sources[SIZE_COLUMN][lo:hi]) / scale if has_size else np.full(hi - lo, np.nan)
        yield offset, *_cut_batch(image, cut, shape, x, y, r_half_px, scale, stats)


def _read_window(image: zarr.Array, bands: tuple[int, ...], shape, x, y, half) -> tuple[np.ndarray, int, int]:
    """The part of the tile under every field of a batch: (C, h, w) pixels and its origin (x0, y0)."""
    x0 = int(np.clip(np.floor(np.min(x - half)) - 2, 0, shape[1]))
    x1 = int(np.clip(np.ceil(np.max(x + half)) + 3, x0, shape[1]))
    y0 = int(np.clip(np.floor(np.min(y - half)) - 2, 0, shape[0]))
    y1 = int(np.clip(np.ceil(np.max(y + half)) + 3, y0, shape[0]))
    return np.asarray(image.get_orthogonal_selection((list(bands), slice(y0, y1), slice(x0, x1)))), x0, y0


def _cut_batch(image, cut: CutSpec, shape, x, y, r_half_px, scale, stats) -> tuple[np.ndarray, np.ndarray]:
    n = len(x)
    flags = np.zeros(n, np.int32)
    out = np.full((n, len(cut.band_indices), cut.out_px, cut.out_px), np.nan, np.float32)
    unknown = ~(np.isfinite(r_half_px) & (r_half_px > 0))
    half = 0.5 * float(np.max(cut.fov_px(np.where(unknown, 0.0, r_half_px), scale), initial=0.0))
    if cut.framing == "half_light" and unknown.any():
        half = max(half, MEASURE_BOX_PX / 2)
    window, x0, y0 = _read_window(image, cut.band_indices, shape, x, y, half)
    if cut.framing == "half_light" and unknown.any():
        for i in np.flatnonzero(unknown):
            r_half_px[i] = measure_r_half(window[0], x[i] - x0, y[i] - y0, box_px=MEASURE_BOX_PX)
        stats["sizes_measured"] = stats.get("sizes_measured", 0) + int(unknown.sum())
    fov = cut.fov_px(r_half_px, scale)
    widest = float(np.nanmax(fov, initial=0.0)) / 2
    if widest > half:  # measured sizes wider than the window read
        window, x0, y0 = _read_window(image, cut.band_indices, shape, x, y, widest)
    window = window.astype(np.float64)
    stamps = np.full((len(cut.band_indices), n, cut.out_px, cut.out_px), np.nan)
    pads = np.zeros((n, cut.out_px, cut.out_px), dtype=bool)
    for i in range(n):
        if not np.isfinite(fov[i]) or fov[i] <= 0:
            flags[i] |= FLAG_BITS["no_size"]
            continue
        pads[i] = off_image_mask((x[i], y[i]), fov[i], cut.out_px, shape)
        for c in range(len(cut.band_indices)):
            stamps[c, i] = cut_stamp(window[c], (x[i] - x0, y[i] - y0), fov[i], cut.out_px)
    flags[pads.any(axis=(1, 2))] |= FLAG_BITS["edge_padded"]
    for c in range(len(cut.band_indices)):
        out[:, c] = prepare_stamps(stamps[c], pad=pads)
    finite = fov[np.isfinite(fov)] / cut.out_px
    if finite.size:
        stats["tile_px_per_cutout_px"] = [min(stats.get("tile_px_per_cutout_px", [np.inf])[0], float(finite.min())),
                                          max(stats.get("tile_px_per_cutout_px", [0, 0])[1], float(finite.max()))]  # fmt: skip
    return out, flags


def cutting_summary(cut: CutSpec, summaries: Any) -> dict[str, Any]:
    """For run.json: how the cutouts were cut, and over every unit how much the tiles were resampled."""
    stats = [s["cutting"] for s in summaries if s.get("cutting")]
    ratios = [s["tile_px_per_cutout_px"] for s in stats if "tile_px_per_cutout_px" in s]
    return {
        "framing": cut.framing,
        **({"fov_r_half": cut.fov_r_half} if cut.fov_r_half else {"arcsec_per_px": cut.arcsec_per_px}),
        "cutout_px": cut.out_px,
        "resampled": bool(ratios) and any(abs(r - 1.0) > 1e-6 for pair in ratios for r in pair),
        "tile_px_per_cutout_px": [min(r[0] for r in ratios), max(r[1] for r in ratios)] if ratios else None,
        "tile_pixel_scale_arcsec": sorted({s["tile_pixel_scale_arcsec"] for s in stats if "tile_pixel_scale_arcsec" in s}),
        "sizes_measured": sum(s.get("sizes_measured", 0) for s in stats),
    }
