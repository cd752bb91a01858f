"""Accuracy and speed of the `sfh` bundle against truth, the paper and pPXF (issue 6).

``python bench/accuracy_sfh.py [--n 6000] [--ppxf-per-bin 40] [--bundle DIR] [--threads 1]``

1. Held-out mocks: ``--n`` spectra from ``training.sim.spectra`` at the seeds reserved for evaluation
   (``training.train_sfh.EVAL_SEEDS['bench']``, never trained on), through the run's own path
   (``spectrum_inputs`` -> engine -> ``Sfh.postprocess``). Bias and dispersion (std) in dex of the light- and
   mass-weighted mean log age and log Z per S/N bin, beside the paper's 0.12 dex (age) and 0.03 dex (Z).
2. pPXF (``ppxf`` from PyPI) on a subset (``--ppxf-per-bin`` spectra per S/N bin, the first ones of each bin:
   a full-sample fit would take hours on this machine): the same spectra, the same templates (the 7 x 16 BC03
   bin composites the mocks are made of, mass-normalised by one scalar so that the weights are masses),
   de-redshifted, log-rebinned to 60 km/s (templates at 30 km/s, velscale_ratio 2), Gaussian LOSVD (2
   moments), a Calzetti reddening (one non-linear parameter: the mocks' own attenuation law; an 8th-degree
   multiplicative polynomial was 2-5x slower), linear regularisation over (age, Z) with ``--regul``
   (default 10), spectrum only (no photometry). ``--stage ppxf`` runs only this part (cached in
   ``bench/results/accuracy_sfh_ppxf.json``; a full run reuses it when n, seed, regul and subset size match). Its weights summed over Z give the mass fractions
   in the same 16 bins; mean metallicity per bin is the weight-averaged log Z; the derived means are computed
   by the task's own function. The CNN is scored on the same subset beside it.
3. Speed: seconds per spectrum for pPXF (wall, one process) and for the CNN (ONNX Runtime, batches of 1024,
   ``--threads`` threads; with and without the input preparation) on this machine, and their ratio.
4. Real spectra: the SDSS DR18 spectra of NGC3073 and NGC3522 shipped in the ppxf wheel, vacuum -> air,
   resampled onto the MUSE grid (4750-9350 A observed; pixels outside SDSS masked), no photometry: CNN and pPXF
   light- and mass-weighted mean ages side by side.
5. A mock cube (24 x 24, seed ``EVAL_SEEDS['bench_cube']``) run through ``survey-infer run sfh``: its
   light-weighted mean-age map, truth beside prediction, in ``bench/results/sfh_age_map.png``.

Prints the table and saves it in ``bench/results/accuracy_sfh.txt`` (+ ``accuracy_sfh.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from survey_infer.bundle import default_bundle_path, load_bundle  # noqa: E402
from survey_infer.engines import make_engine  # noqa: E402
from survey_infer.tasks.sfh import MEANS, MUSE_WAVE, N_BINS, TASK, derived_means, spectrum_inputs  # noqa: E402
from training.sim import spectra as sim  # noqa: E402
from training.train_sfh import EVAL_SEEDS  # noqa: E402

SNR_BINS = ((5, 10), (10, 20), (20, 50), (50, 100.01))
PAPER = {"age": 0.12, "log_z": 0.03}
RESULTS = ROOT / "bench" / "results"
C_KMS = 299792.458


def run_cnn(bundle, engine, spec: sim.Spectra, batch: int = 1024) -> tuple[dict[str, np.ndarray], float, float]:
    """The task's outputs for mock spectra; seconds spent in the engine, and in preparation + engine."""
    out: dict[str, list] = {}
    t_engine = t_all = 0.0
    for lo in range(0, len(spec.flux), batch):
        hi = min(lo + batch, len(spec.flux))
        tick = time.perf_counter()
        phot = spec.photometry[lo:hi] if spec.photometry is not None else None
        phot_ivar = spec.photometry_ivar[lo:hi] if spec.photometry_ivar is not None else None
        inputs, summary = spectrum_inputs(spec.flux[lo:hi], spec.ivar[lo:hi], spec.wave, spec.redshift[lo:hi], phot, phot_ivar)
        t0 = time.perf_counter()
        outputs = engine.run(inputs)
        t1 = time.perf_counter()
        flags = np.where(summary["usable"], 0, 1).astype(np.int32)
        columns = {"_" + k: v for k, v in summary.items()}
        n = hi - lo
        columns.update(_y=np.zeros(n, np.int64), _x=np.zeros(n, np.int64), _shape=np.ones((n, 2), np.int64))
        result = TASK.postprocess(outputs, columns, flags, bundle)
        t_all += time.perf_counter() - tick
        t_engine += t1 - t0
        for k, v in result.items():
            out.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in out.items()}, t_engine, t_all


