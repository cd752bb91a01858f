"""A lazy selection of catalog rows (an LSDB catalog) that remembers the columns' units.

Every search returns a new :class:`Selection`; nothing is read until ``to_pandas()`` / ``to_astropy()``.
Positions and radii accept astropy Quantities (a bare number is degrees for positions, arcsec for radii);
filters accept a Quantity in any unit convertible to the column's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import astropy.units as u
import lsdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from astropy.table import QTable, Table

COMPARISONS = ("<", "<=", ">", ">=", "==", "!=")
DISTANCE_COLUMN = "_dist_arcsec"  # the separation column lsdb's cross-match adds


def _angle(value: float | u.Quantity, unit: u.UnitBase, what: str) -> float:
    """An angle as a number in ``unit``; a bare number is taken to be in ``unit`` already."""
    if not isinstance(value, u.Quantity):
        return float(value)
    try:
        return float(value.to_value(unit))
    except u.UnitConversionError:
        raise ValueError(f"{what} must be an angle, got {value}") from None


def arcsec(value: float | u.Quantity, what: str = "radius") -> float:
    """An angle in arcsec; a bare number is taken as arcsec."""
    return _angle(value, u.arcsec, what)


def degrees(value: float | u.Quantity, what: str) -> float:
    """An angle in degrees; a bare number is taken as degrees."""
    return _angle(value, u.deg, what)


def parse_unit(text: str) -> u.UnitBase | None:
    """The astropy unit of a column's ``unit`` metadata, or None when it has none or astropy cannot read it."""
    if not text:
        return None
    try:
        return u.Unit(text)
    except ValueError:
        return None


def units_of(schema_path: Path) -> dict[str, str]:
    """Column units from the ``unit`` field metadata of a Parquet schema (what survey_infer writes)."""
    schema = pq.read_schema(schema_path)
    return {f.name: (f.metadata or {}).get(b"unit", b"").decode() for f in schema}


class Selection:
    """Rows of a catalog, lazily: searches, filters and cross-matches return new selections."""

    def __init__(self, catalog: lsdb.Catalog, units: dict[str, str]):
        self._catalog = catalog
        self.units = dict(units)

    @property
    def lsdb(self) -> lsdb.Catalog:
        """The underlying LSDB catalog (Dask-backed), for anything this class does not wrap."""
        return self._catalog

    @property
    def columns(self) -> list[str]:
        return list(self._catalog.columns)

    def _new(self, catalog: lsdb.Catalog, units: dict[str, str] | None = None) -> Selection:
        return Selection(catalog, self.units if units is None else units)

    def cone(self, ra: float | u.Quantity, dec: float | u.Quantity, radius: float | u.Quantity) -> Selection:
        """Rows within ``radius`` (arcsec if a number) of (ra, dec) (degrees if numbers)."""
        radius_arcsec = arcsec(radius)
        if radius_arcsec <= 0:
            raise ValueError(f"radius must be positive, got {radius}")
        return self._new(self._catalog.cone_search(degrees(ra, "ra"), degrees(dec, "dec"), radius_arcsec))

    def box(self, ra: tuple[float, float], dec: tuple[float, float]) -> Selection:
        """Rows with ra in [ra0, ra1] (wrapping through 0 when ra0 > ra1) and dec in [dec0, dec1], degrees."""
        ra_range = tuple(degrees(v, "ra") for v in ra)
        dec_range = tuple(degrees(v, "dec") for v in dec)
        return self._new(self._catalog.box_search(ra=ra_range, dec=dec_range))

    def polygon(self, vertices: list[tuple[float, float]]) -> Selection:
        """Rows inside the spherical polygon with these (ra, dec) vertices, degrees."""
        if len(vertices) < 3:
            raise ValueError(f"a polygon needs at least 3 vertices, got {len(vertices)}")
        points = [(degrees(ra, "ra"), degrees(dec, "dec")) for ra, dec in vertices]
        return self._new(self._catalog.polygon_search(points))

    def where(self, column: str, op: str, value: Any) -> Selection:
        """Rows where ``column op value``; a Quantity value is converted to the column's unit."""
        if column not in self.columns:
            raise KeyError(f"no column {column!r} in the catalog; columns: {', '.join(self.columns)}")
        if op not in COMPARISONS:
            raise ValueError(f"op must be one of {', '.join(COMPARISONS)}, got {op!r}")
        value = self._in_column_unit(column, value)
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, (int, float, str, bool)):
            raise TypeError(f"compare {column!r} with a number, a string or a Quantity, not {type(value).__name__}")
        return self._new(self._catalog.query(f"`{column}` {op} {value!r}"))

    def _in_column_unit(self, column: str, value: Any) -> Any:
        if not isinstance(value, u.Quantity):
            return value
        unit = parse_unit(self.units.get(column, ""))
        if unit is None:
            raise ValueError(f"column {column!r} has no unit; compare it with a plain number, not {value}")
        try:
            return value.to_value(unit)
        except u.UnitConversionError:
            raise ValueError(f"column {column!r} is in {unit}; {value} cannot be converted to it") from None

    def select(self, columns: list[str]) -> Selection:
        """Only these columns (ra and dec are always kept, so the result stays searchable)."""
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise KeyError(f"no column(s) {missing} in the catalog; columns: {', '.join(self.columns)}")
        keep = list(dict.fromkeys([*columns, "ra", "dec"]))
        return self._new(self._catalog[keep])

    def xmatch(self, other: Selection | str | Path, radius: float | u.Quantity = 1.0, n_neighbors: int = 1,
               suffix: str = "_other", ra_column: str = "ra", dec_column: str = "dec") -> Selection:  # fmt: skip
        """Each row's ``n_neighbors`` nearest rows of ``other`` within ``radius`` (arcsec if a number).

        ``other``: a Selection, a HATS catalog directory, or an astropy-readable table file (FITS, ECSV, VOTable,
        CSV, Parquet) with ``ra_column``/``dec_column`` in degrees. Columns of ``other`` that this selection
        also has get ``suffix``; the separation is ``_dist_arcsec``.
        """
        radius_arcsec = arcsec(radius)
        if radius_arcsec <= 0:
            raise ValueError(f"radius must be positive, got {radius}")
        if not isinstance(other, Selection):
            other = open_other(Path(other), ra_column, dec_column, margin_arcsec=2 * radius_arcsec)
        matched = self._catalog.crossmatch(
            other.lsdb, radius_arcsec=radius_arcsec, n_neighbors=n_neighbors, suffixes=("", suffix),
            suffix_method="overlapping_columns", log_changes=False,
        )  # fmt: skip
        units = {**{f"{k}{suffix}" if k in self.units else k: v for k, v in other.units.items()}, **self.units}
        return self._new(matched, {**units, DISTANCE_COLUMN: "arcsec"})

    def to_pandas(self) -> pd.DataFrame:
        """Compute the selection (Dask) into a DataFrame sorted by object_id when there is one."""
        frame = self._catalog.compute()
        frame = pd.DataFrame(frame).reset_index(drop=True)
        if "object_id" in frame.columns:
            frame = frame.sort_values("object_id", kind="stable").reset_index(drop=True)
        return frame

    def to_astropy(self) -> QTable:
        """Compute into an astropy QTable whose columns carry their units."""
        return to_qtable(self.to_pandas(), self.units)

    def __len__(self) -> int:
        return len(self._catalog.compute())


