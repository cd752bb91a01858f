"""The `kinematics` store: the stars (positions + line-of-sight velocities) of dispersion-supported galaxies.

Layout (a Zarr v3 group, attrs ``{"survey_infer": {"format": 1, "kind": "kinematics"}}``, ``position_unit``
("kpc" or "arcsec": the unit of x, y and r_half), ``velocity_unit`` "km/s", ``survey``):

- ``stars/<column>``: 1-D, one row per star, sorted by galaxy (the order of ``galaxies/galaxy_id``):
  ``galaxy_id`` int64, ``x``, ``y`` float64 (projected position about the galaxy's centre), ``v_los``,
  ``v_err`` float64 (km/s);
- ``galaxies/<column>``: 1-D, one row per galaxy, strictly increasing ``galaxy_id`` int64, ``ra``, ``dec``
  float64 (deg, the galaxy's position: rows of the output catalog are placed by it), ``distance_mpc`` float64
  (NaN allowed when positions are in kpc), optional ``r_half`` (position_unit), ``star_start`` and
  ``star_count`` int64: galaxy k's stars are rows ``[star_start[k], star_start[k] + star_count[k])`` of
  ``stars``, so a unit of galaxies reads one contiguous slice of stars.

One block of galaxy rows (the ``galaxies`` arrays' chunk, ``galaxies_per_unit``) is one unit of work; a unit
reads its galaxies ``galaxies_per_batch`` at a time and hands each batch to the task as a :class:`StarBatch`
(positions converted to kpc with the galaxy's distance where they are in arcsec).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr

from survey_infer.errors import StoreError
from survey_infer.store import STORE_FORMAT, RowBlockStore, open_store

STARS_GROUP = "stars"
GALAXIES_GROUP = "galaxies"
STAR_COLUMNS = {"galaxy_id": np.dtype("int64"), "x": np.dtype("float64"), "y": np.dtype("float64"),
                "v_los": np.dtype("float64"), "v_err": np.dtype("float64")}  # fmt: skip
GALAXY_COLUMNS = {"galaxy_id": np.dtype("int64"), "ra": np.dtype("float64"), "dec": np.dtype("float64"),
                  "distance_mpc": np.dtype("float64"), "star_start": np.dtype("int64"),
                  "star_count": np.dtype("int64")}  # fmt: skip
OPTIONAL_GALAXY_COLUMNS = {"r_half": np.dtype("float64")}
POSITION_UNITS = ("kpc", "arcsec")
KPC_PER_ARCSEC_PER_MPC = 1e3 * np.pi / (180.0 * 3600.0)
DEFAULT_GALAXIES_PER_UNIT = 256
DEFAULT_GALAXIES_PER_BATCH = 64
STAR_CHUNK = 1 << 18
VALIDATE_PIECE = 1 << 21  # stars checked per read when a store is opened


@dataclass
class StarBatch:
    """The stars of a batch of galaxies, ragged: galaxy k's stars are rows ``[offsets[k], offsets[k+1])``.

    x, y [kpc] projected about the galaxy's centre; v_los, v_err [km/s].
    """

    x: np.ndarray
    y: np.ndarray
    v_los: np.ndarray
    v_err: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_lists(cls, galaxies: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> StarBatch:
        """From per-galaxy (x, y, v_los, v_err) arrays."""
        offsets = np.zeros(len(galaxies) + 1, np.int64)
        offsets[1:] = np.cumsum([len(g[0]) for g in galaxies])
        cat = [np.concatenate([np.asarray(g[k], np.float64) for g in galaxies]) if galaxies else np.zeros(0)
               for k in range(4)]  # fmt: skip
        return cls(*cat, offsets)


@dataclass(frozen=True)
class KinematicsStoreInfo(RowBlockStore):
    """What the pipeline needs to know about a validated `kinematics` store (rows = galaxies)."""

    path: Path
    n_rows: int
    n_stars: int
    rows_per_block: int
    rows_per_read: int
    position_unit: str
    columns: dict[str, np.dtype]
    attrs: dict[str, Any] = field(default_factory=dict)
    kind: str = "kinematics"
    id_column: str = "galaxy_id"

    @property
    def columns_path(self) -> Path:
        return self.path / GALAXIES_GROUP

    def describe(self) -> dict[str, Any]:
        return {"galaxies": self.n_rows, "stars": self.n_stars, "position_unit": self.position_unit}


# ------------------------------------------------------------------------------------------------- writing


def write_kinematics_store(
    path: str | Path,
    stars: dict[str, np.ndarray],
    galaxies: dict[str, np.ndarray],
    *,
    position_unit: str = "kpc",
    survey: dict[str, Any] | None = None,
    galaxies_per_unit: int = DEFAULT_GALAXIES_PER_UNIT,
    galaxies_per_batch: int = DEFAULT_GALAXIES_PER_BATCH,
    overwrite: bool = False,
) -> Path:
    """Write a `kinematics` store from star columns (any order) and galaxy columns (any order).

    ``stars``: galaxy_id, x, y, v_los, v_err. ``galaxies``: galaxy_id, ra, dec, distance_mpc, optional
    r_half (and any other 1-D float/int columns, kept). Stars are sorted by galaxy (stably), offsets computed;
    every star must belong to a listed galaxy. The result is validated by :func:`open_kinematics`.
    """
    path = Path(path)
    if position_unit not in POSITION_UNITS:
        raise StoreError(f"position unit {position_unit!r}; one of {POSITION_UNITS} was expected")
    for name in STAR_COLUMNS:
        if name not in stars:
            raise StoreError(f"star column {name!r} is missing; {', '.join(STAR_COLUMNS)} are needed")
    for name in ("galaxy_id", "ra", "dec"):
        if name not in galaxies:
            raise StoreError(f"galaxy column {name!r} is missing; galaxy_id, ra, dec (+ distance_mpc) are needed")
    n_gal = len(galaxies["galaxy_id"])
    if n_gal == 0:
        raise StoreError("no galaxies: a kinematics store needs at least one")
    gal_ids = np.asarray(galaxies["galaxy_id"], np.int64)
    order_g = np.argsort(gal_ids, kind="stable")
    gal_ids = gal_ids[order_g]
    if np.any(np.diff(gal_ids) == 0):
        dup = gal_ids[1:][np.diff(gal_ids) == 0]
        raise StoreError(f"galaxy column 'galaxy_id' has repeated ids {dup[:5].tolist()}; ids must be unique")
    star_gal = np.asarray(stars["galaxy_id"], np.int64)
    where = np.searchsorted(gal_ids, star_gal)
    known = (where < n_gal) & (gal_ids[np.minimum(where, n_gal - 1)] == star_gal)
    if not known.all():
        raise StoreError(f"star column 'galaxy_id' names galaxies absent from the galaxies: "
                         f"{np.unique(star_gal[~known])[:5].tolist()}")  # fmt: skip
    order_s = np.argsort(where, kind="stable")
    counts = np.bincount(where, minlength=n_gal).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    galaxies_per_unit = max(1, min(galaxies_per_unit, n_gal))
    galaxies_per_batch = max(1, min(galaxies_per_batch, galaxies_per_unit))
    group = zarr.open_group(str(path), mode="w" if overwrite else "w-", zarr_format=3)
    group.attrs.update({
        "survey_infer": {"format": STORE_FORMAT, "kind": "kinematics"},
        "position_unit": position_unit,
        "velocity_unit": "km/s",
        "galaxies_per_batch": int(galaxies_per_batch),
        "survey": survey or {},
    })  # fmt: skip
    sg = group.create_group(STARS_GROUP)
    n_stars = len(star_gal)
    for name, dtype in STAR_COLUMNS.items():
        values = np.asarray(stars[name], dtype=dtype)[order_s]
        if len(values) != n_stars:
            raise StoreError(f"star column {name!r} has {len(values)} rows; {n_stars} (the length of galaxy_id) expected")
        sg.create_array(name, shape=(n_stars,), chunks=(max(1, min(STAR_CHUNK, n_stars)),), dtype=dtype)[:] = values
    gg = group.create_group(GALAXIES_GROUP)
    columns = {name: np.asarray(values)[order_g] for name, values in galaxies.items()}
    columns.setdefault("distance_mpc", np.full(n_gal, np.nan))
    columns.update(galaxy_id=gal_ids, star_start=starts, star_count=counts)
    for name, values in columns.items():
        if values.ndim != 1 or len(values) != n_gal:
            raise StoreError(f"galaxy column {name!r} has shape {values.shape}; ({n_gal},) was expected")
        dtype = GALAXY_COLUMNS.get(name) or OPTIONAL_GALAXY_COLUMNS.get(name) or values.dtype
        gg.create_array(name, shape=(n_gal,), chunks=(galaxies_per_unit,), dtype=dtype)[:] = values.astype(dtype)
    try:
        open_kinematics(path)
    except StoreError:  # a refused store is not left behind half-valid
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


# ------------------------------------------------------------------------------------------------- reading


def _arrays(group: zarr.Group, name: str, path: Path) -> dict[str, zarr.Array]:
    if name not in group:
        raise StoreError(f"kinematics store {path} has no '{name}' group")
    return dict(group[name].arrays())


def _check_columns(arrays: dict[str, zarr.Array], wanted: dict[str, np.dtype], where: str) -> int:
    lengths = set()
    for name, dtype in wanted.items():
        if name not in arrays:
            raise StoreError(f"{where} has no column '{name}'; {dtype} was expected")
        if np.dtype(arrays[name].dtype).kind != dtype.kind:
            raise StoreError(f"column '{name}' in {where} has dtype {arrays[name].dtype}; {dtype} was expected")
    for name, array in arrays.items():
        if array.ndim != 1:
            raise StoreError(f"column '{name}' in {where} has shape {array.shape}; 1-D was expected")
        lengths.add(array.shape[0])
    if len(lengths) != 1:
        raise StoreError(f"the columns of {where} differ in length: "
                         f"{ {n: a.shape[0] for n, a in arrays.items()} }")  # fmt: skip
    return lengths.pop()


def _read(arrays: dict[str, zarr.Array], name: str, where: str, rows: slice = slice(None)) -> np.ndarray:
    """A column's rows; a damaged chunk is refused naming the column (zarr and its codecs raise many types)."""
    try:
        return np.asarray(arrays[name][rows])
    except Exception as exc:
        raise StoreError(f"column '{name}' in {where} cannot be read: {type(exc).__name__}: {exc}") from exc


