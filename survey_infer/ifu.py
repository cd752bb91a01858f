"""The `ifu` store: integral-field cubes (a spectrum per spaxel) with 5-band HST photometry maps.

Layout (a Zarr v3 group, attrs ``{"survey_infer": {"format": 1, "kind": "ifu"}}``, ``bands`` (the five
photometric bands), ``flux_unit`` (of every flux and photometry array; default ``1e-20 erg / (s cm2 A)``),
``cube_names`` (the cubes in row order), ``survey``):

- ``catalog/<column>``: 1-D, ONE ROW = ONE CUBE: ``object_id`` int64 (strictly increasing: the catalog's id
  and the cube's group in the output ``sfh.zarr``), ``ra``, ``dec`` float64 (deg, the cube's centre),
  ``redshift`` float64, ``ny``, ``nx``, ``n_wave`` int64;
- ``cubes/<name>/flux`` and ``ivar`` (L, Y, X) float32 (NaN flux / zero ivar where there is no data: such
  spaxels and pixels are kept; the run flags a spaxel without usable data ``nan_pixels``), chunked by blocks
  of Y rows so that a read of spaxels is a read of whole chunks; attrs ``wavelength`` (the L wavelengths [A],
  observed frame), ``wavelength_frame`` ("air" or "vacuum"), ``wcs`` (the celestial FITS WCS header cards),
  ``redshift``, ``object_id``;
- ``cubes/<name>/photometry`` and ``photometry_ivar`` (5, Y, X) float32: the mean f_lambda in each band on the
  cube's spaxel grid, in ``flux_unit`` (NaN / 0 where a band is missing).

One cube is one unit of work (:attr:`IfuStoreInfo.unit_bounds`); a unit reads its cube ``spaxels_per_batch``
spaxels (whole Y rows) at a time as a :class:`SpaxelBatch` (:func:`iter_spaxel_batches`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr

from survey_infer.errors import StoreError
from survey_infer.flags import FLAG_BITS
from survey_infer.store import STORE_FORMAT, open_store, store_fingerprint

CATALOG_GROUP = "catalog"
CUBES_GROUP = "cubes"
BANDS = ("F275W", "F336W", "F438W", "F555W", "F814W")
FLUX_UNIT = "1e-20 erg / (s cm2 Angstrom)"
CATALOG_COLUMNS = {"object_id": np.dtype("int64"), "ra": np.dtype("float64"), "dec": np.dtype("float64"),
                   "redshift": np.dtype("float64"), "ny": np.dtype("int64"), "nx": np.dtype("int64"),
                   "n_wave": np.dtype("int64")}  # fmt: skip
DEFAULT_SPAXELS_PER_BATCH = 256


@dataclass
class SpaxelBatch:
    """Spectra of a block of one cube's spaxels (observed frame) with their photometry and positions."""

    flux: np.ndarray  # (n, L) float32
    ivar: np.ndarray  # (n, L) float32
    wave: np.ndarray  # (L,) float64 [A]
    redshift: float
    photometry: np.ndarray  # (n, 5) float32
    photometry_ivar: np.ndarray  # (n, 5) float32
    y: np.ndarray  # (n,) int64
    x: np.ndarray  # (n,) int64
    shape: tuple[int, int]  # the cube's (Y, X)
    wcs: dict[str, Any] = field(default_factory=dict)  # the cube's celestial FITS header cards

    def __len__(self) -> int:
        return len(self.flux)


@dataclass(frozen=True)
class CubeInfo:
    name: str
    object_id: int
    shape: tuple[int, int, int]  # (L, Y, X)
    wave: np.ndarray = field(repr=False)
    redshift: float = 0.0


@dataclass(frozen=True)
class IfuStoreInfo:
    """What the pipeline needs to know about a validated `ifu` store (rows = cubes, one unit per cube)."""

    path: Path
    n_rows: int
    columns: dict[str, np.dtype]
    cubes: tuple[CubeInfo, ...]
    batch_rows: int  # spaxels per read
    attrs: dict[str, Any] = field(default_factory=dict)
    kind: str = "ifu"
    id_column: str = "object_id"

    @property
    def columns_path(self) -> Path:
        return self.path / CATALOG_GROUP

    @property
    def unit_bounds(self) -> tuple[tuple[int, int], ...]:
        return tuple((i, i + 1) for i in range(self.n_rows))

    def fingerprint(self) -> str:
        return store_fingerprint(self.path)

    def describe(self) -> dict[str, Any]:
        return {"cubes": self.n_rows, "spaxels": int(sum(c.shape[1] * c.shape[2] for c in self.cubes)),
                "bands": list(self.attrs.get("bands", BANDS)), "flux_unit": self.attrs.get("flux_unit")}  # fmt: skip