def to_qtable(frame: pd.DataFrame, units: dict[str, str]) -> QTable:
    """A DataFrame as a QTable, each column with the unit its catalog records (when astropy can read it)."""
    table = QTable()
    for name in frame.columns:
        values = frame[name].to_numpy()
        if values.dtype == object or pd.api.types.is_string_dtype(frame[name].dtype):
            table[name] = np.asarray(frame[name].astype(str))
            continue
        values = np.asarray(frame[name].to_numpy(dtype=float if frame[name].hasnans else None))
        unit = parse_unit(units.get(name, ""))
        table[name] = values * unit if unit is not None else values
    return table


def read_external_table(path: Path, ra_column: str = "ra", dec_column: str = "dec") -> pd.DataFrame:
    """An astropy-readable table (FITS, ECSV, VOTable, CSV, Parquet) as a DataFrame with ra/dec in degrees."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no table at {path}")
    table = Table.read(path)
    for column in (ra_column, dec_column):
        if column not in table.colnames:
            raise KeyError(f"{path}: no column {column!r}; columns: {', '.join(table.colnames)}")
    frame = table.to_pandas()
    for column in (ra_column, dec_column):
        col = table[column]
        if getattr(col, "unit", None) is not None and col.unit != u.deg:
            frame[column] = col.to_value(u.deg)
    bad = ~np.isfinite(frame[ra_column].to_numpy(float)) | ~np.isfinite(frame[dec_column].to_numpy(float))
    if bad.any():
        raise ValueError(f"{path}: {int(bad.sum())} rows have NaN or infinite {ra_column}/{dec_column}")
    return frame


def open_other(path: Path, ra_column: str = "ra", dec_column: str = "dec", margin_arcsec: float = 5.0) -> Selection:
    """A HATS catalog (or collection) directory, or a table file, as a Selection to cross-match against."""
    if path.is_dir():
        if not any((path / name).is_file() for name in ("hats.properties", "properties", "collection.properties")):
            raise ValueError(f"{path} is a directory but not a HATS catalog (no hats.properties)")
        catalog = lsdb.open_catalog(path)
        units = {}
        return Selection(catalog, units)
    frame = read_external_table(path, ra_column, dec_column)
    units = {name: str(col.unit) for name, col in Table.read(path).columns.items() if getattr(col, "unit", None)}
    catalog = lsdb.from_dataframe(frame, ra_column=ra_column, dec_column=dec_column, margin_threshold=margin_arcsec)
    return Selection(catalog, units)