# ------------------------------------------------------------------------------------------------ pPXF


class PpxfFitter:
    """pPXF with the mocks' own bin templates (see the module doc)."""

    def __init__(self, regul: float = 10.0, mdegree: int = -1):
        tpl = sim.templates()
        self.velscale = 2 * C_KMS * sim.REST_LN_STEP
        self.ln_t = np.log(tpl.rest_wave)
        t = np.transpose(tpl.spec, (2, 1, 0))  # (P, 16 ages, 7 Z): reg_dim (ages, Z)
        self.scale = float(np.median(t))
        self.templates = t / self.scale
        self.regul, self.mdegree = regul, mdegree
        self.light, self.grid = tpl.light, sim.LOG_Z

    def fit(self, wave_obs: np.ndarray, flux: np.ndarray, ivar: np.ndarray, redshift: float) -> dict[str, float]:
        from ppxf.ppxf import ppxf
        from ppxf.ppxf_util import log_rebin

        good_pix = np.isfinite(flux) & (ivar > 0)
        rest = wave_obs / (1 + redshift)
        lo, hi = max(rest[0], np.exp(self.ln_t[0]) * 1.02), min(rest[-1], np.exp(self.ln_t[-1]) / 1.02)
        sel = (rest >= lo) & (rest <= hi)
        f = np.where(good_pix, flux, 0.0)[sel]
        var = np.where(good_pix, 1.0 / np.where(good_pix, ivar, 1.0), 0.0)[sel]
        lam = rest[sel]
        spec, ln_lam, _ = log_rebin(lam, f, velscale=self.velscale)
        v, _, _ = log_rebin(lam, var, velscale=self.velscale)
        m, _, _ = log_rebin(lam, good_pix[sel].astype(float), velscale=self.velscale)
        norm = np.median(spec[m > 0.99])
        noise = np.sqrt(np.maximum(v, 1e-30) / np.maximum(m, 1e-3)) / norm  # variance of a mean of ~m pixels
        goodpixels = np.flatnonzero((m > 0.99) & np.isfinite(spec))
        galaxy = spec / norm
        # templates cut to the galaxy range plus a margin for velocity shifts (velscale_ratio 2)
        keep = (self.ln_t > ln_lam[0] - 0.02) & (self.ln_t < ln_lam[-1] + 0.02)
        tpl = self.templates[keep]
        dust = {"reddening": 0.3} if self.mdegree < 0 else {"mdegree": self.mdegree}
        pp = ppxf(tpl, galaxy, noise, self.velscale, [0.0, 150.0], moments=2, degree=-1, **dust,
                  velscale_ratio=2, regul=self.regul, reg_dim=tpl.shape[1:], goodpixels=goodpixels,
                  quiet=True, lam=np.exp(ln_lam), lam_temp=np.exp(self.ln_t[keep]))  # fmt: skip
        w = pp.weights.reshape(tpl.shape[1:])  # (16, 7), mass-like (templates per Msun formed / one scalar)
        mass_bin = w.sum(1)
        frac = mass_bin / mass_bin.sum()
        z_bin = np.where(mass_bin > 0, (w * self.grid[None, :]).sum(1) / np.maximum(mass_bin, 1e-300),
                         (self.grid[None, :] * np.ones_like(w)).mean(1))  # fmt: skip
        means = derived_means(frac[None], z_bin[None], self.light, self.grid)
        return {k: float(means[k][0]) for k in MEANS}


