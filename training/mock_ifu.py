"""Write a mock `ifu` store (``survey-infer mock ifu STORE --cubes N``) with its truth beside it.

Each cube is a mock galaxy from :func:`training.sim.spectra.cube_params` (old metal-rich bulge, exponential
disc with a metallicity gradient, two spiral arms with recent bursts and more dust) observed on the MUSE grid
(4750-9350 A, 1.25 A) with HST photometry maps. Truth: ``STORE.truth.zarr/<object_id>/`` with ``sfh`` and
``metallicity`` (16, Y, X), ``age_lw``, ``age_mw``, ``log_z_lw``, ``log_z_mw``, ``snr``, ``arm`` (Y, X), and
``STORE.truth.parquet`` with one row per cube (object_id, redshift, ny, nx).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from survey_infer.ifu import DEFAULT_SPAXELS_PER_BATCH, write_ifu_store
from survey_infer.paths import truth_path
from survey_infer.tasks.sfh import AGE_EDGES_LOG, N_BINS
from training.sim import spectra as sim

MUSE_SPAXEL_ARCSEC = 0.2


def truth_cubes_path(store: Path) -> Path:
    return Path(str(store) + ".truth.zarr")


def mock_cube(seed: int, ny: int, nx: int, redshift: float | None = None) -> tuple[dict, dict]:
    """One mock cube (the dict ``write_ifu_store`` takes, without name/id/position) and its truth maps."""
    rng = np.random.default_rng(seed)
    z = float(rng.uniform(0.002, 0.03)) if redshift is None else float(redshift)
    params, structure = sim.cube_params(rng, ny, nx, z)
    spec = sim.make_spectra(params, rng)
    n_wave = len(spec.wave)
    cube = {"flux": spec.flux.T.reshape(n_wave, ny, nx), "ivar": spec.ivar.T.reshape(n_wave, ny, nx),
            "wave": spec.wave, "redshift": z, "photometry": spec.photometry.T.reshape(-1, ny, nx),
            "photometry_ivar": spec.photometry_ivar.T.reshape(-1, ny, nx), "wavelength_frame": "air"}  # fmt: skip
    t = spec.truth
    truth = {"sfh": t.mass_frac.T.reshape(N_BINS, ny, nx).astype(np.float32),
             "metallicity": t.log_z.T.reshape(N_BINS, ny, nx).astype(np.float32),
             "age_lw": t.age_lw.reshape(ny, nx).astype(np.float32), "age_mw": t.age_mw.reshape(ny, nx).astype(np.float32),
             "log_z_lw": t.z_lw.reshape(ny, nx).astype(np.float32), "log_z_mw": t.z_mw.reshape(ny, nx).astype(np.float32),
             "snr": params.snr.reshape(ny, nx).astype(np.float32), "arm": structure["arm"].astype(np.float32)}  # fmt: skip
    return cube, truth


def write_mock_ifu(store: str | Path, n_cubes: int, *, size: int = 24, seed: int = 0,
                   spaxels_per_batch: int = DEFAULT_SPAXELS_PER_BATCH, overwrite: bool = False) -> Path:  # fmt: skip
    """``n_cubes`` mock cubes of ``size`` x ``size`` spaxels -> an ifu store + its truth (see the module doc)."""
    if n_cubes < 1 or size < 2:
        raise ValueError(f"--cubes {n_cubes} and --size {size}: at least 1 cube of 2 x 2 spaxels")
    store = Path(store)
    rng = np.random.default_rng(seed)
    cubes, truths = [], []
    for k in range(n_cubes):
        cube, truth = mock_cube(seed * 1000 + k, size, size)
        ra, dec = float(rng.uniform(0, 360)), float(np.degrees(np.arcsin(rng.uniform(-0.99, 0.99))))
        wcs = {"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CUNIT1": "deg", "CUNIT2": "deg", "CRVAL1": ra,
               "CRVAL2": dec, "CRPIX1": (size + 1) / 2, "CRPIX2": (size + 1) / 2, "CDELT1": -MUSE_SPAXEL_ARCSEC / 3600,
               "CDELT2": MUSE_SPAXEL_ARCSEC / 3600}  # fmt: skip
        cube.update(name=f"mock{k:04d}", object_id=k + 1, ra=ra, dec=dec, wcs=wcs)
        cubes.append(cube)
        truths.append(truth)
    write_ifu_store(store, cubes, survey={"name": "mock MUSE + HST (training.sim.spectra)", "seed": seed},
                    spaxels_per_batch=spaxels_per_batch, overwrite=overwrite)  # fmt: skip
    group = zarr.open_group(str(truth_cubes_path(store)), mode="w", zarr_format=3)
    group.attrs.update({"age_edges_log_yr": AGE_EDGES_LOG.tolist(), "simulator": "training.sim.spectra"})
    for cube, truth in zip(cubes, truths):
        sub = group.create_group(str(cube["object_id"]))
        for name, values in truth.items():
            sub.create_array(name, data=values)
    pq.write_table(pa.table({"object_id": np.array([c["object_id"] for c in cubes], np.int64),
                             "redshift": np.array([c["redshift"] for c in cubes]),
                             "ny": np.full(n_cubes, size), "nx": np.full(n_cubes, size)}), truth_path(store))  # fmt: skip
    return store


def demo_summary(out_dir: Path, store: Path) -> str:
    """The demo's line: median |error| of the light-weighted mean log age and log Z maps against the truth."""
    pred = zarr.open_group(str(Path(out_dir) / "sfh.zarr"), mode="r")
    truth = zarr.open_group(str(truth_cubes_path(store)), mode="r")
    age, met = [], []
    for key in truth.group_keys():
        if key not in pred:
            continue
        ok = np.isfinite(pred[key]["age_lw"][:])
        age.append(np.abs(pred[key]["age_lw"][:] - truth[key]["age_lw"][:])[ok])
        met.append(np.abs(pred[key]["log_z_lw"][:] - truth[key]["log_z_lw"][:])[ok])
    age_e, met_e = np.concatenate(age), np.concatenate(met)
    return (f"sfh vs truth ({len(age)} cubes, {age_e.size} spaxels): median |error| light-weighted mean log age "
            f"{np.median(age_e):.3f} dex, log Z {np.median(met_e):.3f} dex")
