"""Does the trust score work? AUROC of ood_score per shift, error vs score, and the coverage of the errors.

    python bench/ood.py [--task mass_to_light,star_clusters] [--n 2000] [--n-shift 500] [--engine onnxruntime]

For each task's default shipped bundle (or ``--bundle``), through the run's path (task.prepare -> engine.run ->
task.postprocess, the bundle's trust description as a unit applies it):

- in-distribution: ``--n`` held-out mocks at the benches' reserved test seed (``EVAL_SEEDS['test']``: never
  trained on, not used by the trust fit, which has its own seeds);
- shifted inputs, ``--n-shift`` each: pure noise, blank sky (noise only), a single star (a point source through
  the PSF), and subtler ones made by the task's own simulator with other settings (seeing/PSF, noise level,
  distance range or field crowding) that keep their truth; for mass_to_light also real SDSS g-band stamps of
  the bright sources in ../shared/realdata/images_sdss_astropydata (skipped if absent; nothing is copied);
- per shift: AUROC of ood_score (in-distribution = 0, shifted = 1; sklearn.metrics.roc_auc_score) and the
  fraction flagged ``ood`` at the bundle's threshold (0.99 quantile of its held-out mocks: ~1% of
  in-distribution rows are flagged by construction);
- error vs score: RMSE of each output against truth in bins of ood_score, over the in-distribution and the
  subtly shifted mocks together;
- coverage of the +-1 err (68.27%) and +-1.96 err (95%) intervals on the in-distribution mocks, with the
  bundle's recalibrated scale and with the scale it had before (``trust.recalibration.previous_scale``).

Writes bench/results/ood.txt (the printed tables; --out to change), ood_<task>.png beside it (histograms of
the score per shift), and prints the exact command.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from survey_infer.bundle import Bundle, default_bundle_path, load_bundle
from survey_infer.engines import make_engine
from survey_infer.engines.base import INT8_ONNX_FILE
from survey_infer.flags import NO_ESTIMATE
from survey_infer.tasks import get_task
from survey_infer.trust import TRUST_KEY, load_trust
from training.trust import Z_68, Z_95, coverage, run_rows, simulate_in_distribution

RESULTS = Path(__file__).resolve().parent / "results" / "ood.txt"
SDSS_G = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "images_sdss_astropydata" / "reprojected_sdss_g.fits.bz2"
SHIFT_SEED = 940_000  # + k per shift: none of these is a training, validation, evaluation or trust seed


class Report:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


# ----------------------------------------------------------------------------------------- mass_to_light shifts
def _log_scaled(raw: np.ndarray) -> np.ndarray:
    from survey_infer.imaging import log_scale

    return log_scale(raw, np.ones(len(raw)))[:, None].astype(np.float32)


def _psf_image(size: int, fwhm_px: np.ndarray) -> np.ndarray:
    """The mocks' double-Gaussian seeing (core + 10% at twice the width), unit flux, centred, (n, size, size)."""
    yy, xx = np.indices((size, size)) - (size - 1) / 2
    r2 = (xx**2 + yy**2)[None]
    s2 = ((fwhm_px / 2.3548) ** 2)[:, None, None]
    psf = 0.9 * np.exp(-0.5 * r2 / s2) / (2 * np.pi * s2) + 0.1 * np.exp(-0.5 * r2 / (4 * s2)) / (8 * np.pi * s2)
    return psf