# ------------------------------------------------------------------------------------------------ real spectra


def sdss_on_muse_grid(path: Path) -> tuple[sim.Spectra, float, str]:
    """An SDSS DR18 spectrum (COADD HDU) in air wavelengths, bin-averaged onto the MUSE grid."""
    from astropy.io import fits
    from ppxf.ppxf_util import vac_to_air

    with fits.open(path) as hdul:
        coadd = hdul["COADD"].data
        z = float(hdul["SPECOBJ"].data["Z"][0]) if "SPECOBJ" in [h.name for h in hdul] else float(hdul[2].data["Z"][0])
        name = path.stem.split("_")[0]
    wave = vac_to_air(10 ** np.asarray(coadd["loglam"], np.float64))
    flux = np.asarray(coadd["flux"], np.float64)
    ivar = np.asarray(coadd["ivar"], np.float64)
    edges_sdss = np.concatenate([[wave[0] - (wave[1] - wave[0]) / 2], 0.5 * (wave[1:] + wave[:-1]), [wave[-1] + (wave[-1] - wave[-2]) / 2]])
    good = (ivar > 0) & np.isfinite(flux)
    width = np.diff(edges_sdss)
    c_f = np.concatenate([[0], np.cumsum(np.where(good, flux, 0) * width)])
    c_g = np.concatenate([[0], np.cumsum(good * width)])
    c_v = np.concatenate([[0], np.cumsum(np.where(good, 1 / np.where(good, ivar, 1), 0) * width**2)])
    step = MUSE_WAVE[1] - MUSE_WAVE[0]
    e = np.append(MUSE_WAVE - step / 2, MUSE_WAVE[-1] + step / 2)
    g = np.diff(np.interp(e, edges_sdss, c_g, left=0, right=c_g[-1]))
    inside = (e[:-1] > edges_sdss[0]) & (e[1:] < edges_sdss[-1]) & (g > 0.5 * step)
    f = np.where(inside, np.diff(np.interp(e, edges_sdss, c_f)) / np.where(g > 0, g, 1), np.nan)
    var = np.where(inside, np.diff(np.interp(e, edges_sdss, c_v)) / np.where(g > 0, g, 1) ** 2, np.inf)
    iv = np.where(inside, 1 / var, 0.0)
    spec = sim.Spectra(MUSE_WAVE.copy(), f[None].astype(np.float32), iv[None].astype(np.float32),
                       np.full((1, 5), np.nan, np.float32), np.zeros((1, 5), np.float32), np.array([z]), None)  # fmt: skip
    return spec, z, name


# ------------------------------------------------------------------------------------------------ main


