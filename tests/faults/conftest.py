"""Fixtures of the fault-injection suite: small stores of every landed kind, and a cluster of worker processes."""

from __future__ import annotations

from pathlib import Path

import pytest
from distributed import Client, LocalCluster

from tests.faults.helpers import FaultCase, remove_worker_faults, write_noise_store


@pytest.fixture(scope="session")
def tiles_store(tmp_path_factory) -> Path:
    """4 FITS tiles (g band) + sources, ingested: 5 units (one per tile, then the sources on no tile)."""
    from survey_infer.tiles import ingest_tiles
    from training.mock_tiles import TileLayout, write_mock_tiles

    directory = tmp_path_factory.mktemp("fault_tiles")
    mock = write_mock_tiles(directory / "fits", layout=TileLayout(n_tiles=4, size_px=160, overlap_px=24),
                            n_sources=48, n_off_tile=2, bands=("g",), seed=5)  # fmt: skip
    ingest_tiles(directory / "tiles.zarr", mock["tiles"], mock["sources"], size_col="r_half_arcsec")
    return directory / "tiles.zarr"


@pytest.fixture(scope="session")
def noise_store(tmp_path_factory) -> Path:
    """640 cutouts in 10 units of 64 rows."""
    return write_noise_store(tmp_path_factory.mktemp("fault_cutouts") / "noise.zarr", 640, rows_per_unit=64)


@pytest.fixture(scope="session")
def kinematics_store(tmp_path_factory) -> Path:
    """48 mock galaxies (the demo's tiny DF grid) in 4 units of 12."""
    from training.mock_kinematics import write_mock_kinematics

    store = tmp_path_factory.mktemp("fault_kinematics") / "kin.zarr"
    return write_mock_kinematics(store, 48, seed=3, grid="tiny", galaxies_per_unit=12)


# Each store kind that has landed, with a task that reads it (`case`, parametrised indirectly by kind; see
# helpers.case_params). The kinematics case runs the shipped mass_profiles bundle with 20 posterior samples per
# galaxy (the flow's sampling is the costly part).
@pytest.fixture
def case(request) -> FaultCase:
    return request.getfixturevalue(f"case_{request.param}")


@pytest.fixture
def case_cutouts(noise_store, tiny_bundle) -> FaultCase:
    return FaultCase("cutouts", noise_store, "mass_to_light", tiny_bundle)


@pytest.fixture
def case_tiles(tiles_store, tiny_bundle) -> FaultCase:
    return FaultCase("tiles", tiles_store, "mass_to_light", tiny_bundle)


@pytest.fixture(scope="session")
def ifu_store(tmp_path_factory) -> Path:
    """4 mock cubes of 6 x 6 spaxels: 4 units."""
    from training.mock_ifu import write_mock_ifu

    return write_mock_ifu(tmp_path_factory.mktemp("fault_ifu") / "ifu.zarr", 4, size=6, seed=1)


@pytest.fixture
def case_ifu(ifu_store) -> FaultCase:
    from survey_infer.bundle import default_bundle_path

    return FaultCase("ifu", ifu_store, "sfh", default_bundle_path("sfh"))


@pytest.fixture
def case_kinematics(kinematics_store) -> FaultCase:
    from survey_infer.bundle import default_bundle_path

    return FaultCase("kinematics", kinematics_store, "mass_profiles", default_bundle_path("mass_profiles"),
                     ("--task-option", "samples=20"))  # fmt: skip


@pytest.fixture(scope="session")
def cluster():
    """Two worker processes of one thread: a SIGKILLed worker is restarted by its nanny."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        yield cluster


@pytest.fixture()
def client(cluster):
    with Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        yield client
        client.run(remove_worker_faults)
