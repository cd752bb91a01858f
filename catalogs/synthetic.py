"""Synthetic run outputs with known positions, for the tests and the cone-search benchmark.

They go through the same path as a real run's catalog (Parquet parts with units in the field metadata, then
``survey_infer.hats_catalog.build_hats_catalog``), so what is tested is what runs write.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from distributed import Client

from survey_infer import paths
from survey_infer.bundle import write_json_atomic
from survey_infer.hats_catalog import build_hats_catalog

SYNTHETIC_UNITS = {"object_id": "", "ra": "deg", "dec": "deg", "ml_g": "Msun/Lsun", "distance": "Mpc", "flag": ""}


def sky_positions(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` positions: 80% uniform on the sphere, 20% crowded around RA = 0/360 and both poles."""
    rng = np.random.default_rng(seed)
    n_edge = n // 5
    ra = rng.uniform(0.0, 360.0, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    k = n_edge // 3
    ra[:k] = np.mod(rng.normal(0.0, 0.05, k), 360.0)  # straddling RA = 0/360
    dec[:k] = rng.uniform(-5.0, 5.0, k)
    dec[k : 2 * k] = 90.0 - np.abs(rng.normal(0.0, 0.1, k))  # north pole cap
    dec[2 * k : n_edge] = -90.0 + np.abs(rng.normal(0.0, 0.1, n_edge - 2 * k))  # south pole cap
    return ra, dec


def synthetic_frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed + 1)
    ra, dec = sky_positions(n, seed)
    return pd.DataFrame({
        "object_id": np.arange(n, dtype=np.int64), "ra": ra, "dec": dec,
        "ml_g": rng.lognormal(0.0, 0.6, n).astype(np.float32), "distance": rng.uniform(30.0, 400.0, n),
        "flag": (rng.uniform(size=n) < 0.02).astype(np.int32),
    })  # fmt: skip


def write_run(out_dir: Path, frame: pd.DataFrame, units: dict[str, str], client: Client, *, task: str = "synthetic",
              rows_per_part: int = 50_000) -> Path:  # fmt: skip
    """A complete run directory (parts, run.json, HATS collection) holding ``frame``'s rows."""
    out_dir = Path(out_dir)
    (out_dir / paths.PARTS_DIR).mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    fields = [f.with_metadata({"unit": units.get(f.name, "")}) for f in table.schema]
    table = table.cast(pa.schema(fields))
    for unit, start in enumerate(range(0, len(frame), rows_per_part)):
        pq.write_table(table.slice(start, rows_per_part), paths.part_path(out_dir, unit))
    build_hats_catalog(out_dir, client)
    write_json_atomic(paths.run_record_path(out_dir), {
        "status": "complete", "task": task, "bundle": {"id": f"{task}-none"}, "config": {"engine": "none"},
        "code_version": "synthetic", "input": {"path": "synthetic", "rows": len(frame)},
    })  # fmt: skip
    return out_dir
