"""Cutouts cut from tiles on the fly against cutouts read from a cutouts store: the same sources, the same bundle.

    python bench/tiles_vs_cutouts.py --tiles 4 --tile-px 2048 --sources-per-tile 1000

1. Mocks ``--tiles`` g-band tiles (training.mock_tiles: Sersic galaxies through a 1.4" PSF, SDSS pixels and
   noise) and ingests them into a tiles store.
2. Cuts every source once through the tiles path (``iter_tile_batches``: window read, sub-pixel cut, area
   resampling to 69 px, log scaling) and writes the result as a cutouts store: the same cutouts, pre-cut.
3. Bare readers: cutouts/s of cutting from the tiles store against reading the cutouts store (no model).
4. Pipelines: ``run_pipeline`` of mass_to_light on each store (same cluster settings, catalog off), rows/s from
   the run record; their ratio says what cutting on the fly costs end to end.
Prints a table and the command; writes it to bench/results/tiles_vs_cutouts.txt.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from survey_infer.cluster import client_for  # noqa: E402
from survey_infer.config import RunConfig, available_cores  # noqa: E402
from survey_infer.pipeline import TILE_ROWS_PER_READ, plan_run, run_pipeline  # noqa: E402
from survey_infer.store import create_cutouts_store, iter_image_batches, write_block  # noqa: E402
from survey_infer.tiles import CutSpec, ingest_tiles, iter_tile_batches, open_tiles  # noqa: E402
from training.mock_tiles import TileLayout, write_mock_tiles  # noqa: E402

FOV_R_HALF = 10.0  # mass_to_light's framing


def cut_all(info, cut: CutSpec):
    """Every source's cutout through the tiles path, in store order: (images, object ids, seconds)."""
    group = zarr.open_group(str(info.path), mode="r")
    images, tick = [], time.perf_counter()
    for (start, stop), tile in zip(info.unit_bounds, info.unit_tiles):
        for _, batch, _ in iter_tile_batches(info.path, tile, start, stop, cut, TILE_ROWS_PER_READ, {}):
            images.append(batch)
    seconds = time.perf_counter() - tick
    return np.concatenate(images), np.asarray(group["sources/object_id"][:]), seconds


def write_cutouts_store(path: Path, info, images: np.ndarray) -> Path:
    group = zarr.open_group(str(info.path), mode="r")
    columns = {name: np.asarray(group[f"sources/{name}"][:]) for name in ("object_id", "ra", "dec")}
    store = create_cutouts_store(path, len(images), images.shape[1:], {}, survey={"name": "cut from tiles", "bands": ["g"]},
                                 rows_per_unit=1024, rows_per_batch=256, overwrite=True)  # fmt: skip
    write_block(store, 0, images, {k: v for k, v in columns.items()})
    return path


def read_all(path: Path, n: int) -> float:
    tick = time.perf_counter()
    for _ in iter_image_batches(path, 0, n, 256):
        pass
    return time.perf_counter() - tick


def run(store: Path, out: Path, args) -> dict:
    config = RunConfig(task="mass_to_light", input=store, output=out, workers=args.workers, in_process=args.in_process,
                       overwrite=True, build_catalog=False, progress=False)  # fmt: skip
    plan = plan_run(config)
    with client_for(config) as client:
        return run_pipeline(config, client, plan).record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=4)
    parser.add_argument("--tile-px", type=int, default=2048)
    parser.add_argument("--sources-per-tile", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--in-process", action="store_true")
    parser.add_argument("--workdir", type=Path, help="where to write the mocks (default: a temporary directory)")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "tiles_vs_cutouts.txt")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tiles-bench-"))
    layout = TileLayout(n_tiles=args.tiles, size_px=args.tile_px, overlap_px=128)
    tick = time.time()
    mock = write_mock_tiles(workdir / "fits", layout=layout, n_sources=args.tiles * args.sources_per_tile,
                            bands=("g",), n_off_tile=0, seed=1)  # fmt: skip
    mocked = time.time() - tick
    tick = time.time()
    ingest_tiles(workdir / "tiles.zarr", mock["tiles"], mock["sources"], size_col="r_half_arcsec", overwrite=True)
    ingested = time.time() - tick
    info = open_tiles(workdir / "tiles.zarr")
    cut = CutSpec((0,), 69, "half_light", fov_r_half=FOV_R_HALF)

    images, _, cut_seconds = cut_all(info, cut)
    cutouts = write_cutouts_store(workdir / "cutouts.zarr", info, images)
    read_seconds = read_all(cutouts, len(images))
    tiles_record = run(info.path, workdir / "out_tiles", args)
    cutouts_record = run(cutouts, workdir / "out_cutouts", args)
    n = len(images)
    tiles_rate, cutouts_rate = tiles_record["timings"]["rows_per_second"], cutouts_record["timings"]["rows_per_second"]

    lines = [
        f"# {' '.join(shlex.quote(a) for a in ['python', 'bench/tiles_vs_cutouts.py', *sys.argv[1:]])}",
        f"# {n} sources on {args.tiles} g-band tiles of {args.tile_px}x{args.tile_px} px; {available_cores()} cores; "
        f"mock {mocked:.0f} s, ingest {ingested:.1f} s",
        f"{'path':44s}{'cutouts/s':>12s}",
        f"{'bare: cut from tiles (read+cut+resample+scale)':44s}{n / cut_seconds:12.0f}",
        f"{'bare: read from the cutouts store':44s}{n / read_seconds:12.0f}",
        f"{'pipeline mass_to_light on the tiles store':44s}{tiles_rate:12.0f}",
        f"{'pipeline mass_to_light on the cutouts store':44s}{cutouts_rate:12.0f}",
        f"bare_cut_vs_read {n / cut_seconds / (n / read_seconds):.4f}",
        f"pipeline_tiles_vs_cutouts {tiles_rate / cutouts_rate:.3f}",
        f"engine {tiles_record.get('engine', {}).get('name')}, rows out {tiles_record['rows']['out']} / "
        f"{cutouts_record['rows']['out']}",
    ]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
