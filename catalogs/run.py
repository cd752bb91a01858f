"""Open what a survey-infer run wrote: its HATS catalog (lazy, LSDB), its run record and its Zarr products.

A run directory (see ``survey_infer.paths``) holds ``run.json``, ``parts/`` (the pipeline's Parquet parts),
``catalog/`` (a HATS collection: the object catalog plus a margin cache, made by hats-import) and, for tasks
that make them, ``maps.zarr`` and ``sfh.zarr``:

- ``maps.zarr``: arrays ``maps`` (N, P, H, W) and ``object_id`` (N,); attrs ``names`` and ``units`` (P each;
  the group's, or the ``maps`` array's as a run writes them)
  and ``pixel_scale_arcsec`` (a number, or an array ``pixel_scale_arcsec`` (N,)). Map pixels are centred on
  the object's ra/dec from the catalog.
- ``sfh.zarr``: one group per cube id holding ``sfh`` and ``metallicity`` (bins, Y, X) and 2-D mean maps;
  group attrs ``units`` (per array), ``age_bins_yr`` and ``wcs`` (the cube's celestial FITS header cards).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import astropy.units as u
import lsdb
import numpy as np
import zarr
from astropy.wcs import WCS

from catalogs.selection import Selection, parse_unit, units_of
from survey_infer import paths
from survey_infer.hats_catalog import quiet_collection_notice

SQL_TABLE = "objects"  # the table name SQL queries see: every catalog row


@dataclass
class ObjectMaps:
    """One object's property maps: ``data[name]`` a Quantity (H, W), with the maps' celestial WCS."""

    object_id: int
    data: dict[str, u.Quantity]
    wcs: WCS


@dataclass
class CubeSFH:
    """One cube's SFH products: ``data[name]`` Quantities, ``age_bins_yr``, and the cube's celestial WCS."""

    cube_id: str
    data: dict[str, u.Quantity]
    age_bins_yr: np.ndarray
    wcs: WCS | None


class RunCatalog(Selection):
    """A run's output: every row (a :class:`Selection`), the run record, maps and SFH cubes, SQL."""

    def __init__(self, out_dir: str | Path, *, require_complete: bool = True):
        self.path = Path(out_dir)
        record_file = paths.run_record_path(self.path)
        if not record_file.is_file():
            raise FileNotFoundError(f"{self.path} is not a survey-infer run: no {paths.RUN_RECORD}")
        self.record: dict[str, Any] = json.loads(record_file.read_text())
        status = self.record.get("status")
        if require_complete and status != "complete":
            raise ValueError(f"run in {self.path} has status {status!r}; its catalog may be incomplete "
                             "(pass require_complete=False to read it anyway)")  # fmt: skip
        catalog_dir = paths.catalog_path(self.path)
        if not catalog_dir.is_dir():
            raise FileNotFoundError(f"{self.path} has no HATS catalog ({catalog_dir}); it was run with "
                                    "--no-catalog. Re-run it to build one (finished units are skipped).")  # fmt: skip
        with quiet_collection_notice():
            self.objects_dir = _objects_dir(catalog_dir)
            catalog = lsdb.open_catalog(catalog_dir)
        super().__init__(catalog, units_of(self.objects_dir / "dataset" / "_common_metadata"))

    @property
    def task(self) -> str:
        return str(self.record.get("task", ""))

    def parquet_files(self) -> list[Path]:
        """The object catalog's Parquet files (HEALPix partitions)."""
        return sorted((self.objects_dir / "dataset").glob("Norder=*/Dir=*/Npix=*.parquet"))

    def sql(self, query: str):
        """Run DuckDB SQL over the catalog; the rows are the table ``objects``. Returns a pandas DataFrame."""
        import duckdb

        files = ", ".join("'" + str(p).replace("'", "''") + "'" for p in self.parquet_files())
        with duckdb.connect() as con:
            con.execute(f"CREATE VIEW {SQL_TABLE} AS SELECT * FROM read_parquet([{files}], union_by_name = true)")
            return con.execute(query).df()

    def info(self) -> dict[str, Any]:
        """What the run was: task, bundle, engine, code version, rows, columns with units, products."""
        record = self.record
        return {
            "path": str(self.path),
            "task": self.task,
            "status": record.get("status"),
            "bundle": record.get("bundle", {}).get("id"),
            "engine": record.get("config", {}).get("engine"),
            "code_version": record.get("code_version"),
            "input": record.get("input", {}).get("path"),
            "rows": sum(self._partition_rows()),
            "partitions": len(self.parquet_files()),
            "columns": {c: self.units.get(c, "") for c in self.columns},
            "maps": paths.maps_path(self.path).exists(),
            "sfh_cubes": self.cube_ids() if paths.sfh_path(self.path).exists() else [],
        }

    def _partition_rows(self) -> list[int]:
        import pyarrow.parquet as pq

        return [pq.ParquetFile(p).metadata.num_rows for p in self.parquet_files()]

    # ------------------------------------------------------------------------------------------ products
    def maps(self, object_id: int) -> ObjectMaps:
        """The property maps of one object, with units and a TAN WCS centred on its catalog position."""
        store = paths.maps_path(self.path)
        if not store.exists():
            raise FileNotFoundError(f"run {self.path} ({self.task}) wrote no maps ({store} is missing)")
        group = zarr.open_group(store, mode="r")
        ids = np.asarray(group["object_id"][:])
        rows = np.flatnonzero(ids == int(object_id))
        if rows.size == 0:
            raise KeyError(f"object_id {object_id} has no maps in {store}")
        row = int(rows[0])
        cube = np.asarray(group["maps"][row])
        attrs = group.attrs if "names" in group.attrs else group["maps"].attrs  # run outputs: the array's attrs
        names, units = list(attrs["names"]), list(attrs.get("units", [""] * cube.shape[0]))
        data = {n: cube[k] * (parse_unit(units[k]) or u.dimensionless_unscaled) for k, n in enumerate(names)}
        scale = group.attrs.get("pixel_scale_arcsec")
        if scale is None:
            scale = float(group["pixel_scale_arcsec"][row])
        ra, dec = self._position(int(object_id))
        return ObjectMaps(int(object_id), data, _tan_wcs(ra, dec, float(scale), cube.shape[-2:]))

    def _position(self, object_id: int) -> tuple[float, float]:
        found = self.sql(f"SELECT ra, dec FROM {SQL_TABLE} WHERE object_id = {int(object_id)}")
        if found.empty:
            raise KeyError(f"object_id {object_id} is not in the catalog of {self.path}")
        return float(found.ra[0]), float(found.dec[0])

    def cube_ids(self) -> list[str]:
        store = paths.sfh_path(self.path)
        return sorted(name for name, _ in zarr.open_group(store, mode="r").groups())

    def sfh(self, cube_id: str) -> CubeSFH:
        """One cube's SFH, metallicity and mean maps, with units, age bins and the cube's WCS."""
        store = paths.sfh_path(self.path)
        if not store.exists():
            raise FileNotFoundError(f"run {self.path} ({self.task}) wrote no SFH cubes ({store} is missing)")
        root = zarr.open_group(store, mode="r")
        if str(cube_id) not in root:
            raise KeyError(f"cube {cube_id!r} not in {store}; cubes: {', '.join(self.cube_ids())}")
        group = root[str(cube_id)]
        units = dict(group.attrs.get("units", {}))
        data = {name: np.asarray(arr[:]) * (parse_unit(units.get(name, "")) or u.dimensionless_unscaled)
                for name, arr in group.arrays()}  # fmt: skip
        header = group.attrs.get("wcs")
        return CubeSFH(str(cube_id), data, np.asarray(group.attrs.get("age_bins_yr", [])), WCS(header) if header else None)


