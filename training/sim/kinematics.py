"""Mock dispersion-supported galaxies in dynamical equilibrium, for the `mass_profiles` task.

A galaxy is a spherical dark halo of one of three families (the stand-ins for the paper's three simulation
suites) and a Plummer stellar tracer whose stars are drawn from a distribution function (DF) in that halo's
potential, isotropic or Osipkov-Merritt radially anisotropic (``galpy.df.osipkovmerrittdf(pot, denspot, ra)``:
the tracer density is the Plummer sphere, the potential the halo's). The stars are massless tracers (dwarf
spheroidals are dark-matter dominated at these radii): the enclosed mass is the halo's.

- ``nfw``: NFW cusp, rho ~ r^-1 (r/a)^-... (galpy ``NFWPotential``, scale radius a);
- ``burkert``: Burkert core (``BurkertPotential``, core radius a);
- ``einasto``: Einasto with n = 1/alpha in {3, 4} (``EinastoPotential``, r_-2 = a). The LCDM-like n = 5-6
  (alpha 0.17-0.2) are left out: galpy's DF sampling put the Plummer tracer at 1-30% of its scale for b/a >~ 0.3
  (caught by the check in :func:`build_halo`).

Cost: building one DF (galpy tabulates it on first use) takes 1-3 s; sampling after that ~10 us a star. So the
DFs are built once, in dimensionless units (halo scale a = 1, amplitude 1, G = 1), on a grid of tracer scale
b / a and anisotropy radius ra / b, and every galaxy rescales a grid DF: length by a_phys = R_h / b (R_h, the
Plummer projected half-light radius, is drawn in kpc) and velocity by V0 = sigma / sigma_DF (sigma, the
galaxy's overall line-of-sight dispersion, is drawn in km/s), so mass by V0^2 a_phys / G. The profile shape
in units of R_h is therefore one of the grid's (``GRID``), while the scales are continuous.

A galaxy: N stars (20-2000, log-uniform) drawn once in 3-D; each of its projections is a random rotation,
x, y = projected position [kpc] about the centre, v_los = line-of-sight velocity + a systemic velocity +
Gaussian errors v_err (km/s; per galaxy a level in 1-5 km/s, per star x exp(N(0, 0.3))), redrawn per
projection. Truth: log10 M(< f R_h) [Msun] at f = 0.6, 0.8, ..., 2.4, with R_h the projected half-light
radius *measured on that projection's stars* (their median projected radius), the same R_h the task uses, and
M the halo's 3-D enclosed mass from the potential (``pot.mass``, tabulated on a fine grid and interpolated in
log-log to <1e-4 dex).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from survey_infer.tasks.mass_profiles import G_KPC_KMS2_MSUN, RADII_F

log = logging.getLogger(__name__)

FAMILIES = ("nfw", "burkert", "einasto")
EINASTO_N = (3.0, 4.0)  # alpha = 0.33, 0.25; n >= 5 fails the tracer check below (galpy DF, b/a >~ 0.3)
B_RATIOS = {"nfw": np.geomspace(0.05, 1.0, 8), "burkert": np.geomspace(0.1, 2.0, 8),
            "einasto": np.geomspace(0.05, 1.0, 5)}  # fmt: skip
RA_RATIOS = (np.inf, 1.0, 2.0, 4.0)  # Osipkov-Merritt ra / b (inf: isotropic)
RMAX = 300.0  # DF support, in halo scale radii
N_STARS_RANGE = (20, 2000)
R_HALF_KPC_RANGE = (0.1, 1.0)
SIGMA_KMS_RANGE = (5.0, 20.0)
V_ERR_LEVEL_RANGE = (1.0, 5.0)
V_SYS_RANGE = (-300.0, 300.0)
DF_CALIBRATION_STARS = 20000
_LOG_R_TABLE = np.linspace(-4.0, np.log10(RMAX), 600)


@dataclass
class Halo:
    """One grid point: a dimensionless halo + tracer DF, and what rescaling needs."""

    family: str
    shape: float  # Einasto n; 0 for the others
    b_ratio: float  # Plummer b / halo scale radius
    ra_ratio: float  # Osipkov-Merritt ra / b (inf: isotropic)
    df: Any = field(repr=False)
    pot: Any = field(repr=False)
    sigma_los: float = 0.0  # overall line-of-sight dispersion of the tracer, dimensionless
    log_mass_table: np.ndarray = field(default=None, repr=False)  # log10 M(<10^_LOG_R_TABLE), dimensionless

    @property
    def label(self) -> str:
        ra = "iso" if not np.isfinite(self.ra_ratio) else f"om{self.ra_ratio:g}"
        shape = f"-n{self.shape:g}" if self.family == "einasto" else ""
        return f"{self.family}{shape}-b{self.b_ratio:.3g}-{ra}"

    def log_mass(self, r: np.ndarray) -> np.ndarray:
        """log10 M(<r), dimensionless (r in halo scale radii), interpolated in log-log."""
        return np.interp(np.log10(r), _LOG_R_TABLE, self.log_mass_table)


def halo_potential(family: str, shape: float = 0.0):
    import galpy.potential as gp

    # normalize=1: v_c(1) = 1, so M(<a) = 1 (G = 1). galpy's DF tables are accurate for potentials of this
    # depth; with amp=1 an Einasto n=6 halo is ~1e-3 as deep and its DF sampling put the tracer at ~1% of b.
    if family == "nfw":
        return gp.NFWPotential(a=1.0, normalize=1.0)
    if family == "burkert":
        return gp.BurkertPotential(a=1.0, normalize=1.0)
    if family == "einasto":
        return gp.EinastoPotential(rm2=1.0, n=float(shape), normalize=1.0)
    raise ValueError(f"unknown halo family {family!r}; one of {FAMILIES}")


def build_halo(family: str, shape: float, b_ratio: float, ra_ratio: float, seed: int = 0) -> Halo:
    """Build (and calibrate) the DF of one grid point."""
    import galpy.potential as gp
    from galpy.df import osipkovmerrittdf

    pot = halo_potential(family, shape)
    tracer = gp.PlummerPotential(amp=1.0, b=float(b_ratio))
    ra = float(ra_ratio) * float(b_ratio) if np.isfinite(ra_ratio) else 1e8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = osipkovmerrittdf(pot=pot, denspot=tracer, ra=ra, rmax=RMAX)
        halo = Halo(family, float(shape), float(b_ratio), float(ra_ratio), df, pot)
        np.random.seed(seed)  # galpy samples with numpy's global generator
        pos, v = sample_stars(halo, DF_CALIBRATION_STARS)
        halo.sigma_los = float(np.std(v[:, 2]))
        ratio = float(np.median(np.hypot(pos[:, 0], pos[:, 1]))) / float(b_ratio)
        if not 0.97 < ratio < 1.03:  # the Plummer projected half-mass radius is b: the DF must reproduce it
            raise ValueError(f"{halo.label}: the DF's stars have median projected radius {ratio:.3f} b, not b")
        halo.log_mass_table = np.log10([float(pot.mass(10.0**lr)) for lr in _LOG_R_TABLE])
    return halo


def default_grid(families: tuple[str, ...] = FAMILIES) -> list[tuple[str, float, float, float]]:
    grid = []
    for family in families:
        shapes = EINASTO_N if family == "einasto" else (0.0,)
        for shape in shapes:
            for b in B_RATIOS[family]:
                for ra in RA_RATIOS:
                    grid.append((family, shape, float(b), float(ra)))
    return grid


def build_grid(families: tuple[str, ...] = FAMILIES, seed: int = 0) -> list[Halo]:
    tick = time.time()
    halos = [build_halo(*point, seed=seed + k) for k, point in enumerate(default_grid(families))]
    log.info("built %d DFs in %.0f s", len(halos), time.time() - tick)
    return halos


def sample_stars(halo: Halo, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n stars from the halo's DF: positions (n, 3) and velocities (n, 3), dimensionless, Cartesian."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        R, vR, vT, z, vz, phi = (np.asarray(a, dtype=np.float64) for a in halo.df.sample(n=n, return_orbit=False))
    c, s = np.cos(phi), np.sin(phi)
    pos = np.stack([R * c, R * s, z], axis=1)
    vel = np.stack([vR * c - vT * s, vR * s + vT * c, vz], axis=1)
    return pos, vel


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3-D rotation matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


@dataclass
class Projection:
    """One observed projection of one galaxy, and its truth."""

    x: np.ndarray  # kpc
    y: np.ndarray  # kpc
    v_los: np.ndarray  # km/s
    v_err: np.ndarray  # km/s
    truth: dict[str, Any]


def simulate_galaxy(halo: Halo, rng: np.random.Generator, n_projections: int = 1, n_stars: int | None = None,
                    galaxy_id: int = 0) -> list[Projection]:  # fmt: skip
    """One mock galaxy observed along ``n_projections`` random lines of sight."""
    if n_stars is None:
        n_stars = int(round(np.exp(rng.uniform(*np.log(N_STARS_RANGE)))))
    r_half_true = float(np.exp(rng.uniform(*np.log(R_HALF_KPC_RANGE))))
    sigma_target = float(np.exp(rng.uniform(*np.log(SIGMA_KMS_RANGE))))
    a_phys = r_half_true / halo.b_ratio  # kpc per dimensionless length
    v0 = sigma_target / halo.sigma_los  # km/s per dimensionless velocity
    m_unit = v0**2 * a_phys / G_KPC_KMS2_MSUN  # Msun per dimensionless mass (G = 1)
    np.random.seed(int(rng.integers(2**31)))  # galpy draws from numpy's global generator
    pos, vel = sample_stars(halo, n_stars)
    err_level = float(rng.uniform(*V_ERR_LEVEL_RANGE))
    v_sys = float(rng.uniform(*V_SYS_RANGE))
    out = []
    for k in range(n_projections):
        rot = random_rotation(rng)
        p, v = pos @ rot.T * a_phys, vel @ rot.T * v0
        v_err = np.clip(err_level * np.exp(rng.normal(0.0, 0.3, n_stars)), 0.3, 15.0)
        v_los = v[:, 2] + v_sys + rng.normal(0.0, v_err)
        r_half = float(np.median(np.hypot(p[:, 0], p[:, 1])))
        radii = np.asarray(RADII_F) * r_half
        log_m = halo.log_mass(radii / a_phys) + np.log10(m_unit)
        truth = {"galaxy_id": galaxy_id, "projection": k, "family": halo.family, "einasto_n": halo.shape,
                 "b_over_a": halo.b_ratio, "ra_over_b": halo.ra_ratio if np.isfinite(halo.ra_ratio) else np.inf,
                 "halo_label": halo.label, "n_stars": n_stars, "r_half_kpc": r_half,
                 "r_half_plummer_kpc": r_half_true, "halo_scale_kpc": a_phys, "sigma_scale_kms": sigma_target,
                 "v_sys_kms": v_sys, "v_err_level_kms": err_level, "log_mass": log_m.astype(np.float64),
                 "mass_unit_msun": m_unit}  # fmt: skip
        out.append(Projection(p[:, 0].copy(), p[:, 1].copy(), v_los, v_err, truth))
    return out


def true_log_mass(halo: Halo, truth: dict[str, Any], radii_kpc: np.ndarray) -> np.ndarray:
    """log10 M(<r) [Msun] of a simulated galaxy at any radii (kpc), from its halo and rescaling."""
    return halo.log_mass(np.asarray(radii_kpc) / truth["halo_scale_kpc"]) + np.log10(truth["mass_unit_msun"])


def simulate_split(halos: list[Halo], n_galaxies: int, seed: int, n_projections: int = 1,
                   first_id: int = 0) -> list[Projection]:  # fmt: skip
    """``n_galaxies`` galaxies (each on a uniformly drawn grid halo) x ``n_projections`` projections."""
    rng = np.random.default_rng(seed)
    out: list[Projection] = []
    for g in range(n_galaxies):
        halo = halos[int(rng.integers(len(halos)))]
        out.extend(simulate_galaxy(halo, rng, n_projections, galaxy_id=first_id + g))
    return out


__all__ = ["FAMILIES", "Halo", "Projection", "build_grid", "build_halo", "default_grid", "sample_stars",
           "simulate_galaxy", "simulate_split", "true_log_mass"]  # fmt: skip
