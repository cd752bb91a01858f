"""Cone-search latency on a large run catalog: LSDB over the HATS partitions (cold and warm) vs a DuckDB scan.

Builds a synthetic run of ``--rows`` rows (``catalogs.synthetic``: uniform sky plus crowds at RA = 0/360 and
the poles) through the same hats-import path a real run uses, then times, for ``--queries`` random cones of
``--radius`` arcsec:

- LSDB cold: ``catalogs.open(run).cone(...)`` in a fresh process-level state (catalog opened per query);
- LSDB warm: the same catalog object reused;
- DuckDB full scan: ``SELECT ... WHERE`` the exact haversine distance <= radius over every Parquet row.

Every method's rows are checked against each other (same object_ids). Prints the table and the command.

    python bench/cone_search.py --rows 1000000
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from distributed import Client, LocalCluster

import catalogs
from catalogs.synthetic import SYNTHETIC_UNITS, synthetic_frame, write_run


def duckdb_cone(run: catalogs.RunCatalog, ra: float, dec: float, radius_arcsec: float) -> np.ndarray:
    r = np.radians(radius_arcsec / 3600.0)
    query = f"""
        SELECT object_id FROM objects
        WHERE 2 * asin(sqrt(pow(sin(radians(dec - {dec}) / 2), 2)
              + cos(radians(dec)) * cos(radians({dec})) * pow(sin(radians(ra - {ra}) / 2), 2))) <= {r}
    """
    return np.sort(run.sql(query).object_id.to_numpy())


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--radius", type=float, default=60.0, help="arcsec")
    parser.add_argument("--workdir", type=Path, help="where to build the catalog (default: a temp dir)")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cone-bench-"))
    run_dir = workdir / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    frame = synthetic_frame(args.rows, seed=1)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:  # fmt: skip
        build_s, _ = timed(lambda: write_run(run_dir, frame, SYNTHETIC_UNITS, client, rows_per_part=100_000))
        run = catalogs.open(run_dir)
        rng = np.random.default_rng(0)
        centres = frame.sample(args.queries, random_state=2)[["ra", "dec"]].to_numpy().copy()
        centres += rng.normal(0, 0.01, centres.shape)
        centres[:, 1] = np.clip(centres[:, 1], -89.99, 89.99)
        cold, warm, scan, counts = [], [], [], []
        for ra, dec in centres:
            ra = float(np.mod(ra, 360.0))
            dec = float(dec)
            t_cold, got_cold = timed(lambda: catalogs.open(run_dir).cone(ra, dec, args.radius).to_pandas())
            t_warm, got_warm = timed(lambda: run.cone(ra, dec, args.radius).to_pandas())
            t_scan, got_scan = timed(lambda: duckdb_cone(run, ra, dec, args.radius))
            ids_cold, ids_warm = np.sort(got_cold.object_id.to_numpy()), np.sort(got_warm.object_id.to_numpy())
            if not (np.array_equal(ids_cold, ids_warm) and np.array_equal(ids_warm, got_scan)):
                sys.exit(f"mismatch at ({ra}, {dec}): lsdb {len(ids_warm)} rows, duckdb {len(got_scan)} rows")
            cold.append(t_cold), warm.append(t_warm), scan.append(t_scan), counts.append(len(ids_warm))
        partitions = len(run.parquet_files())

    def row(name, times):
        ms = np.array(times) * 1e3
        return f"{name:28s} {np.median(ms):10.1f} {np.percentile(ms, 90):10.1f} {statistics.mean(scan) / statistics.mean(times):10.1f}x"

    print(f"command: python bench/cone_search.py --rows {args.rows} --queries {args.queries} --radius {args.radius}")
    print(f"catalog: {args.rows} rows, {partitions} HEALPix partitions, built by hats-import in {build_s:.1f} s")
    print(f"cones: {args.queries} of {args.radius:.0f} arcsec, median {int(np.median(counts))} rows each; "
          "every method returned the same object_ids")  # fmt: skip
    print(f"{'method':28s} {'median ms':>10s} {'p90 ms':>10s} {'vs scan':>11s}")
    print(row("LSDB cone, cold (open+query)", cold))
    print(row("LSDB cone, warm", warm))
    print(row("DuckDB full scan", scan))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