def mass_to_light_shifts(bundle: Bundle, n: int, rng: np.random.Generator) -> list[tuple[str, dict]]:
    """(label, sample) per shift; a sample holds images, columns and (for the simulated ones) truth."""
    from survey_infer.stamps import FOV_IN_HALF_LIGHT_RADII

    size = int(bundle.input_spec["image"]["shape"][-1])
    shifts = [
        ("noise: uniform random pixels in [-1, 1]", {"images": rng.uniform(-1, 1, (n, 1, size, size)).astype(np.float32)}),
        ("blank sky: Gaussian sky noise, no source (log-scaled)", {"images": _log_scaled(rng.normal(0, 1, (n, size, size)))}),
    ]
    # A star framed like a galaxy: its measured half-light radius is the PSF's (~FWHM/2), and the cutout is
    # FOV_IN_HALF_LIGHT_RADII of those across; peak S/N 10-1000 over unit sky noise.
    fwhm = np.full(n, 2 * size / FOV_IN_HALF_LIGHT_RADII) * rng.uniform(0.8, 1.2, n)
    psf = _psf_image(size, fwhm)
    peak_snr = 10 ** rng.uniform(1, 3, n)
    stars = psf / psf.max(axis=(1, 2), keepdims=True) * peak_snr[:, None, None] + rng.normal(0, 1, (n, size, size))
    shifts.append(("star framed by its own size (FOV = 10 x PSF half-width)", {"images": _log_scaled(stars)}))
    # A star in a frame sized for a galaxy (a catalogue size that is not the star's, a fixed-scale cutout):
    # a point source of FWHM 2-4 px.
    psf = _psf_image(size, rng.uniform(2.0, 4.0, n))
    stars = psf / psf.max(axis=(1, 2), keepdims=True) * peak_snr[:, None, None] + rng.normal(0, 1, (n, size, size))
    shifts.append(("star in a galaxy-sized frame (FWHM 2-4 px)", {"images": _log_scaled(stars)}))
    for k, (label, observing) in enumerate([
        ("seeing 2.6\" +- 0.3 (training 1.4\" +- 0.25)", {"seeing_fwhm_arcsec": (2.6, 0.3), "seeing_clip_arcsec": (2.0, 3.5)}),
        ("noise x3 (sky and Poisson sigma)", {"noise_scale": 3.0}),
        ("noise x1.5 (sky and Poisson sigma)", {"noise_scale": 1.5}),
        ("distance 400-650 Mpc (training 30-400)", {"distance_mpc": (400.0, 650.0)}),
    ], start=1):  # fmt: skip
        sim = simulate_in_distribution(bundle, n, SHIFT_SEED + k, **observing)
        shifts.append((f"subtle: {label}", {"images": sim.images, "columns": sim.columns, "truth": sim.truth}))
    real = real_sdss_stamps(size)
    if real is not None:
        shifts.append((f"real SDSS g stamps ({len(real)} bright sources of one field)", {"images": real}))
    return shifts


def real_sdss_stamps(size: int) -> np.ndarray | None:
    """The bright sources of the shared real SDSS g image, cut and scaled like the mocks; None if absent."""
    if not SDSS_G.is_file():
        print(f"real SDSS stamps skipped: {SDSS_G} is absent")
        return None
    from survey_infer.stamps import cut_stamp, find_bright_sources, prepare_stamp, read_fits_image, stamp_fov_px

    image, _ = read_fits_image(SDSS_G)
    stamps = [cut_stamp(image, (s.x, s.y), stamp_fov_px(s.r_half_px), size) for s in find_bright_sources(image, n_max=60)]
    stamps = [prepare_stamp(st) for st in stamps if np.isfinite(st).all()]
    return np.stack(stamps).astype(np.float32) if stamps else None


# ----------------------------------------------------------------------------------------- star_clusters shifts
def _cluster_renderer(bundle: Bundle, psf_scale: float = 1.0):
    from training.sim import clusters as sim

    render = sim.ClusterRenderer(tuple(bundle.input_spec["image"]["bands"]), int(bundle.input_spec["image"]["shape"][-1]))
    if psf_scale != 1.0:  # the same core + halo PSF, every width scaled
        scale = sim.PIXEL_SCALE_ARCSEC / sim.SUPERSAMPLE
        k = np.fft.fftfreq(render.n_super) * render.n_super
        r2 = k[:, None] ** 2 + k[None, :] ** 2
        out = []
        for band in render.bands:
            sig = psf_scale * sim.PSF_FWHM_ARCSEC[band] / 2.3548 / scale
            core, halo = np.exp(-0.5 * r2 / sig**2), np.exp(-0.5 * r2 / (sim.PSF_HALO_SCALE * sig) ** 2)
            out.append(np.fft.rfft2((1 - sim.PSF_HALO_FRACTION) * core / core.sum() + sim.PSF_HALO_FRACTION * halo / halo.sum()))
        render.psf = np.stack(out)
    return render