def open_kinematics(path: str | Path) -> KinematicsStoreInfo:
    """Open and validate a `kinematics` store; refuse it with a message naming the group and column at fault.

    Checked: both groups and their columns (dtype, 1-D, equal lengths), galaxy ids strictly increasing,
    offsets contiguous and covering every star, star galaxy ids matching their galaxy, finite positions,
    finite velocities, finite non-negative errors, galaxy positions in range, distances where positions are in
    arcsec. Reads the star columns once, in pieces.
    """
    path = Path(path)
    group = open_store(path, "kinematics")
    unit = group.attrs.get("position_unit")
    if unit not in POSITION_UNITS:
        raise StoreError(f"kinematics store {path}: attrs 'position_unit' is {unit!r}; one of {POSITION_UNITS} was expected")
    stars = _arrays(group, STARS_GROUP, path)
    galaxies = _arrays(group, GALAXIES_GROUP, path)
    n_stars = _check_columns(stars, STAR_COLUMNS, f"group '{STARS_GROUP}' of {path}")
    n_gal = _check_columns(galaxies, GALAXY_COLUMNS, f"group '{GALAXIES_GROUP}' of {path}")
    where_g = f"group '{GALAXIES_GROUP}' of {path}"
    where_s = f"group '{STARS_GROUP}' of {path}"
    if n_gal == 0:
        raise StoreError(f"{where_g} has no galaxies")
    ids = _read(galaxies, "galaxy_id", where_g)
    bad = np.flatnonzero(np.diff(ids) <= 0)
    if bad.size:
        raise StoreError(f"column 'galaxy_id' in {where_g} is not strictly increasing (rows {(bad[:5] + 1).tolist()}); "
                         "galaxies must be sorted by id, each once")  # fmt: skip
    start = _read(galaxies, "star_start", where_g)
    count = _read(galaxies, "star_count", where_g)
    if (count < 0).any() or start[0] != 0 or np.any(start[1:] != start[:-1] + count[:-1]) or start[-1] + count[-1] != n_stars:
        raise StoreError(f"columns 'star_start'/'star_count' in {where_g} do not cut the {n_stars} stars into "
                         "contiguous per-galaxy slices in galaxy order")  # fmt: skip
    for name, (lo, hi) in {"ra": (-360.0, 720.0), "dec": (-90.0, 90.0)}.items():
        values = _read(galaxies, name, where_g).astype(np.float64)
        with np.errstate(invalid="ignore"):
            wrong = np.flatnonzero(~np.isfinite(values) | (values < lo) | (values > hi))
        if wrong.size:
            raise StoreError(f"column '{name}' in {where_g} has {wrong.size} non-finite or out-of-range values "
                             f"(galaxy ids {ids[wrong[:5]].tolist()}); every galaxy needs a sky position in degrees")  # fmt: skip
    distance = _read(galaxies, "distance_mpc", where_g).astype(np.float64)
    if unit == "arcsec":
        wrong = np.flatnonzero(~(np.isfinite(distance) & (distance > 0)))
        if wrong.size:
            raise StoreError(f"column 'distance_mpc' in {where_g} has {wrong.size} missing or non-positive values "
                             f"(galaxy ids {ids[wrong[:5]].tolist()}); positions in arcsec need a distance")  # fmt: skip
    if "r_half" in galaxies:
        r_half = _read(galaxies, "r_half", where_g).astype(np.float64)
        with np.errstate(invalid="ignore"):
            wrong = np.flatnonzero(r_half <= 0)
        if wrong.size:
            raise StoreError(f"column 'r_half' in {where_g} has non-positive values (galaxy ids {ids[wrong[:5]].tolist()})")
    owner = np.repeat(ids, count)
    for lo in range(0, n_stars, VALIDATE_PIECE):
        hi = min(lo + VALIDATE_PIECE, n_stars)
        gid = _read(stars, "galaxy_id", where_s, slice(lo, hi))
        wrong = np.flatnonzero(gid != owner[lo:hi])
        if wrong.size:
            raise StoreError(f"column 'galaxy_id' in {where_s} does not match the galaxies' star_start/star_count "
                             f"at star rows {(wrong[:5] + lo).tolist()}: stars must be sorted by galaxy id")  # fmt: skip
        for name in ("x", "y", "v_los", "v_err"):
            values = _read(stars, name, where_s, slice(lo, hi)).astype(np.float64)
            wrong = np.flatnonzero(~np.isfinite(values) | ((values < 0) if name == "v_err" else False))
            if wrong.size:
                what = "NaN, infinite or negative" if name == "v_err" else "NaN or infinite"
                raise StoreError(f"column '{name}' in {where_s} has {wrong.size} {what} values at star rows "
                                 f"{(wrong[:5] + lo).tolist()} (galaxies {np.unique(gid[wrong])[:5].tolist()})")  # fmt: skip
    id_array = galaxies["galaxy_id"]
    rows_per_block = int((getattr(id_array, "shards", None) or id_array.chunks)[0])
    per_batch = int(group.attrs.get("galaxies_per_batch", DEFAULT_GALAXIES_PER_BATCH))
    rows_per_read = max(1, min(per_batch, rows_per_block))
    columns = {n: np.dtype(a.dtype) for n, a in galaxies.items()}
    return KinematicsStoreInfo(path=path, n_rows=n_gal, n_stars=n_stars, rows_per_block=rows_per_block,
                               rows_per_read=rows_per_read, position_unit=unit, columns=columns,
                               attrs=dict(group.attrs))  # fmt: skip


