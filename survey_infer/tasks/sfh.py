"""sfh: star-formation history and metallicity in 16 age bins per spaxel, from IFU spectra + HST photometry.

Input: one `ifu` store unit = one cube (survey_infer.ifu); its spaxels are the engine's rows, read a block at a
time as a :class:`survey_infer.ifu.SpaxelBatch` (observed-frame flux and inverse variance on the cube's
wavelength grid, the cube's redshift, the five HST bands F275W, F336W, F438W, F555W, F814W as mean f_lambda in
the cube's flux unit, and each spaxel's (y, x)).

Preparation (:func:`spectrum_inputs`): each spectrum is moved to the rest frame and averaged onto the
network's grid, 1024 pixels uniform in ln(lambda) over rest 4750-9030 A (~190 km/s per pixel, about 3.3 MUSE
pixels: the network sees a *downsampled* spectrum), using only good pixels (finite, ivar > 0); a network pixel
less than half covered by good pixels is masked. Channels: flux / median flux (0 where masked) and the pixel's
S/N / 100 (0 where masked). Photometry: log10(band / median flux), a mask per band, log10 median S/N / 2 and
20 z. The rest range needs observed 4750 (1 + z) to 9030 (1 + z) A: a cube that covers less than 90% of it is
refused before any work, naming the wavelengths that are missing; one that covers 90-100% is run with the
rest masked and every spaxel flagged ``out_of_range`` (as are cubes outside the trained redshift range).

Outputs per spaxel (the network, survey_infer.sfh_net.SfhNet): mass fractions (mass formed) in the 16 age
bins (:data:`AGE_EDGES_LOG`), log10 Z/Zsun per bin; derived here: mass- and light-weighted mean log10 age
and log10 Z (light weights = the fraction x each bin's luminosity per unit mass in rest 5400-5600 A at its
metallicity, from the BC03 templates the bundle records), each with an uncertainty (the network's log sigma,
trained by a Gaussian likelihood on the derived means' errors).

Per cube (:meth:`Sfh.finish_unit`): the SFH cube, metallicity cube, the four mean maps, their errors, the
per-spaxel flags and ood scores go to ``<out>/sfh.zarr/<object_id>/``; the catalog row holds the cube's
integrated values (spaxels combined by their stellar mass: mean window flux / light per unit mass).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pyarrow as pa

from survey_infer.bundle import Bundle
from survey_infer.errors import BundleError, StoreError
from survey_infer.flags import FLAG_BITS, NO_ESTIMATE
from survey_infer.tasks.base import OutputColumn, Task, UnitResult

N_BINS = 16
AGE_EDGES_LOG = np.linspace(6.5, 10.15, N_BINS + 1)  # log10 yr
AGE_CENTRES_LOG = 0.5 * (AGE_EDGES_LOG[:-1] + AGE_EDGES_LOG[1:])
HST_BANDS = ("F275W", "F336W", "F438W", "F555W", "F814W")
MUSE_STEP = 1.25
MUSE_WAVE = 4750.0 + MUSE_STEP * np.arange(3681)  # 4750-9350 A
INPUT_PIXELS = 1024
INPUT_REST_RANGE = (4750.0, 9030.0)
N_PHOT = 2 * len(HST_BANDS) + 2
MIN_COVERAGE = 0.9  # of the rest range; below it the cube is refused
MIN_GOOD = 0.5  # of a network pixel covered by good pixels
MEANS = ("age_lw", "age_mw", "log_z_lw", "log_z_mw")


def input_edges() -> np.ndarray:
    return np.exp(np.linspace(np.log(INPUT_REST_RANGE[0]), np.log(INPUT_REST_RANGE[1]), INPUT_PIXELS + 1))


def pixel_edges(wave: np.ndarray) -> np.ndarray:
    """Pixel edges of a monotonic wavelength grid (midpoints; the ends extrapolated)."""
    wave = np.asarray(wave, np.float64)
    mid = 0.5 * (wave[1:] + wave[:-1])
    return np.concatenate([[wave[0] - (mid[0] - wave[0])], mid, [wave[-1] + (wave[-1] - mid[-1])]])


def coverage(wave: np.ndarray, redshift: float) -> tuple[float, tuple[float, float], list[tuple[float, float]]]:
    """Fraction of the network's rest range a cube's grid covers at ``redshift``, the observed range needed,
    and the missing observed intervals."""
    lo, hi = INPUT_REST_RANGE[0] * (1 + redshift), INPUT_REST_RANGE[1] * (1 + redshift)
    edges = pixel_edges(wave)
    have_lo, have_hi = max(lo, edges[0]), min(hi, edges[-1])
    frac = max(0.0, have_hi - have_lo) / (hi - lo)
    missing = []
    if edges[0] > lo:
        missing.append((lo, min(edges[0], hi)))
    if edges[-1] < hi:
        missing.append((max(edges[-1], lo), hi))
    return frac, (lo, hi), missing


def _cum_at(cum: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Cumulative sums (N, L+1) evaluated at fractional pixel positions q (N, M)."""
    i = np.clip(np.floor(q).astype(np.int64), 0, cum.shape[1] - 2)
    t = q - i
    a = np.take_along_axis(cum, i, axis=1)
    b = np.take_along_axis(cum, i + 1, axis=1)
    return a + t * (b - a)