def stats(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    err = pred - true
    ok = np.isfinite(err)
    return float(np.mean(err[ok])), float(np.std(err[ok]))


PPXF_CACHE = RESULTS / "accuracy_sfh_ppxf.json"
REAL_FILES = ("NGC3073_SDSS_DR18.fits", "NGC3522_SDSS_DR18.fits")


def ppxf_stage(args, params, spec, force: bool = False):
    """pPXF on the subset (the first --ppxf-per-bin spectra of each S/N bin) and on the real spectra; reused
    from PPXF_CACHE when it was made with the same n, seed, regul and subset size."""
    settings = {"n": args.n, "seed": EVAL_SEEDS["bench"], "regul": args.regul, "per_bin": args.ppxf_per_bin,
                "dust": "reddening (Calzetti)"}  # fmt: skip
    if not force and PPXF_CACHE.exists():
        cached = json.loads(PPXF_CACHE.read_text())
        if cached["settings"] == settings:
            res = {k: np.full(args.n, np.nan) for k in MEANS}
            for i, r in cached["fits"].items():
                for k in MEANS:
                    res[k][int(i)] = r[k]
            return res, cached["seconds"], cached["real"]
    import ppxf as _ppxf

    fitter = PpxfFitter(regul=args.regul, mdegree=-1)
    subset = np.concatenate([np.flatnonzero((params.snr >= lo) & (params.snr < hi))[: args.ppxf_per_bin] for lo, hi in SNR_BINS])
    res = {k: np.full(args.n, np.nan) for k in MEANS}
    fits_done, seconds = {}, []
    if PPXF_CACHE.exists():  # fits of a smaller subset with otherwise equal settings are kept (deterministic)
        cached = json.loads(PPXF_CACHE.read_text())
        if {k: v for k, v in cached["settings"].items() if k != "per_bin"} == {k: v for k, v in settings.items() if k != "per_bin"}:
            fits_done = {i: r for i, r in cached["fits"].items() if int(i) in set(subset.tolist())}
            seconds = list(cached["seconds"])[: len(fits_done)] if len(fits_done) == len(cached["fits"]) else []
            for i, r in fits_done.items():
                for k in MEANS:
                    res[k][int(i)] = r[k]
    for i in subset:
        if str(int(i)) in fits_done:
            continue
        tick = time.perf_counter()
        try:
            r = fitter.fit(spec.wave, spec.flux[i].astype(np.float64), spec.ivar[i].astype(np.float64), float(spec.redshift[i]))
        except Exception as exc:  # recorded, never hidden
            print(f"pPXF failed on spectrum {i}: {exc}", file=sys.stderr)
            continue
        seconds.append(time.perf_counter() - tick)
        fits_done[str(int(i))] = r
        for k in MEANS:
            res[k][i] = r[k]
        print(f"pPXF {len(seconds)}/{len(subset)}: spectrum {i} S/N {params.snr[i]:.0f} in {seconds[-1]:.1f} s", file=sys.stderr)
    real = {}
    for fname in REAL_FILES:
        s, z, name = sdss_on_muse_grid(Path(_ppxf.__file__).parent / "spectra" / fname)
        real[name] = fitter.fit(s.wave, s.flux[0].astype(np.float64), s.ivar[0].astype(np.float64), z)
    RESULTS.mkdir(parents=True, exist_ok=True)
    PPXF_CACHE.write_text(json.dumps({"settings": settings, "fits": fits_done, "seconds": seconds, "real": real}, indent=1))
    return res, seconds, real


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=6000)
    parser.add_argument("--ppxf-per-bin", type=int, default=40)
    parser.add_argument("--regul", type=float, default=10.0)
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-png", action="store_true")
    parser.add_argument("--stage", choices=["all", "ppxf"], default="all",
                        help="ppxf: only fit the pPXF subset and the real spectra, saved in bench/results/"
                             "accuracy_sfh_ppxf.json, which a later full run reuses when its settings match")
    args = parser.parse_args(argv)
    if args.stage == "ppxf":
        rng = np.random.default_rng(EVAL_SEEDS["bench"])
        params = sim.draw_params(rng, args.n)
        ppxf_stage(args, params, sim.make_spectra(params, rng), force=True)
        return
    command = "python bench/accuracy_sfh.py " + " ".join(argv if argv is not None else sys.argv[1:])
    bundle = load_bundle(args.bundle or default_bundle_path("sfh"), task="sfh")
    engine = make_engine("onnxruntime", bundle, threads=args.threads, device="cpu")
    lines = [f"sfh accuracy and speed: bundle {bundle.id}, {args.n} held-out mock spectra (seed {EVAL_SEEDS['bench']}), "
             f"engine {engine.describe()['name']} ({args.threads} thread(s)), this machine ({os.cpu_count()} CPUs shared)"]

    tick = time.time()
    rng = np.random.default_rng(EVAL_SEEDS["bench"])
    params = sim.draw_params(rng, args.n)
    spec = sim.make_spectra(params, rng)
    t = spec.truth
    truth = {"age_lw": t.age_lw, "age_mw": t.age_mw, "log_z_lw": t.z_lw, "log_z_mw": t.z_mw}
    sim_s = time.time() - tick
    engine.run({k: v[:8] for k, v in spectrum_inputs(spec.flux[:8], spec.ivar[:8], spec.wave, spec.redshift[:8],
                                                        spec.photometry[:8], spec.photometry_ivar[:8])[0].items()})  # warm-up
    cnn, t_engine, t_all = run_cnn(bundle, engine, spec)
    cnn_engine_s, cnn_all_s = t_engine / args.n, t_all / args.n

    ppxf_res, ppxf_seconds, ppxf_real = ppxf_stage(args, params, spec)
    ppxf_s = float(np.median(ppxf_seconds)) if ppxf_seconds else float("nan")

    # the table
    header = f"{'quantity':9s} {'S/N':>8s} {'n':>5s} | {'CNN bias':>8s} {'CNN std':>8s} | {'n_sub':>5s} {'CNN std':>8s} {'pPXF bias':>9s} {'pPXF std':>8s} | paper"
    lines += ["", "bias and dispersion (std) of predicted - true, dex; CNN on all, then CNN and pPXF on the pPXF subset", header,
              "-" * len(header)]
    table = {}
    for name in MEANS:
        for lo, hi in SNR_BINS + ((5, 100.01),):
            sel = (params.snr >= lo) & (params.snr < hi)
            b, s = stats(cnn[name][sel], truth[name][sel])
            sub = sel & np.isfinite(ppxf_res[name])
            sb, ss = stats(cnn[name][sub], truth[name][sub]) if sub.any() else (np.nan, np.nan)
            pb, ps = stats(ppxf_res[name][sub], truth[name][sub]) if sub.any() else (np.nan, np.nan)
            paper = PAPER["age"] if name.startswith("age") else PAPER["log_z"]
            label = f"{lo:g}-{min(hi, 100):g}" if (lo, hi) != (5, 100.01) else "all"
            lines.append(f"{name:9s} {label:>8s} {int(sel.sum()):5d} | {b:+8.3f} {s:8.3f} | {int(sub.sum()):5d} {ss:8.3f} {pb:+9.3f} {ps:8.3f} | {paper:.2f}")
            table[f"{name}:{label}"] = {"n": int(sel.sum()), "cnn_bias": b, "cnn_std": s, "n_ppxf": int(sub.sum()),
                                        "cnn_std_subset": ss, "cnn_bias_subset": sb, "ppxf_bias": pb, "ppxf_std": ps}
    ratio = ppxf_s / cnn_all_s
    lines += ["", "speed (seconds per spectrum, this machine)",
              f"  pPXF (median of {len(ppxf_seconds)} fits, regul {args.regul:g}, Calzetti reddening, 112 templates): {ppxf_s:.3f} s",
              f"  CNN engine only (ONNX Runtime, batches of 1024, {args.threads} thread): {cnn_engine_s * 1e3:.3f} ms",
              f"  CNN with input preparation (rest-frame rebinning) and postprocessing: {cnn_all_s * 1e3:.3f} ms",
              f"  ratio pPXF / CNN: {ratio:,.0f} (with preparation), {ppxf_s / cnn_engine_s:,.0f} (engine only); goal >= 1e4, paper 5e3-2e4"]
    # real spectra
    real = []
    import ppxf as _ppxf

    lines += ["", "real SDSS spectra (ppxf wheel), resampled to the MUSE grid, no photometry: mean log10 age [yr] and log10 Z",
              f"{'galaxy':8s} {'z':>7s} | {'CNN age_lw':>10s} {'pPXF age_lw':>11s} | {'CNN age_mw':>10s} {'pPXF age_mw':>11s} | {'CNN Z_lw':>8s} {'pPXF Z_lw':>9s}"]
    for fname in ("NGC3073_SDSS_DR18.fits", "NGC3522_SDSS_DR18.fits"):
        s, z, name = sdss_on_muse_grid(Path(_ppxf.__file__).parent / "spectra" / fname)
        c, _, _ = run_cnn(bundle, engine, s)
        p = ppxf_real[name]
        real.append({"galaxy": name, "z": z, "cnn": {k: float(c[k][0]) for k in MEANS}, "ppxf": p})
        lines.append(f"{name:8s} {z:7.4f} | {c['age_lw'][0]:10.2f} {p['age_lw']:11.2f} | {c['age_mw'][0]:10.2f} {p['age_mw']:11.2f} | "
                     f"{c['log_z_lw'][0]:8.2f} {p['log_z_lw']:9.2f}")
    png = None
    if not args.no_png:
        png = cube_map(bundle)
        lines += ["", f"mock cube mean-age map (truth | prediction): {png}"]
    lines += ["", f"simulation {sim_s:.0f} s; command: {command}"]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "accuracy_sfh.txt").write_text(text + "\n")
    (RESULTS / "accuracy_sfh.json").write_text(json.dumps({
        "bundle": bundle.id, "n": args.n, "seed": EVAL_SEEDS["bench"], "table": table, "paper": PAPER,
        "seconds_per_spectrum": {"ppxf": ppxf_s, "cnn_engine": cnn_engine_s, "cnn_with_preparation": cnn_all_s,
                                 "ratio": ratio, "ppxf_fits": len(ppxf_seconds)},
        "ppxf": {"regul": args.regul, "dust": "reddening (Calzetti)", "per_bin": args.ppxf_per_bin}, "real": real, "png": str(png) if png else None,
        "command": command}, indent=2))  # fmt: skip


