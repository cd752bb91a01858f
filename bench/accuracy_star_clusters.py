"""Accuracy of the star_clusters bundle on held-out mock clusters, beside the classical SSP-fitting baseline.

Held-out clusters come from the seed reserved for evaluation (``training.train_star_clusters.EVAL_SEEDS``),
never trained on. The CNN runs through the task's own prepare/postprocess (as the pipeline does) on PyTorch
float32; the baseline is ``training.cluster_report``'s aperture photometry + chi^2 fit against fully sampled
SSPs from the same isochrones. Printed and saved (``bench/results/accuracy_star_clusters.{txt,json,png}`` and
``star_clusters_grid.png``): bias (median and mean, with the mean's standard error) and scatter (1.4826 MAD,
RMSE) of log age, log mass and log r_h per bin of true age and true mass, then the verdict on the paper's
validity range (age < 3 Gyr, 250 - 4000 Msun)::

    python bench/accuracy_star_clusters.py [--n 3000] [--bundle DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from survey_infer.bundle import default_bundle_path, load_bundle
from survey_infer.tasks import get_task
from training import cluster_report as cr
from training.sim import clusters as sim
from training.train_star_clusters import EVAL_SEEDS

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ("log_age", "log_mass", "log_rh")
BIAS_TOLERANCE_DEX = 0.05  # a bin's mean bias is "not significant" if within 3 standard errors or this


def cnn_estimates(bundle, images: np.ndarray) -> dict[str, np.ndarray]:
    """The task's catalogue columns for ``images`` (prepare -> torch float32 -> postprocess)."""
    task = get_task(bundle.task)
    model = bundle.build_torch_model()
    out: dict[str, list] = {}
    with torch.inference_mode():
        for start in range(0, len(images), 256):
            batch = images[start : start + 256]
            inputs, flags = task.prepare(batch, {}, bundle)
            mean, log_var = model(torch.from_numpy(inputs["image"]))[:2]  # a trust bundle also returns features
            cols = task.postprocess({"params": mean.numpy(), "params_logvar": log_var.numpy()}, {}, flags, bundle)
            for k, v in cols.items():
                out.setdefault(k, []).append(v)
    return {k: np.concatenate(v).astype(np.float64) for k, v in out.items()}


def verdict(rows: list[dict], truth: dict, cnn: dict, base: dict, common: np.ndarray) -> list[str]:
    """The issue's claims on the validity range, checked bin by bin."""
    lines = []
    valid = cr.valid_range_mask(truth)
    sub_truth = {k: np.asarray(v)[valid & common] for k, v in truth.items()}
    for target in ("log_age", "log_mass", "log_rh"):
        sub = {"cnn": {target: cnn[target][valid & common]}}
        if target in base:
            sub["ssp_fit"] = {target: base[target][valid & common]}
        bins = cr.binned_table(sub_truth, sub, (target,))
        for r in bins:
            if r["bin_of"] == "all" or r["method"] != "cnn":
                continue
            lo, hi = (float(v) for v in r["bin"].strip("[)").split(","))
            v_lo, v_hi = cr.VALID[r["bin_of"]]
            if lo < v_lo - 0.011 or hi > v_hi + 0.011:  # only bins inside the validity range
                continue
            ok_bias = abs(r["mean_bias"]) <= max(3 * r["bias_se"], BIAS_TOLERANCE_DEX)
            other = next((b for b in bins if b["method"] == "ssp_fit" and b["bin_of"] == r["bin_of"] and b["bin"] == r["bin"]), None)
            beat = "" if other is None else (f"; baseline mean bias {other['mean_bias']:+.3f}, rmse {other['rmse']:.3f} -> CNN "
                                             f"{'better' if r['rmse'] < other['rmse'] else 'NOT better'}")  # fmt: skip
            lines.append(f"{target:9s} {r['bin_of']:9s}{r['bin']:16s} n={r['n']:4d} CNN mean bias {r['mean_bias']:+.3f} "
                         f"+- {r['bias_se']:.3f} -> {'bias ok' if ok_bias else 'BIAS beyond tolerance'}; "
                         f"CNN rmse {r['rmse']:.3f}{beat}")  # fmt: skip
    return lines