# ------------------------------------------------------------------------------------------------- writing


def _rows_chunk(ny: int, nx: int, spaxels: int) -> int:
    return max(1, min(ny, spaxels // max(nx, 1)))


def write_ifu_store(path: str | Path, cubes: list[dict[str, Any]], *, survey: dict[str, Any] | None = None,
                    flux_unit: str = FLUX_UNIT, spaxels_per_batch: int = DEFAULT_SPAXELS_PER_BATCH,
                    overwrite: bool = False) -> Path:  # fmt: skip
    """Write an `ifu` store. Each cube: ``name``, ``object_id``, ``ra``, ``dec``, ``redshift``, ``wave`` (L,),
    ``flux`` and ``ivar`` (L, Y, X), optional ``photometry`` / ``photometry_ivar`` (5, Y, X), ``wcs`` (dict of
    header cards), ``wavelength_frame``. Validated by :func:`open_ifu`."""
    path = Path(path)
    if not cubes:
        raise StoreError("no cubes: an ifu store needs at least one")
    order = np.argsort([int(c["object_id"]) for c in cubes], kind="stable")
    cubes = [cubes[i] for i in order]
    names = [str(c["name"]) for c in cubes]
    if len(set(names)) != len(names):
        raise StoreError(f"cube names repeat: {names}")
    for name in names:
        if not name or "/" in name or name.startswith("."):
            raise StoreError(f"cube name {name!r} must be non-empty, without '/' and not start with '.'")
    ids = np.array([int(c["object_id"]) for c in cubes], np.int64)
    if np.any(np.diff(ids) == 0):
        raise StoreError(f"cube object ids repeat: {ids.tolist()}")
    group = zarr.open_group(str(path), mode="w" if overwrite else "w-", zarr_format=3)
    group.attrs.update({"survey_infer": {"format": STORE_FORMAT, "kind": "ifu"}, "bands": list(BANDS),
                        "flux_unit": flux_unit, "cube_names": names, "spaxels_per_batch": int(spaxels_per_batch),
                        "survey": survey or {}})  # fmt: skip
    cg = group.create_group(CUBES_GROUP)
    rows: dict[str, list] = {k: [] for k in CATALOG_COLUMNS}
    for cube, name in zip(cubes, names):
        flux = np.asarray(cube["flux"], np.float32)
        ivar = np.asarray(cube["ivar"], np.float32)
        if flux.ndim != 3 or ivar.shape != flux.shape:
            raise StoreError(f"cube {name!r}: flux {flux.shape} and ivar {ivar.shape} must be the same (L, Y, X)")
        n_wave, ny, nx = flux.shape
        wave = np.asarray(cube["wave"], np.float64)
        if wave.shape != (n_wave,):
            raise StoreError(f"cube {name!r}: {len(wave)} wavelengths for {n_wave} spectral pixels")
        phot = cube.get("photometry")
        phot = np.full((len(BANDS), ny, nx), np.nan, np.float32) if phot is None else np.asarray(phot, np.float32)
        phot_ivar = cube.get("photometry_ivar")
        phot_ivar = np.zeros((len(BANDS), ny, nx), np.float32) if phot_ivar is None else np.asarray(phot_ivar, np.float32)
        if phot.shape != (len(BANDS), ny, nx) or phot_ivar.shape != phot.shape:
            raise StoreError(f"cube {name!r}: photometry {phot.shape} / photometry_ivar {phot_ivar.shape}; "
                             f"{(len(BANDS), ny, nx)} expected (bands {', '.join(BANDS)})")  # fmt: skip
        sub = cg.create_group(name)
        sub.attrs.update({"wavelength": wave.tolist(), "wavelength_unit": "Angstrom",
                          "wavelength_frame": cube.get("wavelength_frame", "air"), "wcs": cube.get("wcs", {}),
                          "redshift": float(cube["redshift"]), "object_id": int(cube["object_id"])})  # fmt: skip
        ky = _rows_chunk(ny, nx, spaxels_per_batch)
        sub.create_array("flux", shape=flux.shape, chunks=(n_wave, ky, nx), dtype="float32", fill_value=np.nan)[:] = flux
        sub.create_array("ivar", shape=flux.shape, chunks=(n_wave, ky, nx), dtype="float32", fill_value=0.0)[:] = ivar
        sub.create_array("photometry", shape=phot.shape, chunks=(len(BANDS), ky, nx), dtype="float32",
                         fill_value=np.nan)[:] = phot  # fmt: skip
        sub.create_array("photometry_ivar", shape=phot.shape, chunks=(len(BANDS), ky, nx), dtype="float32",
                         fill_value=0.0)[:] = phot_ivar  # fmt: skip
        for key, value in (("object_id", cube["object_id"]), ("ra", cube["ra"]), ("dec", cube["dec"]),
                           ("redshift", cube["redshift"]), ("ny", ny), ("nx", nx), ("n_wave", n_wave)):  # fmt: skip
            rows[key].append(value)
    catalog = group.create_group(CATALOG_GROUP)
    for key, dtype in CATALOG_COLUMNS.items():
        values = np.asarray(rows[key], dtype)
        catalog.create_array(key, shape=values.shape, chunks=(1,), dtype=dtype)[:] = values
    open_ifu(path)
    return path


# ------------------------------------------------------------------------------------------------- reading


def open_ifu(path: str | Path) -> IfuStoreInfo:
    """Open and validate an `ifu` store; refuse it with a message naming the group, array or column at fault."""
    path = Path(path)
    group = open_store(path, "ifu")
    if CATALOG_GROUP not in group or CUBES_GROUP not in group:
        raise StoreError(f"ifu store {path} needs groups '{CATALOG_GROUP}' and '{CUBES_GROUP}'")
    catalog = dict(group[CATALOG_GROUP].arrays())
    where = f"group '{CATALOG_GROUP}' of {path}"
    for name, dtype in CATALOG_COLUMNS.items():
        if name not in catalog:
            raise StoreError(f"{where} has no column '{name}'; {dtype} was expected")
        if np.dtype(catalog[name].dtype).kind != dtype.kind or catalog[name].ndim != 1:
            raise StoreError(f"column '{name}' in {where} is {catalog[name].dtype} {catalog[name].shape}; 1-D {dtype} expected")
    lengths = {n: a.shape[0] for n, a in catalog.items()}
    if len(set(lengths.values())) != 1:
        raise StoreError(f"the columns of {where} differ in length: {lengths}")
    n = next(iter(lengths.values()))
    names = list(group.attrs.get("cube_names", []))
    if n == 0 or len(names) != n:
        raise StoreError(f"ifu store {path}: attrs 'cube_names' lists {len(names)} cubes; {where} has {n} rows")
    ids = np.asarray(catalog["object_id"][:])
    if np.any(np.diff(ids) <= 0):
        raise StoreError(f"column 'object_id' in {where} is not strictly increasing; cubes must be sorted by id, each once")
    cols = {k: np.asarray(catalog[k][:]) for k in ("ra", "dec", "redshift", "ny", "nx", "n_wave")}
    bad = np.flatnonzero(~np.isfinite(cols["ra"]) | ~np.isfinite(cols["dec"]) | (np.abs(cols["dec"]) > 90))
    if bad.size:
        raise StoreError(f"columns 'ra'/'dec' in {where}: cubes {[names[i] for i in bad[:5]]} have no valid sky position")
    bad = np.flatnonzero(~np.isfinite(cols["redshift"]) | (cols["redshift"] < 0) | (cols["redshift"] > 10))
    if bad.size:
        raise StoreError(f"column 'redshift' in {where}: cubes {[names[i] for i in bad[:5]]} have a missing or "
                         f"invalid redshift ({cols['redshift'][bad[:5]].tolist()})")  # fmt: skip
    cube_group = group[CUBES_GROUP]
    infos = []
    for i, name in enumerate(names):
        if name not in cube_group:
            raise StoreError(f"ifu store {path}: cube '{name}' (row {i} of '{CATALOG_GROUP}') has no group '{CUBES_GROUP}/{name}'")
        sub = cube_group[name]
        arrays = dict(sub.arrays())
        shape = (int(cols["n_wave"][i]), int(cols["ny"][i]), int(cols["nx"][i]))
        for arr in ("flux", "ivar"):
            if arr not in arrays:
                raise StoreError(f"ifu store {path}: cube '{name}' has no array '{CUBES_GROUP}/{name}/{arr}'")
            if tuple(arrays[arr].shape) != shape:
                raise StoreError(f"array '{CUBES_GROUP}/{name}/{arr}' in {path} has shape {arrays[arr].shape}; "
                                 f"{shape} (L, Y, X from '{CATALOG_GROUP}') was expected")  # fmt: skip
            if np.dtype(arrays[arr].dtype).kind != "f":
                raise StoreError(f"array '{CUBES_GROUP}/{name}/{arr}' in {path} has dtype {arrays[arr].dtype}; float expected")
        for arr in ("photometry", "photometry_ivar"):
            if arr not in arrays or tuple(arrays[arr].shape) != (len(BANDS), shape[1], shape[2]):
                got = arrays[arr].shape if arr in arrays else "nothing"
                raise StoreError(f"array '{CUBES_GROUP}/{name}/{arr}' in {path} is {got}; "
                                 f"{(len(BANDS), shape[1], shape[2])} (bands {', '.join(BANDS)}) was expected")  # fmt: skip
        wave = np.asarray(sub.attrs.get("wavelength", []), np.float64)
        if wave.shape != (shape[0],) or not np.all(np.diff(wave) > 0) or not np.all(np.isfinite(wave)):
            raise StoreError(f"group '{CUBES_GROUP}/{name}' in {path}: attrs 'wavelength' must hold {shape[0]} "
                             f"finite, increasing wavelengths [A] (has {wave.size})")  # fmt: skip
        infos.append(CubeInfo(name, int(ids[i]), shape, wave, float(cols["redshift"][i])))
    per_batch = int(group.attrs.get("spaxels_per_batch", DEFAULT_SPAXELS_PER_BATCH))
    return IfuStoreInfo(path=path, n_rows=n, columns={k: np.dtype(a.dtype) for k, a in catalog.items()},
                        cubes=tuple(infos), batch_rows=max(1, per_batch), attrs=dict(group.attrs))  # fmt: skip


def iter_spaxel_batches(store: Path, start: int, stop: int, rows_per_read: int) -> Iterator[tuple[int, SpaxelBatch, np.ndarray]]:
    """(0, SpaxelBatch, store flags) for the spaxels of cube ``start`` (one unit = one cube: ``stop`` is
    ``start + 1``), whole Y rows at a time, about ``rows_per_read`` spaxels per batch. Every batch belongs to
    catalog row ``start``, so every offset is 0. Spaxels without a finite flux with ivar > 0 are flagged
    ``nan_pixels`` here (kept, never dropped)."""
    if stop != start + 1:
        raise StoreError(f"an ifu unit is one cube; rows [{start}, {stop}) were asked")
    group = zarr.open_group(str(store), mode="r")
    name = list(group.attrs["cube_names"])[start]
    sub = group[CUBES_GROUP][name]
    wave = np.asarray(sub.attrs["wavelength"], np.float64)
    redshift = float(group[CATALOG_GROUP]["redshift"][start])
    n_wave, ny, nx = sub["flux"].shape
    ky = _rows_chunk(ny, nx, rows_per_read)
    for y0 in range(0, ny, ky):
        y1 = min(y0 + ky, ny)
        flux = np.asarray(sub["flux"][:, y0:y1, :], np.float32).reshape(n_wave, -1).T
        ivar = np.asarray(sub["ivar"][:, y0:y1, :], np.float32).reshape(n_wave, -1).T
        phot = np.asarray(sub["photometry"][:, y0:y1, :], np.float32).reshape(len(BANDS), -1).T
        phot_ivar = np.asarray(sub["photometry_ivar"][:, y0:y1, :], np.float32).reshape(len(BANDS), -1).T
        yy, xx = np.mgrid[y0:y1, 0:nx]
        good = (np.isfinite(flux) & (ivar > 0)).any(axis=1)
        flags = np.where(good, 0, FLAG_BITS["nan_pixels"]).astype(np.int32)
        batch = SpaxelBatch(np.ascontiguousarray(flux), np.ascontiguousarray(ivar), wave, redshift,
                            np.ascontiguousarray(phot), np.ascontiguousarray(phot_ivar), yy.ravel().astype(np.int64),
                            xx.ravel().astype(np.int64), (ny, nx), dict(sub.attrs.get("wcs", {})))  # fmt: skip
        yield 0, batch, flags


# ------------------------------------------------------------------------------------------------- ingest


def _unit_factor(header, what: str, target: str, path: Path, squared: bool = False) -> tuple[float, str]:
    """Factor converting a HDU's BUNIT to ``target`` (squared for a variance); (1, note) when it has none."""
    from astropy import units as u

    bunit = header.get("BUNIT")
    if not bunit:
        return 1.0, f"{what}: no BUNIT, taken to be {target}{'^2' if squared else ''}"
    try:
        unit = u.Unit(bunit, parse_strict="raise")
        want = u.Unit(target) ** (2 if squared else 1)
        return float(unit.to(want)), f"{what}: {bunit} -> {want}"
    except (ValueError, u.UnitConversionError) as exc:
        raise StoreError(f"{path}: {what} has BUNIT {bunit!r}, which is not a flux density per Angstrom"
                         f"{' squared' if squared else ''} ({exc})") from exc  # fmt: skip


def read_muse_cube(path: str | Path) -> dict[str, Any]:
    """A MUSE-format FITS cube: DATA (+ STAT variance) with a 3-D WCS whose third axis is spectral.

    Returns flux and ivar (L, Y, X) in :data:`FLUX_UNIT`, the wavelengths [A], the celestial WCS header, the
    centre's ra/dec, the wavelength frame (AWAV: air, WAVE: vacuum) and notes on unit conversions. NaN pixels
    and spaxels are kept (ivar 0)."""
    from astropy.io import fits
    from astropy.wcs import WCS

    path = Path(path)
    try:
        hdul = fits.open(path, memmap=False)
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path} is not a readable FITS file ({exc})") from exc
    with hdul:
        names = [h.name for h in hdul]
        data_hdu = hdul["DATA"] if "DATA" in names else next((h for h in hdul if getattr(h, "data", None) is not None and h.data.ndim == 3), None)
        if data_hdu is None or data_hdu.data is None or data_hdu.data.ndim != 3:
            raise StoreError(f"{path} has no DATA extension with a 3-D cube (HDUs: {names})")
        header = data_hdu.header
        flux = np.asarray(data_hdu.data, np.float64)
        var = np.asarray(hdul["STAT"].data, np.float64) if "STAT" in names else None
        stat_header = hdul["STAT"].header if "STAT" in names else None
    if var is not None and var.shape != flux.shape:
        raise StoreError(f"{path}: STAT has shape {var.shape}; DATA has {flux.shape}")
    try:
        wcs = WCS(header)
    except Exception as exc:  # astropy raises several kinds for a broken WCS
        raise StoreError(f"{path}: the DATA extension's WCS cannot be read ({exc})") from exc
    if wcs.naxis != 3 or not wcs.has_spectral:
        raise StoreError(f"{path}: the DATA WCS has no spectral axis (CTYPE {list(wcs.wcs.ctype)})")
    spec_axis = wcs.wcs.spec
    if spec_axis != 2:
        raise StoreError(f"{path}: the spectral axis is WCS axis {spec_axis + 1}; MUSE format puts it third (NAXIS3)")
    ctype = wcs.wcs.ctype[2].strip()
    if not ctype.startswith(("AWAV", "WAVE")):
        raise StoreError(f"{path}: spectral axis CTYPE3 {ctype!r}; a wavelength axis (AWAV or WAVE) was expected")
    n_wave = flux.shape[0]
    spectral = wcs.sub([3])
    wave_m = spectral.all_pix2world(np.arange(n_wave), 0)[0]
    from astropy import units as u

    wave = (wave_m * u.Unit(spectral.wcs.cunit[0] or "m")).to_value(u.AA)
    notes = []
    factor, note = _unit_factor(header, "DATA", FLUX_UNIT, path)
    notes.append(note)
    flux = flux * factor
    if var is not None:
        vfactor, note = _unit_factor(stat_header, "STAT", FLUX_UNIT, path, squared=True)
        notes.append(note)
        var = var * vfactor
        with np.errstate(divide="ignore", invalid="ignore"):
            ivar = np.where(np.isfinite(var) & (var > 0) & np.isfinite(flux), 1.0 / var, 0.0)
    else:
        notes.append("no STAT extension: ivar 0 everywhere (no S/N known)")
        ivar = np.zeros_like(flux)
    celestial = wcs.celestial
    ny, nx = flux.shape[1:]
    centre = celestial.pixel_to_world((nx - 1) / 2, (ny - 1) / 2)
    cards = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in celestial.to_header().items()}
    nan_spaxels = int((~np.isfinite(flux)).all(axis=0).sum())
    return {"flux": flux.astype(np.float32), "ivar": ivar.astype(np.float32), "wave": wave, "wcs": cards,
            "ra": float(centre.icrs.ra.deg), "dec": float(centre.icrs.dec.deg),
            "wavelength_frame": "air" if ctype.startswith("AWAV") else "vacuum", "notes": notes,
            "nan_spaxels": nan_spaxels, "object": header.get("OBJECT")}  # fmt: skip


