"""Path constants and pure path builders for a run's output directory."""

from __future__ import annotations

from pathlib import Path

PARTS_DIR = "parts"
DONE_DIR = "done"
CATALOG_DIR = "catalog"
MAPS_STORE = "maps.zarr"  # group: maps (N, P, H, W), object_id (N,); attrs names, units, pixel_scale_arcsec
SFH_STORE = "sfh.zarr"  # one group per cube id: sfh, metallicity (bins, Y, X), mean maps; attrs units, wcs
RUN_RECORD = "run.json"
RUN_LOCK = "run.lock"
TRUTH_SUFFIX = ".truth.parquet"


def unit_name(unit_index: int) -> str:
    """Stable name of a unit of work: its index, zero-padded so names sort."""
    return f"unit-{unit_index:07d}"


def part_path(out_dir: Path, unit_index: int) -> Path:
    return Path(out_dir) / PARTS_DIR / f"{unit_name(unit_index)}.parquet"


def done_marker_path(out_dir: Path, unit_index: int) -> Path:
    return Path(out_dir) / DONE_DIR / f"{unit_name(unit_index)}.json"


def run_record_path(out_dir: Path) -> Path:
    return Path(out_dir) / RUN_RECORD


def catalog_path(out_dir: Path) -> Path:
    return Path(out_dir) / CATALOG_DIR


def maps_path(out_dir: Path) -> Path:
    return Path(out_dir) / MAPS_STORE


def sfh_path(out_dir: Path) -> Path:
    return Path(out_dir) / SFH_STORE


def truth_path(store_path: Path) -> Path:
    """Where a mock store's truth table lies: beside the store, `STORE.truth.parquet`."""
    store_path = Path(store_path)
    return store_path.with_name(store_path.name + TRUTH_SUFFIX)


def truth_maps_path(store_path: Path) -> Path:
    """Where a mock store's resolved truth maps lie, when asked for: `STORE.truth_maps.zarr` (Zarr v3)."""
    store_path = Path(store_path)
    return store_path.with_name(store_path.name + ".truth_maps.zarr")
