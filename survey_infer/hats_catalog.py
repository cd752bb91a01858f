"""Turn a run's Parquet parts into a HATS collection with hats-import, on the run's own Dask client.

The collection (``out/catalog``) holds the object catalog (``objects``) and a margin cache of
``MARGIN_ARCSEC`` (``objects_<margin>``) so that cross-matches within that radius are right at partition edges.
``lsdb.open_catalog(out/catalog)`` loads both.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
from distributed import Client

from survey_infer import paths

CATALOG_NAME = paths.CATALOG_DIR
OBJECTS_NAME = "objects"
MARGIN_ARCSEC = 10.0  # cross-match radii up to this are exact at partition edges
# Rows per HEALPix partition before hats-import splits it; small enough for fast cone searches.
PIXEL_THRESHOLD = 250_000


class _CollectionNotice(logging.Filter):
    """Drops hats' root-logger warning 'Looking for catalog - found collection.': a collection is what we want."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "found collection" not in record.getMessage()


@contextmanager
def quiet_collection_notice() -> Iterator[None]:
    """Silence that one hats warning while a collection is built or opened."""
    notice = _CollectionNotice()
    root = logging.getLogger()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


def build_hats_catalog(out_dir: Path, client: Client, *, progress: bool = False) -> Path:
    """(Re)build the collection ``out_dir/catalog`` from ``out_dir/parts/*.parquet``; return its path.

    The parts' schema (with the units in its field metadata) is handed to hats-import as the schema file,
    so the catalog keeps the same column types and units.
    """
    from hats_import.collection.arguments import CollectionArguments
    from hats_import.pipeline import pipeline_with_client

    parts = sorted(str(p) for p in (out_dir / paths.PARTS_DIR).glob("*.parquet"))
    if not parts:
        raise ValueError(f"no Parquet parts in {out_dir / paths.PARTS_DIR} to build a catalog from")
    target = paths.catalog_path(out_dir)
    tmp_dir = out_dir / ".catalog_tmp"
    for stale in (target, tmp_dir):
        if stale.exists():
            shutil.rmtree(stale)
    tmp_dir.mkdir()
    schema_file = tmp_dir / "schema.parquet"
    pq.write_table(pq.read_schema(parts[0]).empty_table(), schema_file)
    args = (
        CollectionArguments(
            output_path=str(out_dir), output_artifact_name=CATALOG_NAME, tmp_dir=str(tmp_dir), resume=False,
            progress_bar=progress,
        )
        .catalog(
            output_artifact_name=OBJECTS_NAME, input_file_list=parts, file_reader="parquet", ra_column="ra",
            dec_column="dec", use_schema_file=str(schema_file), pixel_threshold=PIXEL_THRESHOLD,
            highest_healpix_order=8,
        )
        .add_margin(margin_threshold=MARGIN_ARCSEC, is_default=True)
    )  # fmt: skip
    with quiet_collection_notice():
        pipeline_with_client(args, client)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    return target
