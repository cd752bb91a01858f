"""Write a mock `kinematics` store (``survey-infer mock kinematics``) with its truth beside it.

Galaxies come from ``training.sim.kinematics`` (one projection each), placed at random sky positions (uniform
on the sphere) and distances (60 kpc - 250 kpc, like Milky Way dwarf spheroidals); positions are written in
kpc (``position_unit="arcsec"`` converts them with the distance). The truth (``STORE.truth.parquet``) holds per
galaxy its halo (family, shape, tracer and anisotropy ratios), R_h, the scales, and the true
``log_m_<f>`` = log10 M(< f R_h) [Msun] at the task's 10 radii, R_h being the stars' median projected radius
(what the task measures).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from survey_infer.kinematics import KPC_PER_ARCSEC_PER_MPC, write_kinematics_store
from survey_infer.paths import truth_path
from survey_infer.tasks.mass_profiles import RADII_F, radius_name
from training.sim import kinematics as sim

# The default mock grid: every family, 3 tracer sizes, isotropic and one Osipkov-Merritt radius (24 DFs,
# ~30-60 s to build). ``grid="full"`` uses the training grid (``sim.default_grid()``, ~2-4 min); ``grid="tiny"``
# (the demo's) one tracer size per family (8 DFs, ~10-20 s).
SMALL_GRID_B_INDEX = (1, 3, 6)
SMALL_GRID_RA = (np.inf, 2.0)


def small_grid(b_index: tuple[int, ...] = SMALL_GRID_B_INDEX) -> list[tuple[str, float, float, float]]:
    points = []
    for family, shape, b, ra in sim.default_grid():
        bs = sim.B_RATIOS[family]
        chosen = {float(bs[min(i, len(bs) - 1)]) for i in b_index}
        if b in chosen and ra in SMALL_GRID_RA:
            points.append((family, shape, b, ra))
    return points


def write_mock_kinematics(store: str | Path, n: int, *, seed: int = 0, grid: str = "small", halos=None,
                          position_unit: str = "kpc", galaxies_per_unit: int = 256, first_id: int = 0,
                          overwrite: bool = False) -> Path:  # fmt: skip
    """``n`` mock galaxies -> a kinematics store at ``store`` and ``STORE.truth.parquet``."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if halos is None:
        if grid not in ("tiny", "small", "full"):
            raise ValueError(f"grid {grid!r}: 'tiny', 'small' or 'full'")
        points = {"tiny": lambda: small_grid((3,)), "small": small_grid, "full": sim.default_grid}[grid]()
        halos = [sim.build_halo(*p, seed=(seed * 1000 + k) % 2**31) for k, p in enumerate(points)]
    projections = sim.simulate_split(halos, n, seed=seed + 7_000_000, n_projections=1, first_id=first_id)
    rng = np.random.default_rng(seed + 8_000_000)
    ra = rng.uniform(0.0, 360.0, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    distance = np.exp(rng.uniform(np.log(0.06), np.log(0.25), n))  # Mpc
    ids = np.array([p.truth["galaxy_id"] for p in projections], np.int64)
    to_unit = 1.0 / (distance * KPC_PER_ARCSEC_PER_MPC) if position_unit == "arcsec" else np.ones(n)
    stars = {
        "galaxy_id": np.concatenate([np.full(len(p.x), gid) for p, gid in zip(projections, ids)]),
        "x": np.concatenate([p.x * s for p, s in zip(projections, to_unit)]),
        "y": np.concatenate([p.y * s for p, s in zip(projections, to_unit)]),
        "v_los": np.concatenate([p.v_los for p in projections]),
        "v_err": np.concatenate([p.v_err for p in projections]),
    }
    galaxies = {"galaxy_id": ids, "ra": ra, "dec": dec, "distance_mpc": distance}
    path = write_kinematics_store(store, stars, galaxies, position_unit=position_unit,
                                  survey={"name": "survey-infer mock dwarf galaxies (training.sim.kinematics)",
                                          "seed": seed, "grid": [h.label for h in halos]},
                                  galaxies_per_unit=galaxies_per_unit, overwrite=overwrite)  # fmt: skip
    truth = {"object_id": ids, "ra": ra, "dec": dec, "distance_mpc": distance}
    for key in ("family", "einasto_n", "b_over_a", "ra_over_b", "halo_label", "n_stars", "r_half_kpc",
                "r_half_plummer_kpc", "halo_scale_kpc", "sigma_scale_kms", "v_sys_kms", "v_err_level_kms",
                "mass_unit_msun"):  # fmt: skip
        truth[key] = np.asarray([p.truth[key] for p in projections])
    log_m = np.stack([p.truth["log_mass"] for p in projections])
    for k, f in enumerate(RADII_F):
        truth[radius_name(f)] = log_m[:, k]
    pq.write_table(pa.table(truth), truth_path(path))
    return path


def demo_summary(out_dir: Path, store: Path) -> str:
    """The demo's line for mass_profiles: M_pred / M_true of the posterior median at R_h and 1.8 R_h, and how
    often the 68% interval holds the truth, against the mock's truth."""
    from survey_infer.paths import PARTS_DIR

    est = pq.read_table(Path(out_dir) / PARTS_DIR).to_pandas()
    truth = pq.read_table(truth_path(store)).to_pandas()
    joined = est.merge(truth, on="object_id", suffixes=("", "_true")).dropna(subset=["log_m_1p0"])
    parts = []
    for f in (1.0, 1.8):
        name = radius_name(f)
        lr = joined[name] - joined[f"{name}_true"]
        p16, p50, p84 = np.percentile(lr, [15.865, 50, 84.135])
        cov = np.mean((joined[f"{name}_p16"] < joined[f"{name}_true"]) & (joined[f"{name}_true"] < joined[f"{name}_p84"]))
        parts.append(f"M(<{f:g} R_h) pred/true median {10**p50:.2f} [16-84%: {10**p16:.2f}-{10**p84:.2f}], 68% "
                     f"interval holds {cov:.2f}")  # fmt: skip
    return f"mass_profiles vs truth ({len(joined)} galaxies): " + "; ".join(parts)