def _clusters(bundle: Bundle, n: int, seed: int, *, psf_scale=1.0, noise_scale=1.0, field_scale=1.0, cluster=True,
              field=True, star_mag=None) -> dict:  # fmt: skip
    """Mock clusters as training.sim.clusters.simulate_clusters makes them, with the shift's settings."""
    from training.sim import clusters as sim

    rng = np.random.default_rng(seed)
    render = _cluster_renderer(bundle, psf_scale)
    params = sim.draw_parameters(rng, n, render.table)
    size, nb = render.size, len(render.bands)
    noise = np.array([sim.noise_flux(b) for b in render.bands])
    images = np.empty((n, nb, size, size), dtype=np.float32)
    truth = {"log_age": params["log_age"].copy(), "log_mass": np.full(n, np.nan), "log_rh": params["log_rh"].copy()}
    for i in range(n):
        canvas = np.zeros((nb, render.n_super, render.n_super))
        if field:
            render.field(canvas, rng, float(params["field_sigma"][i]) * field_scale, float(params["field_av"][i]))
        if cluster:
            info = render.cluster(canvas, rng, float(params["log_age"][i]), float(params["log_mass_target"][i]),
                                  float(10 ** params["log_rh"][i]), float(params["eff_gamma"][i]), float(params["av"][i]),
                                  (float(params["centre_x"][i]), float(params["centre_y"][i])))  # fmt: skip
            truth["log_mass"][i] = info["log_mass"]
        if star_mag is not None:  # one star of this F814W-like magnitude with an old-star colour, at the centre
            flux = 10 ** (-0.4 * (rng.uniform(*star_mag) + np.array([2.5, 1.2, 0.0])[:nb] - sim.FLUX_ZERO_POINT))
            render.deposit(canvas, np.zeros(1), np.zeros(1), flux[None])
        images[i] = render.observe(canvas, rng)
        if noise_scale != 1.0:  # more noise: add the missing variance (sky + read noise level)
            images[i] += (rng.normal(0, 1, (nb, size, size)) * noise[:, None, None] * np.sqrt(noise_scale**2 - 1)).astype(np.float32)
    sample = {"images": images}
    if cluster:
        sample["truth"] = truth
    return sample


def star_clusters_shifts(bundle: Bundle, n: int, rng: np.random.Generator) -> list[tuple[str, dict]]:
    from training.sim import clusters as sim

    size, nb = int(bundle.input_spec["image"]["shape"][-1]), int(bundle.input_spec["image"]["shape"][0])
    noise = np.array([sim.noise_flux(b) for b in bundle.input_spec["image"]["bands"]])
    s = SHIFT_SEED + 100
    return [
        ("noise: Gaussian pixels, 10x the sky noise", {"images": (rng.normal(0, 1, (n, nb, size, size)) * 10 * noise[:, None, None]).astype(np.float32)}),
        ("blank sky: sky + read noise only, no field, no cluster", _clusters(bundle, n, s + 1, cluster=False, field=False)),
        ("star: one bright star (F814W 18-22 mag) on sky, no field", _clusters(bundle, n, s + 2, cluster=False, field=False, star_mag=(18, 22))),
        ("field only: a crowded field without a cluster", _clusters(bundle, n, s + 3, cluster=False)),
        ("subtle: field crowding x5 (3-60 -> 15-300 Msun/pc^2)", _clusters(bundle, n, s + 4, field_scale=5.0)),
        ("subtle: PSF x2 wider (all bands)", _clusters(bundle, n, s + 5, psf_scale=2.0)),
        ("subtle: noise x3 (sky + read noise level)", _clusters(bundle, n, s + 6, noise_scale=3.0)),
    ]  # fmt: skip


SHIFTS = {"mass_to_light": mass_to_light_shifts, "star_clusters": star_clusters_shifts}


# ----------------------------------------------------------------------------------------- the bench
def _scores(bundle, engine, sample: dict) -> tuple[np.ndarray, dict]:
    trust = load_trust(bundle)
    out = run_rows(bundle, sample["images"], sample.get("columns", {}), engine_obj=engine)
    score = trust.score(out["features"])
    score[(out["flag"] & NO_ESTIMATE) != 0] = np.nan
    return score, out


