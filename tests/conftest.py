"""Shared fixtures: a tiny random-weight bundle and small mock stores, made on the fly (no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from survey_infer.bundle import sha256_file, write_json_atomic
from survey_infer.models import build_model

TINY_KWARGS = {"in_channels": 1, "n_meta": 3, "width": 4, "hidden": 16}


def write_random_bundle(directory: Path, task: str, architecture: str, kwargs: dict, engine_io: dict,
                        input_spec: dict, output_spec: dict, seed: int = 0) -> Path:
    """A ``task`` bundle (id ``<task>-tiny-v1``) of the architecture with random weights: the machinery, not the
    science."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    save_file(build_model(architecture, **kwargs).state_dict(), str(directory / "weights.safetensors"))
    meta = {
        "bundle_format": 1, "id": f"{task}-tiny-v1", "task": task, "name": "tiny", "version": 1,
        "architecture": {"name": architecture, "kwargs": kwargs}, "engine_io": engine_io,
        "input_spec": input_spec, "output_spec": output_spec, "training": {"notes": "random weights, for tests only"},
        "files": {"weights.safetensors": sha256_file(directory / "weights.safetensors")},
    }  # fmt: skip
    write_json_atomic(directory / "bundle.json", meta)
    return directory


def make_tiny_bundle(directory: Path, size: int = 69, seed: int = 0) -> Path:
    """A mass_to_light bundle with random weights: fast, and enough to test the machinery."""
    return write_random_bundle(
        directory, "mass_to_light", "ml_cnn", TINY_KWARGS, {"inputs": ["image", "meta"], "outputs": ["ml_g", "ml_g_logvar"]},
        {"image": {"bands": ["g"], "shape": [1, size, size], "dtype": "float32"},
         "meta": {"columns": ["distance_mpc", "lum_g", "size_kpc"], "transform": "log10",
                  "mean": [2.2, 10.0, 0.6], "std": [0.15, 0.5, 0.2]}},
        {"ml_g": {"unit": "Msun/Lsun"}}, seed=seed,
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundles") / "mass_to_light-tiny-v1")


@pytest.fixture(scope="session")
def small_store(tmp_path_factory) -> Path:
    """600 mock cutouts in 5 units of 128 rows (the last one short), read 64 rows at a time."""
    from training.mock import write_mock_cutouts  # here, not at the top: GPU-only runs lack zarr

    store = tmp_path_factory.mktemp("stores") / "small.zarr"
    return write_mock_cutouts(store, 600, size=69, seed=11, rows_per_unit=128, rows_per_batch=64)


def tree_snapshot(path: Path) -> dict[str, float]:
    """Every file under ``path`` with its mtime: to show that a refused command wrote nothing."""
    if not path.exists():
        return {}
    return {str(p): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


def read_parts(out_dir: Path):
    import pyarrow.parquet as pq

    return pq.read_table(sorted((out_dir / "parts").glob("*.parquet"))).to_pandas()


def assert_exactly_once(out_dir: Path, n_rows: int) -> None:
    table = read_parts(out_dir)
    ids = np.sort(table["object_id"].to_numpy())
    assert len(ids) == n_rows, f"{len(ids)} rows in parts, {n_rows} expected"
    np.testing.assert_array_equal(ids, np.arange(n_rows))
