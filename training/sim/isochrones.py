"""Stars from PARSEC isochrones in HST bands: the derived table, Kroupa IMF sampling, SSP integrals, extinction.

The table (``training/data/parsec_hst.npz``) is written by ``training/derive_isochrone_table.py`` from the
PARSEC files (see its docstring for the filters and the blackbody bolometric corrections). It holds, per
isochrone age, the rows sorted by initial mass with absolute AB magnitudes; a star of initial mass above the
isochrone's last row is dead (a remnant: its mass counts, it gives no light).

IMF: Kroupa (2001), dN/dm ∝ m^-1.3 on [0.08, 0.5] Msun and m^-2.3 on [0.5, 120] Msun (brown dwarfs left out:
they carry no light and ~4% of the mass). A cluster's mass is the initial mass of its stars, drawn one by one
until the target is reached, so the number of bright stars scatters as it does in nature.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

TABLE_PATH = Path(__file__).resolve().parents[1] / "data" / "parsec_hst.npz"
IMF_LIMITS = (0.08, 0.5, 120.0)
IMF_SLOPES = (1.3, 2.3)
# A_band / A_V, Cardelli, Clayton & Mathis (1989), R_V = 3.1, at each band's pivot wavelength.
EXTINCTION_RATIO = {"F336W": 1.66, "F438W": 1.34, "F475W": 1.20, "F814W": 0.60}


@dataclass(frozen=True)
class IsochroneTable:
    """Per-age rows (initial mass ascending) with absolute AB magnitudes; see the module doc."""

    log_age: np.ndarray  # (A,)
    offsets: np.ndarray  # (A + 1,) row ranges of each age
    m_ini: np.ndarray  # (rows,)
    m_act: np.ndarray  # (rows,)
    abs_mag: np.ndarray  # (rows, bands)
    bands: tuple[str, ...]
    provenance: dict

    def age_index(self, log_age: float | np.ndarray) -> np.ndarray:
        """Index of the nearest tabulated age."""
        return np.abs(np.asarray(log_age, dtype=np.float64)[..., None] - self.log_age).argmin(axis=-1)

    def rows(self, index: int) -> slice:
        return slice(int(self.offsets[index]), int(self.offsets[index + 1]))

    def band_index(self, bands: tuple[str, ...]) -> list[int]:
        missing = [b for b in bands if b not in self.bands]
        if missing:
            raise ValueError(f"bands {missing} not in the isochrone table (it has {list(self.bands)})")
        return [self.bands.index(b) for b in bands]

    def star_abs_mags(self, index: int, masses: np.ndarray, bands: tuple[str, ...]) -> np.ndarray:
        """Absolute AB magnitudes (n, bands) of stars of initial ``masses`` at age ``index``; dead stars get +inf.

        Magnitudes are interpolated in initial mass (the isochrone rows are dense through every phase);
        stars below the lowest row take its magnitudes (they are far below any detection limit).
        """
        sl = self.rows(index)
        m_ini = self.m_ini[sl].astype(np.float64)
        mags = self.abs_mag[sl][:, self.band_index(bands)].astype(np.float64)
        out = np.stack([np.interp(masses, m_ini, mags[:, b]) for b in range(mags.shape[1])], axis=1)
        out[masses > m_ini[-1]] = np.inf
        return out


@lru_cache(maxsize=2)
def load_table(path: str | Path = TABLE_PATH) -> IsochroneTable:
    """The derived table (no pickle); a missing file says how to make it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `python -m training.derive_isochrone_table`")
    with np.load(path, allow_pickle=False) as data:
        for key in ("log_age", "offsets", "m_ini", "m_act", "abs_mag", "bands"):
            if key not in data:
                raise ValueError(f"{path}: array {key!r} is missing")
        return IsochroneTable(
            log_age=data["log_age"], offsets=data["offsets"], m_ini=data["m_ini"], m_act=data["m_act"],
            abs_mag=data["abs_mag"], bands=tuple(str(b) for b in data["bands"]),
            provenance=json.loads(str(data["provenance"])),
        )  # fmt: skip