def read_star_batch(group: zarr.Group, start: int, stop: int, position_unit: str) -> StarBatch:
    """The stars of galaxies [start, stop) as a StarBatch, positions in kpc."""
    galaxies, stars = group[GALAXIES_GROUP], group[STARS_GROUP]
    first = np.asarray(galaxies["star_start"][start:stop])
    count = np.asarray(galaxies["star_count"][start:stop])
    lo, hi = int(first[0]), int(first[-1] + count[-1])
    cols = {name: np.asarray(stars[name][lo:hi], np.float64) for name in ("x", "y", "v_los", "v_err")}
    offsets = np.concatenate([[0], np.cumsum(count)]).astype(np.int64)
    if position_unit == "arcsec":
        scale = np.repeat(np.asarray(galaxies["distance_mpc"][start:stop], np.float64) * KPC_PER_ARCSEC_PER_MPC, count)
        cols["x"] = cols["x"] * scale
        cols["y"] = cols["y"] * scale
    return StarBatch(cols["x"], cols["y"], cols["v_los"], cols["v_err"], offsets)


def iter_star_batches(path: Path, start: int, stop: int, rows_per_read: int) -> Iterator[tuple[int, StarBatch, np.ndarray]]:
    """(offset, StarBatch, store flags) for galaxies [start, stop), ``rows_per_read`` galaxies at a time."""
    group = zarr.open_group(str(path), mode="r")
    unit = group.attrs["position_unit"]
    for batch_start in range(start, stop, rows_per_read):
        batch_stop = min(batch_start + rows_per_read, stop)
        batch = read_star_batch(group, batch_start, batch_stop, unit)
        yield batch_start - start, batch, np.zeros(len(batch), np.int32)