def _targets(bundle: Bundle) -> list[str]:
    names = [c.name for c in get_task(bundle.task).output_columns(bundle)]
    return [n for n in names if f"{n}_err" in names]


def bench_task(task: str, bundle: Bundle, args, report: Report) -> None:
    from training.train import EVAL_SEEDS as ML_EVAL_SEEDS
    from training.train_star_clusters import EVAL_SEEDS as SC_EVAL_SEEDS

    if load_trust(bundle) is None:
        report(f"{bundle.id}: no trust description (run `survey-infer trust {bundle.path}`); skipped")
        return
    section = bundle.meta[TRUST_KEY]
    engine = make_engine(args.engine, bundle, threads=args.threads)
    seed = {"mass_to_light": ML_EVAL_SEEDS, "star_clusters": SC_EVAL_SEEDS}[task]["test"]
    tick = time.time()
    sample = simulate_in_distribution(bundle, args.n, seed)
    s_in, out_in = _scores(bundle, engine, {"images": sample.images, "columns": sample.columns})
    threshold = float(section["threshold"])
    report(f"\n== {task}: bundle {bundle.id}; in-distribution: {args.n} held-out mocks, seed {seed} "
           f"({time.time() - tick:.0f} s); threshold {threshold:.4g} (quantile {section['threshold_quantile']} of the trust "
           f"fit's held-out mocks, seeds {section['mocks']['seeds']})")  # fmt: skip
    ok_in = np.isfinite(s_in)
    report(f"in-distribution rows flagged ood: {np.mean(s_in[ok_in] > threshold):.3f} (nominal 0.010); score median "
           f"{np.median(s_in[ok_in]):.2f}, 99th pct {np.quantile(s_in[ok_in], 0.99):.2f}")  # fmt: skip

    if INT8_ONNX_FILE in bundle.meta["files"]:  # the fp32 threshold serves int8 runs too: how well?
        int8 = make_engine("onnxruntime", bundle, threads=args.threads, precision="int8")
        s8, _ = _scores(bundle, int8, {"images": sample.images, "columns": sample.columns})
        ok8 = ok_in & np.isfinite(s8)
        report(f"--precision int8 on the same mocks: flagged ood {np.mean(s8[ok8] > threshold):.3f}; |score int8 - fp32| "
               f"median {np.median(np.abs(s8 - s_in)[ok8]):.2f}, 99th pct {np.quantile(np.abs(s8 - s_in)[ok8], 0.99):.2f}")  # fmt: skip

    rng = np.random.default_rng(SHIFT_SEED)
    header = f"{'shift':<62} {'n':>5} {'AUROC':>6} {'flagged':>8} {'median score':>12}"
    report(f"\n{header}\n{'-' * len(header)}")
    binned = [(s_in, out_in, sample.truth)]
    hists = [("in-distribution", s_in[ok_in])]
    for label, shift in SHIFTS[task](bundle, args.n_shift, rng):
        score, out = _scores(bundle, engine, shift)
        ok = np.isfinite(score)
        if not ok.any():
            report(f"{label:<62} {len(score):5d} {'-':>6} {'-':>8} {'no estimate':>12}")
            continue
        y = np.r_[np.zeros(ok_in.sum()), np.ones(ok.sum())]
        auroc = roc_auc_score(y, np.r_[s_in[ok_in], score[ok]])
        report(f"{label:<62} {int(ok.sum()):5d} {auroc:6.3f} {np.mean(score[ok] > threshold):8.3f} {np.median(score[ok]):12.2f}")
        hists.append((label.removeprefix("subtle: ")[:48], score[ok]))
        if "truth" in shift:
            binned.append((score, out, shift["truth"]))
    report("(constant or NaN cutouts never reach the network: flagged empty_cutout / nan_pixels, no estimate, null score)")

    report("\nerror vs ood_score (in-distribution + subtly shifted mocks with truth), RMSE per output; bins of score")
    scores = np.concatenate([b[0] for b in binned])
    edges = [0.0, *np.quantile(s_in[ok_in], [0.5, 0.9, 0.99]), 1.5 * threshold, 2.5 * threshold, np.inf]
    targets = _targets(bundle)
    header = f"{'ood_score bin':<20} {'n':>6} " + " ".join(f"{t + ' RMSE':>14}" for t in targets)
    report(f"{header}\n{'-' * len(header)}")
    errors = {t: np.concatenate([b[1][t].astype(np.float64) - np.asarray(b[2][t], dtype=np.float64) for b in binned]) for t in targets}
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = np.isfinite(scores) & (scores >= lo) & (scores < hi)
        cells = " ".join(f"{np.sqrt(np.nanmean(errors[t][sel] ** 2)) if sel.sum() else np.nan:14.3f}" for t in targets)
        report(f"[{lo:7.2f}, {hi:7.2f}) {int(sel.sum()):6d} {cells}")

    _plot(task, bundle, hists, threshold, args.out.with_name(f"ood_{task}.png"))
    report(f"\ncoverage on the {args.n} in-distribution held-out mocks (nominal 0.683 and 0.950): raw = the network's "
           "sigma (scale 1); before = the scale the bundle had from training; now = after `survey-infer trust`")
    header = (f"{'output':<10} {'raw 68%':>7} {'raw 95%':>7} {'scale before':>12} {'68% before':>10} {'95% before':>10} "
              f"{'scale now':>10} {'68% now':>8} {'95% now':>8}")  # fmt: skip
    report(f"{header}\n{'-' * len(header)}")
    recal = section.get("recalibration", {}).get("outputs", {})
    for t in targets:
        residual = out_in[t].astype(np.float64) - np.asarray(sample.truth[t], dtype=np.float64)
        err = out_in[f"{t}_err"].astype(np.float64)
        now = float(bundle.output_spec.get(f"{t}_err", {}).get("scale", 1.0))
        before = float(recal.get(t, {}).get("previous_scale", now))
        old, raw = err * before / now, err / now
        report(f"{t:<10} {coverage(residual, raw, Z_68):7.3f} {coverage(residual, raw, Z_95):7.3f} {before:12.4f} {coverage(residual, old, Z_68):10.3f} {coverage(residual, old, Z_95):10.3f} "
               f"{now:10.4f} {coverage(residual, err, Z_68):8.3f} {coverage(residual, err, Z_95):8.3f}")  # fmt: skip