def scatter_plot(truth: dict, cnn: dict, base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 8.5))
    for col, target in enumerate(TARGETS):
        for row, (name, est) in enumerate((("CNN", cnn), ("SSP fit (baseline)", base))):
            ax = axes[row, col]
            if target not in est:
                ax.text(0.5, 0.5, "baseline takes the true r_h\n(no estimate)", ha="center", va="center",
                        transform=ax.transAxes)  # fmt: skip
                ax.set_axis_off()
                continue
            t, e = np.asarray(truth[target]), np.asarray(est[target])
            ax.scatter(t, e, s=3, alpha=0.3, c=np.asarray(truth["log_mass"]), cmap="viridis")
            lo, hi = np.nanmin(t) - 0.3, np.nanmax(t) + 0.3
            ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ax.set_xlabel(f"true {target}")
            ax.set_ylabel(f"{name} {target}")
            ax.set_title(f"{name}: {target} (colour = true log mass)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="held-out mock clusters")
    parser.add_argument("--bundle", type=Path, default=None, help="bundle directory (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle or default_bundle_path("star_clusters"), task="star_clusters")
    bands = tuple(bundle.input_spec["image"]["bands"])
    tick = time.time()
    mocks = sim.simulate_clusters(args.n, seed=EVAL_SEEDS["test"], first_id=900_000_000, bands=bands)
    t_sim = time.time() - tick
    tick = time.time()
    cnn = cnn_estimates(bundle, mocks.images)
    t_cnn = time.time() - tick
    tick = time.time()
    mags, errs = cr.aperture_photometry(mocks.images, mocks.truth, bands)
    base = cr.SSPFitter(bands).fit(mags, errs)
    t_base = time.time() - tick
    truth = mocks.truth
    common = np.isfinite(base["log_age"]) & np.isfinite(cnn["log_age"])

    header = [
        f"star_clusters accuracy: {args.n} held-out mock clusters (seed {EVAL_SEEDS['test']}), bundle {bundle.id}",
        f"baseline (SSP fit of aperture photometry) gave no estimate for {int((~np.isfinite(base['log_age'])).sum())} "
        f"clusters (no positive flux in >= 2 bands); the tables below use the {int(common.sum())} clusters both methods "
        "estimated",
        "errors = estimate - truth [dex]; scatter = 1.4826 x MAD; bias_se = std / sqrt(n) of the mean bias",
        f"timings: simulate {t_sim:.0f} s, CNN (torch, {args.threads} thread{'s' * (args.threads > 1)}) {t_cnn:.1f} s, "
        f"baseline {t_base:.1f} s",
    ]
    sel = {k: np.asarray(v)[common] for k, v in truth.items()}
    estimates = {"cnn": {k: cnn[k][common] for k in TARGETS},
                 "ssp_fit": {k: base[k][common] for k in ("log_age", "log_mass")}}  # fmt: skip
    rows = cr.binned_table(sel, estimates, TARGETS)
    coverage = {t: float(np.mean(np.abs(cnn[t] - truth[t]) < cnn[f"{t}_err"])) for t in TARGETS}
    coverage95 = {t: float(np.mean(np.abs(cnn[t] - truth[t]) < 1.959964 * cnn[f"{t}_err"])) for t in TARGETS}
    cov_base = {t: float(np.nanmean(np.abs(base[t] - truth[t])[common] < base[f"{t}_err"][common])) for t in ("log_age", "log_mass")}
    valid_lines = verdict(rows, truth, cnn, base, common)
    text = "\n".join(header) + "\n\n" + cr.format_table(rows) + "\n\n"
    text += "fraction within the quoted 1 sigma: CNN " + ", ".join(f"{t} {v:.2f}" for t, v in coverage.items())
    text += "; baseline " + ", ".join(f"{t} {v:.2f}" for t, v in cov_base.items()) + "\n"
    text += "fraction within the quoted 1.96 sigma (95% nominal): CNN " + ", ".join(f"{t} {v:.2f}" for t, v in coverage95.items()) + "\n\n"
    text += ("validity range (age < 3 Gyr, 250 - 4000 Msun), per bin, CNN vs baseline; 'bias ok' means |mean bias| "
             f"<= max(3 x its standard error, {BIAS_TOLERANCE_DEX} dex):\n") + "\n".join(valid_lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accuracy_star_clusters.txt").write_text(text)
    (args.out / "accuracy_star_clusters.json").write_text(json.dumps(
        {"bundle": bundle.id, "n": args.n, "seed": EVAL_SEEDS["test"], "rows": rows, "coverage_cnn": coverage, "coverage95_cnn": coverage95,
         "coverage_baseline": cov_base, "validity_checks": valid_lines}, indent=1))  # fmt: skip
    scatter_plot(truth, cnn, base, args.out / "accuracy_star_clusters.png")
    cr.plot_grid(mocks.images, truth, cnn, args.out / "star_clusters_grid.png", baseline=base, bands=bands)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
