"""`survey-infer demo`: mock a small survey, run every task that has a shipped bundle, print a summary.

The mock comes from the training package (reached lazily: the runtime never depends on it). Because a mock
has its truth beside it, the summary also says how close the estimates are, next to the constant baseline.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from survey_infer import paths
from survey_infer.bundle import list_shipped_bundles
from survey_infer.cluster import client_for
from survey_infer.config import RunConfig
from survey_infer.pipeline import plan_run, run_pipeline

DEMO_ROWS_PER_UNIT = 512


def _accuracy_against_truth(out_dir: Path, store: Path) -> str:
    """RMSE, R^2 and 1-sigma coverage of ml_g against the mock's truth, beside the constant baseline."""
    estimates = pq.read_table(out_dir / paths.PARTS_DIR, columns=["object_id", "ml_g", "ml_g_err"]).to_pandas()
    truth = pq.read_table(paths.truth_path(store), columns=["object_id", "ml_g"]).to_pandas()
    joined = estimates.merge(truth, on="object_id", suffixes=("", "_true")).dropna()
    from training.evaluate import regression_metrics  # lazily: the runtime never depends on training

    truth_ml = joined["ml_g_true"].to_numpy()
    ours = regression_metrics(joined["ml_g"].to_numpy(), joined["ml_g_err"].to_numpy(), truth_ml)
    return (f"ml_g vs truth: RMSE {ours['rmse']:.3f}, R^2 {ours['r2']:.3f}, within 1 sigma "
            f"{ours['within_1sigma']:.2f} (constant baseline RMSE {float(np.std(truth_ml)):.3f})")


def run_demo(output: Path, *, n: int = 4000, workers: int = 1) -> int:
    """Mock ``n`` cutouts under ``output`` and run each shipped task on them; return the exit status."""
    from training.mock import demo_mock_size, demo_summary, write_demo_mock

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tasks = sorted({b.task for b in list_shipped_bundles()})
    rows, exit_code = [], 0
    for task in tasks:
        # Each task runs on the kind of mock it was trained for (training.mock.DEMO_MOCKS: the per-task hook).
        tick = time.time()
        n_task = demo_mock_size(task, n)
        store = write_demo_mock(task, output, n_task, seed=20261123, rows_per_unit=DEMO_ROWS_PER_UNIT)
        print(f"{task}: mock store {store} ({n_task} rows) ready in {time.time() - tick:.1f} s")
        config = RunConfig(task=task, input=store, output=output / task, workers=workers, overwrite=True)
        plan = plan_run(config)
        tick = time.time()
        with client_for(config) as client:
            result = run_pipeline(config, client, plan)
        exit_code = max(exit_code, result.exit_code)
        record = result.record
        engine = record.get("engine") or {}
        rows.append((task, record["status"], record["rows"]["in"], record["rows"]["out"], record["rows"]["flagged"],
                     engine.get("name", "?"), record["timings"]["rows_per_second"], time.time() - tick,
                     str(config.output)))  # fmt: skip
        if task == "mass_to_light":
            print(_accuracy_against_truth(config.output, store))
        else:
            summary = demo_summary(task, config.output, store)
            if summary:
                print(summary)

    header = ("task", "status", "rows in", "rows out", "flagged", "engine", "rows/s", "wall s", "outputs")
    print()
    print(f"{header[0]:16s}{header[1]:10s}{header[2]:>9s}{header[3]:>9s}{header[4]:>9s}  {header[5]:12s}"
          f"{header[6]:>8s}{header[7]:>8s}  {header[8]}")  # fmt: skip
    for row in rows:
        print(f"{row[0]:16s}{row[1]:10s}{row[2]:9d}{row[3]:9d}{row[4]:9d}  {row[5]:12s}{row[6]:8.0f}{row[7]:8.1f}  "
              f"{row[8]} (parts/, catalog/, run.json)")  # fmt: skip
    return exit_code