def _objects_dir(catalog_dir: Path) -> Path:
    """The object catalog inside a collection (or the catalog itself, for a bare HATS catalog)."""
    import hats

    found = hats.read_hats(catalog_dir)
    return Path(str(found.main_catalog_dir if hasattr(found, "main_catalog_dir") else found.catalog_path))


def _tan_wcs(ra: float, dec: float, scale_arcsec: float, shape: tuple[int, int]) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [(shape[1] + 1) / 2.0, (shape[0] + 1) / 2.0]
    wcs.wcs.cdelt = [-scale_arcsec / 3600.0, scale_arcsec / 3600.0]
    return wcs


def open_run(out_dir: str | Path, *, require_complete: bool = True) -> RunCatalog:
    """Open a run directory (refuses one whose run did not complete unless ``require_complete=False``)."""
    return RunCatalog(out_dir, require_complete=require_complete)


def open_runs(out_dirs: list[str | Path]) -> Selection:
    """Several runs over the same sources (e.g. different tasks) joined row by row on object_id.

    Columns every run has (ra, dec, flag, ...) are kept once from the first run; the others' copies get the
    suffix ``_<task>`` (``_<task>_<k>`` if two runs share a task).
    """
    runs = [open_run(d) for d in out_dirs]
    if not runs:
        raise ValueError("open_runs needs at least one run directory")
    joined, units = runs[0].lsdb, dict(runs[0].units)
    seen_tasks: dict[str, int] = {}
    for run in runs[1:]:
        count = seen_tasks[run.task] = seen_tasks.get(run.task, 0) + 1
        suffix = f"_{run.task}" if run.task != runs[0].task and count == 1 else f"_{run.task}_{count}"
        joined = joined.join(run.lsdb, left_on="object_id", right_on="object_id", suffixes=("", suffix),
                             suffix_method="overlapping_columns", log_changes=False)  # fmt: skip
        units.update({(f"{k}{suffix}" if k in units else k): v for k, v in run.units.items()})
    return Selection(joined, units)
