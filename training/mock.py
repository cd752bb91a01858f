"""Write mock survey stores with their truth beside them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from survey_infer.paths import truth_maps_path, truth_path
from survey_infer.store import (
    DEFAULT_IMAGE_CODEC, DEFAULT_ROWS_PER_BATCH, DEFAULT_ROWS_PER_UNIT, create_cutouts_store, write_block,
)
from training.sim import DEFAULT_SIMULATOR, get_simulator
from training.sim.universe import (
    ELECTRONS_PER_NMGY, FOV_IN_HALF_LIGHT_RADII, MAP_NAMES, PIXEL_SCALE_ARCSEC, SKY_MAG_ARCSEC2,
)  # fmt: skip

MAP_UNITS = {"log_mstar": "dex(Msun) per pixel", "log_age": "dex(yr), mass-weighted",
             "log_z": "dex(Z/Zsun), mass-weighted", "log_sfr": "dex(Msun/yr) per pixel, last 100 Myr"}  # fmt: skip
EXTRA_COLUMNS = {"distance_mpc": "float64", "lum_g": "float64", "size_kpc": "float64"}


def mock_survey(bands: tuple[str, ...], simulator: str, seed: int) -> dict:
    """The store's `survey` attributes: what the cutouts are and how they were made."""
    return {
        "name": "survey-infer mock universe (BC03 populations, SDSS ugriz, 0.396\"/px, seeing ~1.4\")",
        "bands": list(bands),
        "native_pixel_scale_arcsec": PIXEL_SCALE_ARCSEC,
        "sky_mag_arcsec2": {b: SKY_MAG_ARCSEC2[b] for b in bands},
        "electrons_per_nanomaggy": {b: ELECTRONS_PER_NMGY[b] for b in bands},
        "units": "log10 flux scaled to [-1, 1] per cutout and band",
        "preprocessing": {
            "scaling": "log10, floored at half the sky noise, min-max to [-1, 1] per cutout (survey_infer.imaging)",
            "cropping": f"centred, field of view = {FOV_IN_HALF_LIGHT_RADII:g} half-light radii, resized",
        },
        "simulator": simulator,
        "seed": seed,
    }


def write_mock_cutouts(
    store: str | Path,
    n: int,
    *,
    size: int = 69,
    seed: int = 0,
    bands: tuple[str, ...] = ("g",),
    maps: bool = False,
    rows_per_unit: int = DEFAULT_ROWS_PER_UNIT,
    rows_per_batch: int = DEFAULT_ROWS_PER_BATCH,
    simulator: str = DEFAULT_SIMULATOR,
    image_dtype: str = "float32",
    image_codec: str = DEFAULT_IMAGE_CODEC,
    overwrite: bool = False,
) -> Path:
    """Write a `cutouts` store of ``n`` simulated galaxies, ``STORE.truth.parquet`` and, if ``maps``, the
    resolved truth maps in ``STORE.truth_maps.zarr`` (same rows and pixel grid, no PSF or noise)."""
    store = Path(store)
    simulate = get_simulator(simulator)
    group = create_cutouts_store(
        store, n, (len(bands), size, size), EXTRA_COLUMNS, survey=mock_survey(tuple(bands), simulator, seed),
        rows_per_unit=rows_per_unit, rows_per_batch=rows_per_batch, image_dtype=image_dtype, image_codec=image_codec,
        overwrite=overwrite,
    )  # fmt: skip
    block = int(group["images"].shards[0])
    maps_array = _create_maps_array(store, n, size, block, overwrite) if maps else None
    truth_tables = []
    for index, start in enumerate(range(0, n, block)):
        count = min(block, n - start)
        block_seed = np.random.SeedSequence([seed, index]).generate_state(1)[0]
        sim = simulate(count, size=size, seed=block_seed, first_id=start, bands=tuple(bands), maps=maps)
        write_block(group, start, sim.images, sim.columns)
        if maps_array is not None:
            maps_array[start : start + count] = sim.maps
        truth_tables.append(pa.table(sim.truth))
    pq.write_table(pa.concat_tables(truth_tables), truth_path(store))
    return store


def _create_maps_array(store: Path, n: int, size: int, rows_per_shard: int, overwrite: bool) -> zarr.Array:
    root = zarr.open_group(truth_maps_path(store), mode="w" if overwrite else "w-", zarr_format=3)
    root.attrs.update({"map_names": list(MAP_NAMES), "units": MAP_UNITS, "rows": n,
                       "note": "truth per pixel, before PSF and noise; row i matches row i of the store"})  # fmt: skip
    return root.create_array(
        "maps", shape=(n, len(MAP_NAMES), size, size), dtype="float32",
        chunks=(min(64, rows_per_shard), len(MAP_NAMES), size, size),
    )  # fmt: skip