# ------------------------------------------------------------------------------------------------- ingest

GALAXY_LEVEL = ("ra", "dec", "distance_mpc", "r_half")


def _read_table(path: Path):
    from survey_infer.tiles import read_table

    return read_table(Path(path), "table")


def _values(table, name: str, path: Path, unit: str | None = None) -> np.ndarray:
    """A column as float64 (or its integer ids), converted to ``unit`` when the table carries units."""
    from astropy import units as u

    from survey_infer.tiles import _column

    values = _column(table, name, path)
    if isinstance(values, u.Quantity):
        if unit is None:
            return values.value
        try:
            return values.to_value(u.Unit(unit)).astype(np.float64)
        except u.UnitConversionError as exc:
            raise StoreError(f"column {name!r} of {path} has unit {values.unit}; {unit} was expected") from exc
    return np.asarray(values)


def ingest_kinematics(
    table_path: str | Path,
    store: str | Path,
    *,
    galaxy_id_col: str = "galaxy_id",
    x_col: str = "x",
    y_col: str = "y",
    v_col: str = "v_los",
    v_err_col: str = "v_err",
    position_unit: str = "kpc",
    galaxies_path: str | Path | None = None,
    ra_col: str = "ra",
    dec_col: str = "dec",
    distance_col: str | None = "distance_mpc",
    r_half_col: str | None = None,
    galaxies_per_unit: int = DEFAULT_GALAXIES_PER_UNIT,
    overwrite: bool = False,
) -> dict[str, Any]:
    """A star table (FITS, ECSV, CSV, Parquet) -> a `kinematics` store; columns named by the arguments.

    Galaxy-level columns (ra, dec, distance, r_half) come from ``galaxies_path`` (a table with the same galaxy
    id column) when given, else from the star table, where they must be constant within each galaxy.
    Positions with units in the table are converted to ``position_unit``; velocities to km/s.
    """
    from survey_infer.tiles import _integer_ids

    table_path = Path(table_path)
    table = _read_table(table_path)
    gid = _integer_ids(np.asarray(_values(table, galaxy_id_col, table_path)), galaxy_id_col, table_path)
    stars = {"galaxy_id": gid,
             "x": _values(table, x_col, table_path, position_unit), "y": _values(table, y_col, table_path, position_unit),
             "v_los": _values(table, v_col, table_path, "km/s"), "v_err": _values(table, v_err_col, table_path, "km/s")}  # fmt: skip
    for (name, values), col in zip(list(stars.items())[1:], (x_col, y_col, v_col, v_err_col)):
        try:
            stars[name] = np.asarray(values, np.float64)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"column {col!r} of {table_path} is not numeric: {exc}") from exc
        wrong = np.flatnonzero(~np.isfinite(stars[name]) | ((stars[name] < 0) if name == "v_err" else False))
        if wrong.size:
            what = "NaN, infinite or negative" if name == "v_err" else "NaN or infinite"
            raise StoreError(f"column {col!r} of {table_path} has {wrong.size} {what} values (rows "
                             f"{wrong[:5].tolist()}, galaxies {np.unique(gid[wrong])[:5].tolist()})")  # fmt: skip
    wanted = {"ra": ra_col, "dec": dec_col, "distance_mpc": distance_col, "r_half": r_half_col}
    units = {"ra": "deg", "dec": "deg", "distance_mpc": "Mpc", "r_half": position_unit}
    ids = np.unique(gid)
    galaxies: dict[str, np.ndarray] = {"galaxy_id": ids}
    if galaxies_path is not None:
        gpath = Path(galaxies_path)
        gtable = _read_table(gpath)
        g_ids = _integer_ids(np.asarray(_values(gtable, galaxy_id_col, gpath)), galaxy_id_col, gpath)
        if len(np.unique(g_ids)) != len(g_ids):
            raise StoreError(f"column {galaxy_id_col!r} of {gpath} repeats galaxy ids")
        missing = np.setdiff1d(ids, g_ids)
        if missing.size:
            raise StoreError(f"galaxies {missing[:5].tolist()} of {table_path} are absent from {gpath}")
        galaxies["galaxy_id"] = g_ids
        for key, col in wanted.items():
            if col is None or (key in ("distance_mpc", "r_half") and col not in gtable.colnames):
                continue
            galaxies[key] = np.asarray(_values(gtable, col, gpath, units[key]), np.float64)
    else:
        order = np.argsort(gid, kind="stable")
        first = np.searchsorted(gid[order], ids)
        for key, col in wanted.items():
            if col is None or (key in ("distance_mpc", "r_half") and col not in table.colnames):
                continue
            values = np.asarray(_values(table, col, table_path, units[key]), np.float64)[order]
            per_galaxy = values[first]
            varies = np.flatnonzero(~np.isclose(values, np.repeat(per_galaxy, np.diff(np.append(first, len(gid))))))
            if varies.size:
                raise StoreError(f"column {col!r} of {table_path} differs between stars of galaxy "
                                 f"{gid[order][varies[0]]}; a galaxy-level column must be constant per galaxy "
                                 "(or give a galaxies table with --galaxies)")  # fmt: skip
            galaxies[key] = per_galaxy
    for key in ("ra", "dec"):
        if key not in galaxies:
            raise StoreError(f"no {key} for the galaxies: give --{key}-col (the output catalog places rows by ra, dec)")
    path = write_kinematics_store(store, stars, galaxies, position_unit=position_unit,
                                  survey={"source": str(table_path), "galaxies": str(galaxies_path or "")},
                                  galaxies_per_unit=galaxies_per_unit, overwrite=overwrite)  # fmt: skip
    info = open_kinematics(path)
    return {"store": str(path), "galaxies": info.n_rows, "stars": info.n_stars, "position_unit": position_unit}