def spectrum_inputs(flux: np.ndarray, ivar: np.ndarray, wave: np.ndarray, redshift: np.ndarray,
                    photometry: np.ndarray | None, photometry_ivar: np.ndarray | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:  # fmt: skip
    """Network inputs for observed spectra (N, L) on ``wave`` at ``redshift`` (N,), and per-spectrum summaries
    (``usable``, ``norm`` = median rest-frame flux, ``window`` = mean flux in rest 5400-5600 A, ``snr``)."""
    flux = np.asarray(flux, np.float64)
    ivar = np.asarray(ivar, np.float64)
    n, length = flux.shape
    good = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
    edges = pixel_edges(wave)
    width = np.diff(edges)[None, :]
    f = np.where(good, flux, 0.0)
    var = np.where(good, 1.0 / np.where(good, ivar, 1.0), 0.0)
    zero = np.zeros((n, 1))
    c_f = np.concatenate([zero, np.cumsum(f * width, axis=1)], axis=1)
    c_g = np.concatenate([zero, np.cumsum(good * width, axis=1)], axis=1)
    c_v = np.concatenate([zero, np.cumsum(var * width**2, axis=1)], axis=1)
    rest = input_edges()
    obs = rest[None, :] * (1 + np.asarray(redshift, np.float64)[:, None])  # (N, P+1)
    q = np.interp(obs.ravel(), edges, np.arange(length + 1, dtype=np.float64)).reshape(obs.shape)
    g = np.diff(_cum_at(c_g, q), axis=1)  # good wavelength covered per network pixel
    span = np.diff(obs, axis=1)
    valid = g >= MIN_GOOD * span
    safe_g = np.where(valid, g, 1.0)
    mean = np.where(valid, np.diff(_cum_at(c_f, q), axis=1) / safe_g, 0.0)
    err = np.where(valid, np.sqrt(np.maximum(np.diff(_cum_at(c_v, q), axis=1), 0.0)) / safe_g, 0.0)
    masked_mean = np.where(valid, mean, np.nan)
    centres = 0.5 * (rest[1:] + rest[:-1])
    win = (centres >= 5400.0) & (centres <= 5600.0)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows (spaxels without data) give NaN, flagged below
        norm = np.nanmedian(masked_mean, axis=1) if valid.any() else np.full(n, np.nan)
        snr_px = np.where(valid & (err > 0), mean / np.where(err > 0, err, 1.0), 0.0)
        snr = np.nanmedian(np.where(valid, snr_px, np.nan), axis=1)
        window = np.nanmean(np.where(valid[:, win], mean[:, win], np.nan), axis=1)
    usable = (valid.mean(axis=1) >= 0.5) & np.isfinite(norm) & (norm > 0) & np.isfinite(snr) & (snr > 0)
    safe_norm = np.where(usable, norm, 1.0)
    spectrum = np.zeros((n, 2, INPUT_PIXELS), np.float32)
    spectrum[:, 0] = np.clip(mean / safe_norm[:, None], -5, 20)
    spectrum[:, 1] = np.clip(snr_px / 100.0, 0.0, 5.0)
    spectrum[~usable] = 0.0
    phot_in = np.zeros((n, N_PHOT), np.float32)
    if photometry is not None:
        p = np.asarray(photometry, np.float64)
        pi = np.asarray(photometry_ivar, np.float64) if photometry_ivar is not None else np.ones_like(p)
        ok = np.isfinite(p) & np.isfinite(pi) & (pi > 0) & (p > 0)
        with np.errstate(all="ignore"):
            ratio = np.log10(np.where(ok, p, 1.0) / safe_norm[:, None])
        phot_in[:, : len(HST_BANDS)] = np.where(ok, np.clip(ratio, -3, 3), 0.0)
        phot_in[:, len(HST_BANDS) : 2 * len(HST_BANDS)] = ok
    phot_in[:, -2] = np.log10(np.clip(np.where(usable, snr, 1.0), 1e-3, 1e4)) / 2
    phot_in[:, -1] = 20.0 * np.asarray(redshift, np.float64)
    phot_in[~usable] = 0.0
    summary = {"usable": usable, "norm": np.where(usable, norm, np.nan), "window": np.where(usable, window, np.nan),
               "snr": np.where(usable, snr, np.nan), "coverage": valid.mean(axis=1)}  # fmt: skip
    return {"spectrum": spectrum, "photometry": phot_in}, summary


def derived_means(sfh: np.ndarray, log_z: np.ndarray, light_per_mass: np.ndarray, grid_log_z: np.ndarray) -> dict[str, np.ndarray]:
    """Mass- and light-weighted mean log10 age and log10 Z from mass fractions and metallicities per bin.

    ``light_per_mass`` (n_Z, 16): each bin's luminosity per unit mass formed in the light window, on the
    metallicity grid ``grid_log_z``; interpolated linearly in log Z (as the templates are mixed)."""
    k = np.clip(np.searchsorted(grid_log_z, log_z, side="right") - 1, 0, len(grid_log_z) - 2)
    w = np.clip((log_z - grid_log_z[k]) / (grid_log_z[k + 1] - grid_log_z[k]), 0.0, 1.0)
    cols = np.arange(sfh.shape[1])
    light = (1 - w) * light_per_mass[k, cols] + w * light_per_mass[k + 1, cols]
    lf = sfh * light
    lsum = lf.sum(axis=1, keepdims=True)
    lf = lf / np.where(lsum > 0, lsum, 1.0)
    return {"age_lw": lf @ AGE_CENTRES_LOG, "age_mw": sfh @ AGE_CENTRES_LOG, "log_z_lw": (lf * log_z).sum(1),
            "log_z_mw": (sfh * log_z).sum(1), "light_per_mass": light_sum(sfh, light)}  # fmt: skip


def light_sum(sfh: np.ndarray, light: np.ndarray) -> np.ndarray:
    return (sfh * light).sum(axis=1)


class Sfh(Task):
    name = "sfh"
    store_kind = "ifu"
    array_store = "sfh.zarr"

    def output_columns(self, bundle: Bundle) -> list[OutputColumn]:
        bins = pa.list_(pa.float32(), N_BINS)
        return [
            OutputColumn("n_spaxels", "int32", "", "spaxels in the cube"),
            OutputColumn("n_estimated", "int32", "", "spaxels with an estimate (not flagged nan_pixels)"),
            OutputColumn("age_lw", "float32", "dex(yr)", "cube-integrated light-weighted mean log10 age"),
            OutputColumn("age_mw", "float32", "dex(yr)", "cube-integrated mass-weighted mean log10 age"),
            OutputColumn("log_z_lw", "float32", "dex", "cube-integrated light-weighted mean log10 Z/Zsun"),
            OutputColumn("log_z_mw", "float32", "dex", "cube-integrated mass-weighted mean log10 Z/Zsun"),
            OutputColumn("sfh", "float32", "", f"cube-integrated mass fraction formed in the {N_BINS} age bins "
                         "(log10 age edges in sfh.zarr attrs)", arrow_type=bins),
            OutputColumn("metallicity", "float32", "dex", f"cube-integrated mass-weighted log10 Z/Zsun per age bin",
                         arrow_type=bins),
        ]  # fmt: skip

    def input_columns(self, bundle: Bundle) -> list[str]:
        return []

    def check_store(self, info, bundle: Bundle) -> None:
        """Refuse a store whose cubes do not cover the rest-frame range the network reads (>= 90% of it)."""
        if info.kind != "ifu":
            raise StoreError(f"task {self.name} reads ifu stores; {info.path} is a {info.kind!r} store")
        if list(bundle.input_spec.get("bands", HST_BANDS)) != list(HST_BANDS):
            raise BundleError(f"bundle {bundle.id} has bands {bundle.input_spec.get('bands')}; {list(HST_BANDS)} expected")
        rest = tuple(bundle.input_spec["spectrum"]["rest_range"])
        if rest != INPUT_REST_RANGE or bundle.input_spec["spectrum"]["shape"] != [2, INPUT_PIXELS]:
            raise BundleError(f"bundle {bundle.id} reads rest {rest} on {bundle.input_spec['spectrum']['shape']}; "
                              f"this version prepares {INPUT_REST_RANGE} on [2, {INPUT_PIXELS}]")  # fmt: skip
        for cube in info.cubes:
            frac, (lo, hi), missing = coverage(cube.wave, cube.redshift)
            if frac < MIN_COVERAGE:
                gaps = ", ".join(f"{a:.0f}-{b:.0f} A" for a, b in missing)
                raise StoreError(
                    f"cube '{cube.name}' (array 'cubes/{cube.name}/flux' in {info.path}) covers observed "
                    f"{cube.wave[0]:.0f}-{cube.wave[-1]:.0f} A; at redshift {cube.redshift:.4f} bundle {bundle.id} "
                    f"reads rest {INPUT_REST_RANGE[0]:.0f}-{INPUT_REST_RANGE[1]:.0f} A = observed {lo:.0f}-{hi:.0f} A "
                    f"and needs at least {MIN_COVERAGE:.0%} of it: missing {gaps} ({1 - frac:.0%})"
                )  # fmt: skip
        return None

    def _templates(self, bundle: Bundle) -> tuple[np.ndarray, np.ndarray]:
        spec = bundle.output_spec
        try:
            return np.asarray(spec["light_per_mass"], np.float64), np.asarray(spec["template_log_z"], np.float64)
        except KeyError as exc:
            raise BundleError(f"bundle {bundle.id}: output_spec lacks {exc.args[0]!r}") from exc

    def prepare(self, batch, columns, bundle):
        redshift = np.full(len(batch), batch.redshift)
        inputs, summary = spectrum_inputs(batch.flux, batch.ivar, batch.wave, redshift, batch.photometry,
                                          batch.photometry_ivar)  # fmt: skip
        flags = np.zeros(len(batch), np.int32)
        flags[~summary["usable"]] |= FLAG_BITS["nan_pixels"]
        lo, hi = bundle.input_spec.get("redshift_range", (0.0, np.inf))
        frac = coverage(batch.wave, batch.redshift)[0]
        if not lo <= batch.redshift <= hi or frac < 1.0:
            flags[summary["usable"]] |= FLAG_BITS["out_of_range"]
        columns.update({"_" + k: v for k, v in summary.items()})
        columns["_y"], columns["_x"] = batch.y, batch.x
        columns["_shape"] = np.tile(np.array(batch.shape, np.int64), (len(batch), 1))
        columns["_wcs"] = np.full(len(batch), json.dumps(getattr(batch, "wcs", {}) or {}), dtype=object)
        return inputs, flags

    def postprocess(self, outputs, columns, flags, bundle):
        sfh = np.asarray(outputs["sfh"], np.float64)
        log_z = np.asarray(outputs["metallicity"], np.float64)
        if sfh.ndim != 2 or sfh.shape[1] != N_BINS or log_z.shape != sfh.shape:
            raise BundleError(f"bundle {bundle.id}: engine outputs sfh {sfh.shape}, metallicity {log_z.shape}; (N, 16) expected")
        light, grid = self._templates(bundle)
        means = derived_means(sfh, log_z, light, grid)
        scale = np.asarray(bundle.output_spec.get("err_scale", [1.0] * 4), np.float64)
        sigma = np.exp(np.asarray(outputs["log_sigma"], np.float64)) * scale[None, :]
        bad = (flags & NO_ESTIMATE) != 0
        result = {"sfh": sfh.astype(np.float32), "metallicity": log_z.astype(np.float32)}
        for k, name in enumerate(MEANS):
            result[name] = means[name].astype(np.float32)
            result[name + "_err"] = sigma[:, k].astype(np.float32)
        result["light_per_mass"] = means["light_per_mass"].astype(np.float32)
        for name in list(result):
            result[name][bad] = np.nan
        result["_window"] = columns["_window"].astype(np.float32)
        result["_snr"] = columns["_snr"].astype(np.float32)
        result["_y"], result["_x"], result["_shape"] = columns["_y"], columns["_x"], columns["_shape"]
        if "_wcs" in columns:
            result["_wcs"] = columns["_wcs"]
        return result

    def finish_unit(self, results, columns, bundle) -> UnitResult:
        """One cube: its maps (an sfh.zarr group named by the cube's object_id) and its catalog row."""
        ny, nx = (int(v) for v in results["_shape"][0])
        y, x = results["_y"].astype(np.int64), results["_x"].astype(np.int64)
        flags = results["flag"].astype(np.int32)
        ok = (flags & NO_ESTIMATE) == 0

        def cube(values: np.ndarray, planes: int | None, fill=np.nan, dtype=np.float32) -> np.ndarray:
            shape = (ny, nx) if planes is None else (planes, ny, nx)
            out = np.full(shape, fill, dtype)
            if planes is None:
                out[y, x] = values
            else:
                out[:, y, x] = values.T
            return out

        arrays = {"sfh": cube(results["sfh"], N_BINS), "metallicity": cube(results["metallicity"], N_BINS)}
        for name in MEANS:
            arrays[name] = cube(results[name], None)
            arrays[name + "_err"] = cube(results[name + "_err"], None)
        arrays["snr"] = cube(results["_snr"], None)
        arrays["ood_score"] = cube(results["ood_score"], None)
        arrays["flags"] = cube(flags, None, fill=FLAG_BITS["nan_pixels"], dtype=np.int32)
        # the cube's integrated SFH: spaxels weighted by their mass formed ~ window flux / light per unit mass
        light, grid = self._templates(bundle)
        use = ok & np.isfinite(results["_window"]) & (results["_window"] > 0) & np.isfinite(results["light_per_mass"])
        rows: dict[str, np.ndarray] = {"n_spaxels": np.array([ny * nx], np.int32),
                                       "n_estimated": np.array([int(ok.sum())], np.int32)}  # fmt: skip
        if use.any():
            mass = results["_window"][use].astype(np.float64) / results["light_per_mass"][use]
            sfh_s = results["sfh"][use].astype(np.float64)
            m_bin = (mass[:, None] * sfh_s).sum(0)
            sfh_c = m_bin / m_bin.sum()
            z_c = (mass[:, None] * sfh_s * results["metallicity"][use]).sum(0) / np.maximum(m_bin, 1e-300)
            means = derived_means(sfh_c[None], z_c[None], light, grid)
            for name in MEANS:
                rows[name] = means[name].astype(np.float32)
            rows["sfh"] = sfh_c[None].astype(np.float32)
            rows["metallicity"] = z_c[None].astype(np.float32)
        else:
            for name in MEANS:
                rows[name] = np.array([np.nan], np.float32)
            rows["sfh"] = np.full((1, N_BINS), np.nan, np.float32)
            rows["metallicity"] = np.full((1, N_BINS), np.nan, np.float32)
        scores = results["ood_score"][ok]
        cube_flag = 0
        if not ok.any():
            cube_flag |= FLAG_BITS["nan_pixels"]
        else:
            if np.mean((flags[ok] & FLAG_BITS["ood"]) != 0) > 0.5:
                cube_flag |= FLAG_BITS["ood"]
            if np.any(flags[ok] & FLAG_BITS["out_of_range"]):
                cube_flag |= FLAG_BITS["out_of_range"]
        rows["flag"] = np.array([cube_flag], np.int32)
        rows["ood_score"] = np.array([np.nanmedian(scores) if np.isfinite(scores).any() else np.nan], np.float32)
        group = str(int(columns["object_id"][0]))
        err_units = {name + "_err": "dex" for name in MEANS}
        attrs = {"object_id": int(columns["object_id"][0]), "age_edges_log_yr": AGE_EDGES_LOG.tolist(),
                 "age_bins_yr": (10**AGE_CENTRES_LOG).tolist(), "bundle": bundle.id,
                 "units": {"sfh": "", "metallicity": "dex", "age_lw": "dex(yr)", "age_mw": "dex(yr)", "log_z_lw": "dex",
                           "log_z_mw": "dex", **err_units, "snr": "", "ood_score": "", "flags": ""},
                 "descriptions": {"sfh": "mass fraction formed per age bin (16, Y, X)",
                                  "metallicity": "log10 Z/Zsun per age bin (16, Y, X)",
                                  "age_lw": "light-weighted mean log10 age", "age_mw": "mass-weighted mean log10 age",
                                  "log_z_lw": "light-weighted mean log10 Z/Zsun", "log_z_mw": "mass-weighted mean log10 Z/Zsun",
                                  "snr": "median S/N per network pixel", "flags": "survey_infer.flags bits per spaxel"},
                 "wcs": json.loads(results["_wcs"][0]) if "_wcs" in results and len(results["_wcs"]) else {},
                 "cube_flag": int(cube_flag)}  # fmt: skip
        return UnitResult(rows=rows, groups={group: arrays}, group_attrs={group: attrs})

    def example_inputs(self, bundle, n_rows, seed=0):
        rng = np.random.default_rng(seed)
        spectrum = np.stack([1 + 0.1 * rng.standard_normal((n_rows, INPUT_PIXELS)),
                             rng.uniform(0.05, 1.0, (n_rows, 1)) * np.ones((1, INPUT_PIXELS))], axis=1)
        phot = np.concatenate([rng.normal(0, 0.3, (n_rows, 5)), np.ones((n_rows, 5)),
                               rng.uniform(0.3, 1.2, (n_rows, 1)), rng.uniform(0, 0.7, (n_rows, 1))], axis=1)
        return {"spectrum": spectrum.astype(np.float32), "photometry": phot.astype(np.float32)}


TASK = Sfh()