def read_photometry(specs: list[str], shape: tuple[int, int], path_for_errors: str = "") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``BAND=FILE`` images (one per band, on the cube's spaxel grid; an ERR or IVAR extension if present,
    else a 5% error is assumed) -> photometry, photometry_ivar (5, Y, X); bands not given stay missing."""
    from astropy.io import fits

    phot = np.full((len(BANDS), *shape), np.nan, np.float32)
    ivar = np.zeros((len(BANDS), *shape), np.float32)
    notes = []
    for spec in specs:
        for item in spec.split(","):
            if "=" not in item:
                raise StoreError(f"--photometry {item!r}: BAND=FILE expected (bands {', '.join(BANDS)})")
            band, file = item.split("=", 1)
            band = band.strip().upper()
            if band not in BANDS:
                raise StoreError(f"--photometry band {band!r}; one of {', '.join(BANDS)} expected")
            k = BANDS.index(band)
            with fits.open(file, memmap=False) as hdul:
                img = next((h for h in hdul if getattr(h, "data", None) is not None and h.data.ndim == 2), None)
                if img is None:
                    raise StoreError(f"{file}: no 2-D image for band {band}")
                data = np.asarray(img.data, np.float64)
                if data.shape != tuple(shape):
                    raise StoreError(f"{file}: band {band} image is {data.shape}; the cube's spaxel grid is "
                                     f"{tuple(shape)} (resample it onto the cube first)")  # fmt: skip
                factor, note = _unit_factor(img.header, f"photometry {band}", FLUX_UNIT, Path(file))
                notes.append(note)
                names = [h.name for h in hdul]
                if "IVAR" in names:
                    iv = np.asarray(hdul["IVAR"].data, np.float64) / factor**2
                elif "ERR" in names:
                    err = np.asarray(hdul["ERR"].data, np.float64) * factor
                    iv = np.where(err > 0, 1.0 / np.where(err > 0, err, 1.0) ** 2, 0.0)
                else:
                    err = 0.05 * np.abs(data * factor)
                    iv = np.where(err > 0, 1.0 / np.where(err > 0, err, 1.0) ** 2, 0.0)
                    notes.append(f"photometry {band}: no ERR/IVAR extension, 5% errors assumed")
            phot[k] = data * factor
            ivar[k] = np.where(np.isfinite(data), iv, 0.0)
    return phot, ivar, notes


def ingest_ifu(cube_paths: list[str | Path], store: str | Path, *, photometry: list[list[str]] | None = None,
               redshifts: list[float] | None = None, object_ids: list[int] | None = None,
               spaxels_per_batch: int = DEFAULT_SPAXELS_PER_BATCH, overwrite: bool = False) -> dict[str, Any]:  # fmt: skip
    """MUSE-format FITS cubes (+ per-cube photometry images) -> an `ifu` store; a summary of what was read."""
    cubes = []
    notes: dict[str, list[str]] = {}
    for i, cube_path in enumerate(cube_paths):
        cube_path = Path(cube_path)
        cube = read_muse_cube(cube_path)
        shape = cube["flux"].shape[1:]
        phot, phot_ivar = None, None
        if photometry and i < len(photometry) and photometry[i]:
            phot, phot_ivar, pnotes = read_photometry(photometry[i], shape)
            cube["notes"] += pnotes
        name = cube_path.name.split(".")[0]
        cubes.append({**cube, "name": name, "object_id": object_ids[i] if object_ids else i,
                      "redshift": redshifts[i] if redshifts else 0.0, "photometry": phot, "photometry_ivar": phot_ivar})  # fmt: skip
        notes[name] = cube["notes"] + [f"{cube['nan_spaxels']} spaxels without any finite flux (kept; flagged nan_pixels by a run)"]
    write_ifu_store(store, cubes, spaxels_per_batch=spaxels_per_batch, overwrite=overwrite,
                    survey={"source": [str(p) for p in cube_paths]})  # fmt: skip
    return {"store": str(store), "cubes": {c["name"]: {"shape": list(c["flux"].shape),
                                                       "wavelength": [float(c["wave"][0]), float(c["wave"][-1])],
                                                       "redshift": c["redshift"]} for c in cubes},
            "notes": notes}  # fmt: skip
