"""Downstream access to what a run wrote: its HATS catalog (via LSDB), run record, maps and SFH cubes.

``catalogs.open(DIR)`` opens one run; ``catalogs.open_runs([DIR, ...])`` joins runs over the same sources on
object_id. Searches (cone, box, polygon), unit-aware filters and cross-matches stay lazy (Dask) until
``to_pandas()`` / ``to_astropy()``; ``sql()`` runs DuckDB over the catalog's Parquet.
"""

from catalogs.run import CubeSFH, ObjectMaps, RunCatalog, open_run, open_runs
from catalogs.selection import Selection, read_external_table

open = open_run  # noqa: A001  (the issue's spelling: catalogs.open(DIR))


def cone_search(out_dir, ra: float, dec: float, radius_arcsec: float):
    """Rows of a run's catalog within ``radius_arcsec`` of (ra, dec) degrees, as a DataFrame."""
    return open_run(out_dir).cone(ra, dec, radius_arcsec).to_pandas()


__all__ = ["CubeSFH", "ObjectMaps", "RunCatalog", "Selection", "cone_search", "open", "open_run", "open_runs",
           "read_external_table"]