def cube_map(bundle) -> Path:
    """A mock cube through `survey-infer run sfh`; its light-weighted mean-age map, truth | prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import zarr

    from survey_infer.cli import main as cli
    from training.mock_ifu import truth_cubes_path, write_mock_ifu

    with tempfile.TemporaryDirectory() as tmp:
        store = write_mock_ifu(Path(tmp) / "cube.zarr", 1, size=24, seed=EVAL_SEEDS["bench_cube"])
        out = Path(tmp) / "out"
        code = cli(["run", "sfh", "--input", str(store), "--output", str(out), "--bundle", str(bundle.path),
                    "--in-process", "--no-progress", "--no-catalog", "--engine", "onnxruntime"])  # fmt: skip
        if code != 0:
            raise RuntimeError(f"survey-infer run sfh exited {code}")
        pred = zarr.open_group(str(out / "sfh.zarr"), mode="r")["1"]
        truth = zarr.open_group(str(truth_cubes_path(store)), mode="r")["1"]
        maps = {k: (truth[k][:], pred[k][:]) for k in ("age_lw", "age_mw", "log_z_lw")}
    fig, axes = plt.subplots(2, 3, figsize=(11, 6.6))
    for col, (name, (t, p)) in enumerate(maps.items()):
        lo, hi = np.nanpercentile(np.concatenate([t.ravel(), p.ravel()]), [2, 98])
        for row, (label, img) in enumerate((("truth", t), ("CNN", p))):
            im = axes[row, col].imshow(img, origin="lower", vmin=lo, vmax=hi, cmap="viridis")
            axes[row, col].set_title(f"{name} {label}" + (f" (rms {np.sqrt(np.nanmean((p - t) ** 2)):.2f} dex)" if row else ""))
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            fig.colorbar(im, ax=axes[row, col], fraction=0.046)
    fig.suptitle(f"mock 24x24 cube (seed {EVAL_SEEDS['bench_cube']}): mean log age [yr] and log Z, truth vs {bundle.id}")
    fig.tight_layout()
    path = RESULTS / "sfh_age_map.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


if __name__ == "__main__":
    main()
