"""Mock stores for property_maps: ugriz cutouts in linear surface brightness with their six truth maps.

``write_mock_property_maps(store, n)`` writes a `cutouts` store whose images are sky-subtracted surface
brightness in nanomaggies per arcsec^2 (the same galaxies, seeing and noise as every universe mock, not the
per-cutout [-1, 1] log scaling that loses the colours and the surface brightness), ``STORE.truth.parquet``
(the universe's truth plus the gas truth) and ``STORE.truth_maps.zarr``: ``maps`` (N, 6, S, S) in
``PROPERTY_MAP_NAMES`` order, NaN on empty pixels, row i = store row i.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from survey_infer.paths import truth_maps_path, truth_path
from survey_infer.store import DEFAULT_IMAGE_CODEC, create_cutouts_store, write_block
from training.mock import EXTRA_COLUMNS
from training.sim.universe import (
    ELECTRONS_PER_NMGY, EMPTY_SIGMA_MSUN_KPC2, EMPTY_SIGMA_SFR, FOV_IN_HALF_LIGHT_RADII, PIXEL_SCALE_ARCSEC,
    PROPERTY_MAP_NAMES, PROPERTY_MAP_UNITS, SKY_MAG_ARCSEC2, simulate,
)  # fmt: skip

BANDS = ("u", "g", "r", "i", "z")
IMAGE_UNITS = "nmgy_arcsec2"


def survey_attrs(bands: tuple[str, ...], seed: int) -> dict:
    return {
        "name": "survey-infer mock universe with gas (BC03 populations, SDSS ugriz, 0.396\"/px, seeing ~1.4\")",
        "bands": list(bands),
        "native_pixel_scale_arcsec": PIXEL_SCALE_ARCSEC,
        "sky_mag_arcsec2": {b: SKY_MAG_ARCSEC2[b] for b in bands},
        "electrons_per_nanomaggy": {b: ELECTRONS_PER_NMGY[b] for b in bands},
        "units": "nanomaggies per arcsec^2 (surface brightness, sky subtracted, linear)",
        "image_units": IMAGE_UNITS,
        "preprocessing": {
            "scaling": "none: linear surface brightness (nmgy/arcsec^2), sky subtracted, with noise",
            "cropping": f"centred, field of view = {FOV_IN_HALF_LIGHT_RADII:g} half-light radii, resized",
        },
        "simulator": "universe (property_maps=True)",
        "seed": seed,
    }


def simulate_block(n: int, size: int, seed: int, first_id: int, bands: tuple[str, ...] = BANDS):
    """One block of property-maps mocks (the store writer's and the training script's common draw)."""
    return simulate(n, size=size, seed=seed, first_id=first_id, bands=tuple(bands), property_maps=True,
                    image_units=IMAGE_UNITS)  # fmt: skip


def write_mock_property_maps(
    store: str | Path, n: int, *, size: int = 64, seed: int = 0, bands: tuple[str, ...] = BANDS,
    rows_per_unit: int = 256, rows_per_batch: int = 64, overwrite: bool = False, image_codec: str = DEFAULT_IMAGE_CODEC,
) -> Path:
    """Write the store, its truth table and its truth maps (see the module docstring); ``image_codec``: one of
    survey_infer.store.IMAGE_CODECS."""
    store = Path(store)
    group = create_cutouts_store(
        store, n, (len(bands), size, size), EXTRA_COLUMNS, survey=survey_attrs(tuple(bands), seed),
        rows_per_unit=rows_per_unit, rows_per_batch=rows_per_batch, overwrite=overwrite, image_codec=image_codec,
    )  # fmt: skip
    block = int(group["images"].shards[0])
    root = zarr.open_group(truth_maps_path(store), mode="w" if overwrite else "w-", zarr_format=3)
    root.attrs.update({
        "map_names": list(PROPERTY_MAP_NAMES), "units": list(PROPERTY_MAP_UNITS), "rows": n,
        "empty": f"NaN: stellar or gas surface density < {EMPTY_SIGMA_MSUN_KPC2:g} Msun/kpc^2, "
                 f"SFR density < {EMPTY_SIGMA_SFR:.3g} Msun/yr/kpc^2",
        "note": "truth per pixel, before PSF and noise; row i matches row i of the store",
    })  # fmt: skip
    maps = root.create_array("maps", shape=(n, len(PROPERTY_MAP_NAMES), size, size), dtype="float32",
                             chunks=(min(64, block), len(PROPERTY_MAP_NAMES), size, size), fill_value=np.nan)
    truth_tables = []
    for index, start in enumerate(range(0, n, block)):
        count = min(block, n - start)
        block_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
        sim = simulate_block(count, size, block_seed, start, tuple(bands))
        write_block(group, start, sim.images, sim.columns)
        maps[start : start + count] = sim.property_maps
        truth_tables.append(pa.table(sim.truth))
    pq.write_table(pa.concat_tables(truth_tables), truth_path(store))
    return store


def half_mass_ellipse_mask(log_sigma_mstar: np.ndarray, radii: float = 2.0) -> np.ndarray:
    """Pixels inside ``radii`` half-mass radii of the ellipse fitted to each true stellar-mass map (N, S, S).

    The ellipse: centre, axis ratio and angle from the mass-weighted second moments of the map; the half-mass
    radius is the elliptical radius that holds half the map's mass (the paper's evaluation region).
    """
    sigma = np.nan_to_num(10.0 ** log_sigma_mstar.astype(np.float64), nan=0.0)
    n, size = sigma.shape[0], sigma.shape[-1]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    total = sigma.sum(axis=(1, 2))
    cx = (sigma * xx).sum(axis=(1, 2)) / total
    cy = (sigma * yy).sum(axis=(1, 2)) / total
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    sxx = (sigma * dx**2).sum(axis=(1, 2)) / total
    syy = (sigma * dy**2).sum(axis=(1, 2)) / total
    sxy = (sigma * dx * dy).sum(axis=(1, 2)) / total
    angle = 0.5 * np.arctan2(2 * sxy, sxx - syy)
    spread = np.sqrt(((sxx - syy) / 2) ** 2 + sxy**2)
    major, minor = (sxx + syy) / 2 + spread, np.maximum((sxx + syy) / 2 - spread, 1e-12)
    q = np.sqrt(minor / major)
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u, v = dx * c + dy * s, -dx * s + dy * c
    r_ell = np.sqrt(u**2 + (v / q[:, None, None]) ** 2)
    mask = np.zeros(sigma.shape, dtype=bool)
    for k in range(n):
        order = np.argsort(r_ell[k].ravel())
        cumulative = np.cumsum(sigma[k].ravel()[order])
        r_half = r_ell[k].ravel()[order][np.searchsorted(cumulative, 0.5 * cumulative[-1])]
        mask[k] = r_ell[k] <= radii * r_half
    return mask


def map_residuals(true_maps: np.ndarray, pred_maps: np.ndarray, radii: float = 2.0) -> list[np.ndarray]:
    """Per map, the deltas log true - log predicted over truly non-empty pixels inside ``radii`` half-mass
    radii where the prediction is finite (a flat array per map)."""
    region = half_mass_ellipse_mask(true_maps[:, 0], radii)
    out = []
    for k in range(true_maps.shape[1]):
        ok = region & np.isfinite(true_maps[:, k]) & np.isfinite(pred_maps[:, k])
        out.append((true_maps[:, k] - pred_maps[:, k])[ok].astype(np.float64))
    return out


def demo_summary(out_dir: Path, store: Path) -> str:
    """Per-map bias and scatter (dex) of the run's maps.zarr against the store's truth maps (2 R_half)."""
    run_maps = zarr.open_group(Path(out_dir) / "maps.zarr", mode="r")
    truth = zarr.open_group(truth_maps_path(store), mode="r")
    ids = np.asarray(run_maps["object_id"][:])
    order = np.argsort(ids)
    pred = np.asarray(run_maps["maps"][:])[order]
    true = np.asarray(truth["maps"][:])[ids[order]]  # mock object_id = store row
    deltas = map_residuals(true, pred)
    parts = [f"{name.removeprefix('log_')} {np.mean(d):+.2f}/{np.std(d):.2f}" for name, d in zip(PROPERTY_MAP_NAMES, deltas)]
    return "maps vs truth inside 2 R_half, bias/scatter dex: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    """``python -m training.mock_property_maps STORE --n N [--size 64] [--seed S] [--bands u,g,r,i,z]``."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bands", default=",".join(BANDS))
    parser.add_argument("--rows-per-unit", type=int, default=256)
    parser.add_argument("--rows-per-batch", type=int, default=64)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    tick = time.time()
    store = write_mock_property_maps(args.store, args.n, size=args.size, seed=args.seed,
                                     bands=tuple(args.bands.split(",")), rows_per_unit=args.rows_per_unit,
                                     rows_per_batch=args.rows_per_batch, overwrite=args.overwrite)  # fmt: skip
    print(f"wrote {args.n} mock galaxies to {store} (truth: {truth_path(store)}, maps: {truth_maps_path(store)}) "
          f"in {time.time() - tick:.1f} s")


if __name__ == "__main__":
    main()
