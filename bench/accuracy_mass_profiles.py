"""Accuracy of mass_profiles on held-out mock galaxies, beside the five literature mass estimators.

On ``--n`` held-out galaxies (reserved seed ``EVAL_SEEDS["test"]`` of ``training.train_mass_profiles``, never
trained on; one projection each; every family of the training grid):

1. per radius f R_h (f = 0.6 ... 2.4): the ratio M_pred / M_true of the posterior median, its median and
   16th-84th percentiles over the galaxies, and the 68% posterior interval's coverage;
2. each literature estimator M = C <sigma_los^2> R_h / G at its own radius, computed here on the same stars
   with the same R_h (the stars' median projected radius) and the same error-corrected sigma_los^2 as the task,
   against the true M(<r) from the potential at that radius; the CNN's posterior median there, interpolated
   between its radii in (log f, log M); "beats" = a narrower 16-84 ratio range and a median no farther from 1;
3. TARP coverage (the ``tarp`` package, random references, normalised, 100 bootstraps) of the joint 10-D
   posteriors (``--samples`` per galaxy), the curve saved to ``bench/results/tarp_mass_profiles.png``;
4. with ``--shift``: the domain-shift table. For each family, a small model is trained on the two other
   families (``--shift-n-cnn`` galaxies x 4 projections, ``--shift-epochs`` epochs) and tested on held-out
   galaxies of the left-out family and of its own two families (seed ``EVAL_SEEDS["test_shift"]``).

Runs the CNN through ONNX Runtime (the bundle's model.onnx, as a run does) and the flow in torch. Writes
``bench/results/accuracy_mass_profiles.txt`` and prints the table and the exact command.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from survey_infer.bundle import default_bundle_path, load_bundle
from survey_infer.engines import make_engine
from survey_infer.tasks.mass_profiles import G_KPC_KMS2_MSUN, RADII_F, SIGMA2_FLOOR, sample_posterior
from training.sim import kinematics as sim
from training.train_mass_profiles import EVAL_SEEDS, FIRST_ID, projections_to_arrays, train_mass_profiles

RESULTS = Path(__file__).resolve().parent / "results"
ESTIMATORS = (  # name, C, radius in units of R_h
    ("Walker et al. 2009", 2.5, 1.0),
    ("Wolf et al. 2010", 4.0, 4.0 / 3.0),
    ("Amorisco & Evans 2012", 5.8, 1.7),
    ("Campbell et al. 2017", 6.0, 1.8),
    ("Errani et al. 2018", 3.5 * 1.8, 1.8),
)


def test_set(halos, n: int, seed: int):
    projections = sim.simulate_split(halos, n, seed, 1, FIRST_ID["test"])
    inputs, targets, truth = projections_to_arrays(projections)
    return projections, inputs, targets, truth


def predict(bundle, inputs, n_samples: int, engine_name: str = "onnxruntime", seed: int = 0):
    """CNN point estimates (engine) and flow posterior samples (torch): (n, 10), (n, S, 10)."""
    engine = make_engine(engine_name, bundle, threads=torch.get_num_threads())
    log_mass, features = [], []
    for s in range(0, len(inputs["scalars"]), 256):
        out = engine.run({k: v[s : s + 256] for k, v in inputs.items()})
        log_mass.append(out["log_mass"])
        features.append(out["features"])
    log_mass, features = np.concatenate(log_mass), np.concatenate(features)
    model = bundle.build_torch_model()
    samples = np.concatenate([sample_posterior(model, features[s : s + 256], log_mass[s : s + 256], n_samples, seed=seed + s)
                              for s in range(0, len(log_mass), 256)])  # fmt: skip
    return log_mass, samples


def ratio_stats(log_ratio: np.ndarray) -> tuple[float, float, float]:
    """Median, 16th and 84th percentiles of M_pred / M_true."""
    p16, p50, p84 = np.percentile(log_ratio, [15.865, 50, 84.135])
    return 10**p50, 10**p16, 10**p84


def sigma2_of(projections) -> np.ndarray:
    out = []
    for p in projections:
        var = np.var(p.v_los, ddof=1)
        out.append(max(var - np.mean(p.v_err**2), SIGMA2_FLOOR * var))
    return np.asarray(out)


def interpolate_log_mass(log_m: np.ndarray, f: float) -> np.ndarray:
    """log M at f R_h from the 10 radii (linear in log f)."""
    lf = np.log(RADII_F)
    return np.array([np.interp(np.log(f), lf, row) for row in log_m])


def tarp_coverage(samples: np.ndarray, theta: np.ndarray, png: Path, title: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tarp

    ecp, alpha = tarp.get_tarp_coverage(np.transpose(samples, (1, 0, 2)), theta, references="random",
                                        metric="euclidean", norm=True, bootstrap=True, num_bootstrap=100, seed=5)  # fmt: skip
    mean, std = ecp.mean(axis=0), ecp.std(axis=0)
    inside_1s = float(np.mean(np.abs(mean - alpha) <= std + 1e-12))
    inside_3s = float(np.mean(np.abs(mean - alpha) <= 3 * std + 1e-12))
    # The expected band of a calibrated posterior: the coverage of n independent galaxies at level alpha is
    # binomial, std sqrt(alpha (1 - alpha) / n) (tarp's bootstrap std is far narrower: it keeps the galaxies).
    n = theta.shape[0]
    binom = np.sqrt(alpha * (1 - alpha) / n)
    inside_b2 = float(np.mean(np.abs(mean - alpha) <= 2 * binom + 1e-12))
    inside_b3 = float(np.mean(np.abs(mean - alpha) <= 3 * binom + 1e-12))
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
    ax.fill_between(alpha, alpha - 2 * binom, alpha + 2 * binom, color="0.6", alpha=0.4,
                    label=f"expected band: 2 sigma binomial, n={n}")
    ax.plot(alpha, mean, color="C0", label="TARP (mean of 100 bootstraps)")
    ax.fill_between(alpha, mean - 3 * std, mean + 3 * std, color="C0", alpha=0.3, label="3 sigma bootstrap")
    ax.set_xlabel("credibility level alpha")
    ax.set_ylabel("expected coverage probability")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return {"max_abs_dev": float(np.max(np.abs(mean - alpha))), "frac_alpha_within_1sigma": inside_1s,
            "frac_alpha_within_3sigma": inside_3s, "frac_within_2sigma_binomial": inside_b2,
            "frac_within_3sigma_binomial": inside_b3, "png": str(png)}  # fmt: skip


def accuracy_table(projections, targets, truth, log_mass_cnn, samples, halos_by_label) -> tuple[list[str], dict]:
    lines = []
    p16, p50, p84 = np.percentile(samples, [15.865, 50, 84.135], axis=1)
    lines.append(f"{'radius':>8} {'median ratio':>12} {'16%':>7} {'84%':>7} {'width dex':>9} {'68% cov':>8}")
    per_radius = {}
    for k, f in enumerate(RADII_F):
        lr = p50[:, k] - targets[:, k]
        med, lo, hi = ratio_stats(lr)
        cov = float(np.mean((targets[:, k] > p16[:, k]) & (targets[:, k] < p84[:, k])))
        per_radius[f] = (med, lo, hi, cov)
        lines.append(f"{f:>6.1f}Rh {med:>12.3f} {lo:>7.3f} {hi:>7.3f} {np.log10(hi / lo) / 2:>9.3f} {cov:>8.3f}")
    lines.append("")
    lines.append("Literature estimators at their radii, on the same stars (ratio M / M_true: median [16%, 84%]):")
    lines.append(f"{'estimator':<24} {'C':>5} {'r/R_h':>6} {'estimator':>24} {'CNN (posterior median)':>24}  beats")
    sigma2 = sigma2_of(projections)
    r_half = truth["r_half_kpc"]
    results = {}
    for name, c, f in ESTIMATORS:
        true = np.array([sim.true_log_mass(halos_by_label[lab], {k: truth[k][i] for k in ("halo_scale_kpc", "mass_unit_msun")},
                                           np.array([f * r_half[i]]))[0] for i, lab in enumerate(truth["halo_label"])])  # fmt: skip
        est = np.log10(c * sigma2 * r_half / G_KPC_KMS2_MSUN)
        cnn = interpolate_log_mass(p50, f)
        e, n = ratio_stats(est - true), ratio_stats(cnn - true)
        width_e, width_n = np.log10(e[2] / e[1]), np.log10(n[2] / n[1])
        beats = width_n < width_e and abs(np.log10(n[0])) <= abs(np.log10(e[0])) + 0.01
        results[name] = {"estimator": e, "cnn": n, "beats": bool(beats)}
        lines.append(f"{name:<24} {c:>5.2f} {f:>6.2f} {e[0]:>8.3f} [{e[1]:.3f}, {e[2]:.3f}] {n[0]:>8.3f} [{n[1]:.3f}, "
                     f"{n[2]:.3f}]  {'yes' if beats else 'NO'}")  # fmt: skip
    return lines, {"per_radius": per_radius, "estimators": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--n", type=int, default=1500, help="held-out galaxies (default 1500)")
    parser.add_argument("--samples", type=int, default=500, help="posterior samples per galaxy for TARP (default 500)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shift", action="store_true", help="also train the leave-one-family-out models")
    parser.add_argument("--shift-n-cnn", type=int, default=1500)
    parser.add_argument("--shift-n-flow", type=int, default=2000)
    parser.add_argument("--shift-epochs", type=int, default=12)
    parser.add_argument("--shift-n", type=int, default=600, help="test galaxies per shift test set (default 600)")
    parser.add_argument("--output", type=Path, default=RESULTS / "accuracy_mass_profiles.txt")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    command = "python bench/accuracy_mass_profiles.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = time.time()
    bundle = load_bundle(args.bundle or default_bundle_path("mass_profiles"), task="mass_profiles")
    halos = sim.build_grid(sim.FAMILIES, seed=bundle.meta["training"]["seeds"]["grid"])
    by_label = {h.label: h for h in halos}
    grid_s = time.time() - started
    projections, inputs, targets, truth = test_set(halos, args.n, EVAL_SEEDS["test"])
    log_mass, samples = predict(bundle, inputs, args.samples)
    lines = [f"# {command}", f"bundle {bundle.id}; {args.n} held-out galaxies (seed {EVAL_SEEDS['test']}), one projection "
             f"each, families {', '.join(sim.FAMILIES)}; {args.samples} posterior samples each; CNN via ONNX Runtime, "
             f"flow in torch; DF grid built in {grid_s:.0f} s", "",
             "Posterior median vs truth, M_pred / M_true per radius r = f R_h (R_h = median projected radius of the stars):"]  # fmt: skip
    table, stats = accuracy_table(projections, targets, truth, log_mass, samples, by_label)
    lines += table
    png = RESULTS / "tarp_mass_profiles.png"
    tarp_stats = tarp_coverage(samples, targets, png, f"{bundle.id}: {args.n} held-out galaxies")
    lines += ["", f"TARP (10-D joint posterior, random references, normalised, 100 bootstraps): max |ECP - alpha| = "
              f"{tarp_stats['max_abs_dev']:.3f}; share of alpha bins whose ECP lies within the expected (binomial, "
              f"n={args.n}) band of the diagonal: {tarp_stats['frac_within_2sigma_binomial']:.2f} within 2 sigma, "
              f"{tarp_stats['frac_within_3sigma_binomial']:.2f} within 3 sigma; within tarp's own bootstrap std: "
              f"{tarp_stats['frac_alpha_within_1sigma']:.2f} (1 sigma), {tarp_stats['frac_alpha_within_3sigma']:.2f} (3 sigma); "
              f"curve: {png.relative_to(RESULTS.parent.parent)}"]  # fmt: skip
    by_family = {fam: np.flatnonzero(truth["family"] == fam) for fam in sim.FAMILIES}
    lines += ["", "Per family (all-family model), median ratio [16%, 84%] at 0.6, 1.0, 1.8, 2.4 R_h:"]
    p50 = np.percentile(samples, 50, axis=1)
    for fam, idx in by_family.items():
        cells = [ratio_stats(p50[idx, RADII_F.index(f)] - targets[idx, RADII_F.index(f)]) for f in (0.6, 1.0, 1.8, 2.4)]
        lines.append(f"  {fam:<8} n={len(idx):<5} " + "  ".join(f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in cells))

    print("\n".join(lines), flush=True)
    if args.shift:
        lines += ["", f"Domain shift: trained on two families ({args.shift_n_cnn} galaxies x 4 projections, "
                  f"{args.shift_epochs} epochs, flow on {args.shift_n_flow}), tested on {args.shift_n} held-out galaxies of "
                  "the left-out family and of its own families; median ratio [16%, 84%], 68% coverage:"]  # fmt: skip
        lines.append(f"{'left out':<9} {'test on':<14} {'0.6 R_h':>26} {'1.0 R_h':>26} {'1.8 R_h':>26} {'2.4 R_h':>26}")
        with tempfile.TemporaryDirectory() as tmp:
            for left_out in sim.FAMILIES:
                kept = tuple(f for f in sim.FAMILIES if f != left_out)
                tick = time.time()
                shift_dir = train_mass_profiles(Path(tmp), n_cnn=args.shift_n_cnn, n_flow=args.shift_n_flow, n_val=300,
                                                projections=4, epochs=args.shift_epochs, flow_epochs=40, families=kept,
                                                name=f"no-{left_out}", halos=halos, threads=args.threads)  # fmt: skip
                from deploy.export import export_onnx

                export_onnx(shift_dir)
                shift_bundle = load_bundle(shift_dir)
                train_s = time.time() - tick
                for label, fams in ((f"{left_out} (out)", (left_out,)), ("+".join(kept) + " (in)", kept)):
                    test_halos = [h for h in halos if h.family in fams]
                    projs, x, y, _ = test_set(test_halos, args.shift_n, EVAL_SEEDS["test_shift"])
                    _, s = predict(shift_bundle, x, 200)
                    med = np.percentile(s, 50, axis=1)
                    lo16, hi84 = np.percentile(s, [15.865, 84.135], axis=1)
                    cells = []
                    for f in (0.6, 1.0, 1.8, 2.4):
                        k = RADII_F.index(f)
                        m, lo, hi = ratio_stats(med[:, k] - y[:, k])
                        cov = np.mean((y[:, k] > lo16[:, k]) & (y[:, k] < hi84[:, k]))
                        cells.append(f"{m:.3f} [{lo:.3f},{hi:.3f}] {cov:.2f}")
                    lines.append(f"{left_out:<9} {label:<14} " + " ".join(f"{c:>26}" for c in cells))
                lines.append(f"{'':<9} (trained in {train_s:.0f} s)")
        lines.append("Reference, the all-family bundle on the same left-out family is the per-family table above.")
    lines += ["", f"total {time.time() - started:.0f} s"]
    text = "\n".join(lines) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    print(f"command: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
