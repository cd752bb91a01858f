"""Open a run's HATS catalog with LSDB (lazy, Dask-backed) and answer cone searches."""

from __future__ import annotations

import json
from pathlib import Path

import lsdb
import pandas as pd

from survey_infer import paths


def open_run(out_dir: str | Path, columns: list[str] | None = None) -> lsdb.Catalog:
    """The run's catalog as an LSDB catalog; refuses a run that did not complete."""
    out_dir = Path(out_dir)
    record = json.loads(paths.run_record_path(out_dir).read_text())
    if record.get("status") != "complete":
        raise ValueError(f"run in {out_dir} has status {record.get('status')!r}; its catalog may be incomplete")
    return lsdb.open_catalog(paths.catalog_path(out_dir), columns=columns)


def cone_search(out_dir: str | Path, ra: float, dec: float, radius_arcsec: float) -> pd.DataFrame:
    """Rows of the run's catalog within ``radius_arcsec`` of (ra, dec), in degrees."""
    return open_run(out_dir).cone_search(ra, dec, radius_arcsec).compute()