def _segment_masses() -> tuple[np.ndarray, np.ndarray]:
    """Number fraction of each IMF segment and the segments' (lo, hi, slope) for inverse-CDF draws."""
    lo, mid, hi = IMF_LIMITS
    a1, a2 = IMF_SLOPES
    # continuity at 0.5: k1 m^-a1 = k2 m^-a2 -> k1 = k2 * mid^(a1 - a2)
    k2 = 1.0
    k1 = k2 * mid ** (a1 - a2)
    n1 = k1 * (mid ** (1 - a1) - lo ** (1 - a1)) / (1 - a1)
    n2 = k2 * (hi ** (1 - a2) - mid ** (1 - a2)) / (1 - a2)
    frac = np.array([n1, n2]) / (n1 + n2)
    return frac, np.array([[lo, mid, a1], [mid, hi, a2]])


def sample_imf(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` initial masses [Msun] from the Kroupa IMF (inverse CDF per power-law segment)."""
    frac, segments = _segment_masses()
    which = rng.random(n) >= frac[0]
    u = rng.random(n)
    out = np.empty(n)
    for s in (0, 1):
        lo, hi, a = segments[s]
        sel = which == bool(s)
        e = 1 - a
        out[sel] = (lo**e + u[sel] * (hi**e - lo**e)) ** (1 / e)
    return out


MEAN_STAR_MASS = 0.0  # filled below


def _mean_mass() -> float:
    grid = np.geomspace(IMF_LIMITS[0], IMF_LIMITS[2], 20001)
    phi = imf_density(grid)
    return float(np.trapezoid(phi * grid, grid) / np.trapezoid(phi, grid))


def imf_density(m: np.ndarray) -> np.ndarray:
    """Unnormalised Kroupa dN/dm."""
    lo, mid, hi = IMF_LIMITS
    a1, a2 = IMF_SLOPES
    m = np.asarray(m, dtype=np.float64)
    out = np.where(m < mid, mid ** (a1 - a2) * m**-a1, m**-a2)
    return np.where((m >= lo) & (m <= hi), out, 0.0)


MEAN_STAR_MASS = _mean_mass()


def sample_cluster_masses(rng: np.random.Generator, total_mass: float) -> np.ndarray:
    """Initial masses drawn one by one from the IMF until their sum first reaches ``total_mass`` (the last
    star is kept: stop-after sampling); the sum is the cluster's true initial mass."""
    if not total_mass > 0:
        raise ValueError(f"total_mass must be positive, got {total_mass}")
    chunks, have = [], 0.0
    while True:
        n = int(1.2 * (total_mass - have) / MEAN_STAR_MASS) + 16
        draw = sample_imf(rng, n)
        cum = have + np.cumsum(draw)
        stop = int(np.searchsorted(cum, total_mass))
        if stop < n:
            chunks.append(draw[: stop + 1])
            return np.concatenate(chunks)
        chunks.append(draw)
        have = float(cum[-1])


def integrated_abs_mags(table: IsochroneTable | dict, log_age: float, bands: tuple[str, ...] | None = None) -> np.ndarray:
    """Absolute AB magnitudes (bands,) per 1 Msun of initial mass of a fully sampled population (the SSP limit
    of infinite mass): integral of phi(m) L(m) over the living stars / integral of phi(m) m over the IMF."""
    if isinstance(table, dict):  # during derivation, before the table is written
        table = IsochroneTable(table["log_age"], table["offsets"], table["m_ini"], table["m_act"], table["abs_mag"],
                               tuple(str(b) for b in table["bands"]), {})  # fmt: skip
    bands = tuple(bands or table.bands)
    index = int(table.age_index(log_age))
    sl = table.rows(index)
    m_rows = table.m_ini[sl].astype(np.float64)
    grid = np.unique(np.concatenate([m_rows, np.geomspace(IMF_LIMITS[0], m_rows[-1], 4000)]))
    flux = 10 ** (-0.4 * table.star_abs_mags(index, grid, bands))  # (m, bands)
    phi = imf_density(grid)
    lum = np.trapezoid(phi[:, None] * flux, grid, axis=0)
    full = np.geomspace(IMF_LIMITS[0], IMF_LIMITS[2], 20001)
    mass = np.trapezoid(imf_density(full) * full, full)
    return -2.5 * np.log10(lum / mass)


def extinction(bands: tuple[str, ...], a_v: float | np.ndarray) -> np.ndarray:
    """A_band (..., bands) for V-band extinction ``a_v``."""
    ratio = np.array([EXTINCTION_RATIO[b] for b in bands])
    return np.asarray(a_v, dtype=np.float64)[..., None] * ratio