def write_mock_clusters(
    store: str | Path,
    n: int,
    *,
    seed: int = 0,
    bands: tuple[str, ...] | None = None,
    rows_per_unit: int = 1024,
    rows_per_batch: int = 256,
    overwrite: bool = False,
) -> Path:
    """Write a `cutouts` store of ``n`` mock M31 star clusters (3 HST bands, 64 px, linear flux) and
    ``STORE.truth.parquet`` (log_age, log_mass, log_rh and the nuisance parameters; see training.sim.clusters)."""
    from training.sim import clusters

    store = Path(store)
    bands = clusters.check_bands(bands or clusters.BANDS)  # before anything is written
    group = create_cutouts_store(
        store, n, (len(bands), clusters.SIZE, clusters.SIZE), {}, survey=clusters.survey_attrs(bands, seed),
        rows_per_unit=rows_per_unit, rows_per_batch=rows_per_batch, overwrite=overwrite,
    )  # fmt: skip
    block = int(group["images"].shards[0])
    truth_tables = []
    for index, start in enumerate(range(0, n, block)):
        count = min(block, n - start)
        block_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
        sim = clusters.simulate_clusters(count, seed=block_seed, first_id=start, bands=bands)
        write_block(group, start, sim.images, sim.columns)
        truth_tables.append(pa.table(sim.truth))
    pq.write_table(pa.concat_tables(truth_tables), truth_path(store))
    return store


# The mock store each task's demo runs on (the demo asks by task id; a task absent here gets galaxy cutouts).
DEMO_MOCKS = {"mass_to_light": "cutouts", "star_clusters": "clusters", "mass_profiles": "kinematics",
              "property_maps": "property_maps", "sfh": "ifu"}


def write_demo_mock(task: str, directory: Path, n: int, *, seed: int, rows_per_unit: int) -> Path:
    """Write the mock store that ``task`` runs on in the demo, ``directory/mock_<kind>.zarr`` (replaced)."""
    kind = DEMO_MOCKS.get(task, "cutouts")
    store = Path(directory) / f"mock_{kind}.zarr"
    if kind == "kinematics":  # the tiny DF grid (8 DFs, ~10-20 s to build)
        from training.mock_kinematics import write_mock_kinematics

        return write_mock_kinematics(store, n, seed=seed, grid="tiny", galaxies_per_unit=min(rows_per_unit, 256),
                                     overwrite=True)  # fmt: skip
    if kind == "property_maps":  # ugriz in surface brightness with the six truth maps
        from training.mock_property_maps import write_mock_property_maps

        return write_mock_property_maps(store, n, seed=seed, rows_per_unit=min(rows_per_unit, 256),
                                        rows_per_batch=min(rows_per_unit, 64), overwrite=True)  # fmt: skip
    if kind == "ifu":  # mock IFU cubes of 12 x 12 spaxels (n = cubes)
        from training.mock_ifu import write_mock_ifu

        return write_mock_ifu(store, n, size=12, seed=seed % 100_000, overwrite=True)
    if kind == "clusters":
        return write_mock_clusters(store, n, seed=seed, rows_per_unit=rows_per_unit,
                                   rows_per_batch=min(256, rows_per_unit), overwrite=True)
    return write_mock_cutouts(store, n, seed=seed, rows_per_unit=rows_per_unit, rows_per_batch=256, overwrite=True)

# Rows mocked per task in the demo at most (cluster mocks are built star by star: ~100 per second per core;
# mass_profiles: galaxies; their DFs take ~10-20 s to build).
DEMO_MAX_ROWS = {"star_clusters": 1000, "mass_profiles": 300, "property_maps": 512, "sfh": 2}


def demo_mock_size(task: str, n: int) -> int:
    return min(n, DEMO_MAX_ROWS.get(task, n))


def demo_summary(task: str, out_dir: Path, store: Path) -> str | None:
    """A task's accuracy against the mock truth for the demo (None where the task has no summary here)."""
    if task == "star_clusters":
        from training.cluster_report import demo_summary as clusters_summary

        return clusters_summary(out_dir, store)
    if task == "property_maps":
        from training.mock_property_maps import demo_summary as maps_summary

        return maps_summary(out_dir, store)
    if task == "mass_profiles":
        from training.mock_kinematics import demo_summary as kinematics_summary

        return kinematics_summary(out_dir, store)
    if task == "sfh":
        from training.mock_ifu import demo_summary as ifu_summary

        return ifu_summary(out_dir, store)
    return None
