"""Write mock survey stores with their truth beside them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from survey_infer.paths import truth_path
from survey_infer.store import DEFAULT_ROWS_PER_BATCH, DEFAULT_ROWS_PER_UNIT, create_cutouts_store, write_block
from training.sim import DEFAULT_SIMULATOR, get_simulator

MOCK_SURVEY = {
    "name": "survey-infer mock (bulge+disc, SDSS-like g band)",
    "bands": ["g"],
    "pixel_scale": None,  # cutouts are resized to the galaxy: no fixed scale
    "zero_points": {"g": 28.0},
    "units": "log10 counts scaled to [-1, 1] per cutout",
    "preprocessing": {"scaling": "log10, floored at half the sky noise, min-max to [-1, 1] per cutout",
                      "cropping": "centred, field of view = 18 half-light radii"},
}  # fmt: skip
EXTRA_COLUMNS = {"distance_mpc": "float64", "lum_g": "float64", "size_kpc": "float64"}


def write_mock_cutouts(
    store: str | Path,
    n: int,
    *,
    size: int = 69,
    seed: int = 0,
    rows_per_unit: int = DEFAULT_ROWS_PER_UNIT,
    rows_per_batch: int = DEFAULT_ROWS_PER_BATCH,
    simulator: str = DEFAULT_SIMULATOR,
    overwrite: bool = False,
) -> Path:
    """Write a `cutouts` store of ``n`` simulated g-band galaxies and ``STORE.truth.parquet``."""
    store = Path(store)
    simulate = get_simulator(simulator)
    survey = {**MOCK_SURVEY, "simulator": simulator, "seed": seed}
    group = create_cutouts_store(
        store, n, (1, size, size), EXTRA_COLUMNS, survey=survey,
        rows_per_unit=rows_per_unit, rows_per_batch=rows_per_batch, overwrite=overwrite,
    )  # fmt: skip
    block = int(group["images"].shards[0])
    truth_tables = []
    for index, start in enumerate(range(0, n, block)):
        count = min(block, n - start)
        sim = simulate(count, size=size, seed=np.random.SeedSequence([seed, index]).generate_state(1)[0], first_id=start)
        write_block(group, start, sim.images, sim.columns)
        truth_tables.append(pa.table(sim.truth))
    pq.write_table(pa.concat_tables(truth_tables), truth_path(store))
    return store