def _plot(task: str, bundle: Bundle, hists: list[tuple[str, np.ndarray]], threshold: float, path: Path) -> None:
    """Histograms of log10 ood_score: in-distribution and every shift, with the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.8))
    bins = np.linspace(np.log10(min(h.min() for _, h in hists if len(h))), np.log10(max(h.max() for _, h in hists if len(h))), 60)
    for label, values in hists:
        ax.hist(np.log10(values), bins=bins, density=True, histtype="step", lw=2.5 if label == "in-distribution" else 1.2,
                label=f"{label} (n={len(values)})")  # fmt: skip
    ax.axvline(np.log10(threshold), color="k", ls="--", label="threshold (0.99 quantile)")
    ax.set_xlabel("log10 ood_score")
    ax.set_ylabel("density")
    ax.set_title(f"{task}: {bundle.id}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="trust: ood_score AUROC per shift, error vs score, coverage")
    parser.add_argument("--task", default="mass_to_light,star_clusters")
    parser.add_argument("--bundle", type=Path, action="append", help="bundle directory per task (default: shipped)")
    parser.add_argument("--n", type=int, default=2000, help="in-distribution held-out mocks")
    parser.add_argument("--n-shift", type=int, default=500, help="rows per shift")
    parser.add_argument("--engine", default="onnxruntime")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = Report()
    report("command: " + shlex.join(["python", "bench/ood.py", *(sys.argv[1:] if argv is None else argv)]))
    bundles = {load_bundle(p).task: load_bundle(p) for p in args.bundle or []}
    tick = time.time()
    for task in args.task.split(","):
        bundle = bundles.get(task) or load_bundle(default_bundle_path(task), task=task)
        bench_task(task, bundle, args, report)
    report(f"\n({time.time() - tick:.0f} s; AUROC: in-distribution = 0, shifted = 1, sklearn.metrics.roc_auc_score; flagged: "
           "fraction above the bundle's threshold)")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(report.lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
