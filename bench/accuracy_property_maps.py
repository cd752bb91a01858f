"""property_maps accuracy on held-out mocks: per-map bias and scatter (dex) beside PICASSSO and a colour-M/L
baseline; band and resolution ablations; a PNG of true vs predicted maps.

The metric is the paper's: delta = log true - log predicted per pixel, over pixels that are non-empty in the
truth and lie inside the ellipse of 2 half-mass radii fitted to the true stellar-mass map
(training.mock_property_maps.half_mass_ellipse_mask); bias = mean(delta), scatter = std(delta). The network's
raw map is scored (its empty-pixel head is scored separately, as the share of pixels classified right).

Baseline (stellar mass only): the per-pixel colour-M/L method: log(Sigma*/Sigma_L,i) = a + b (g - i), fitted
by least squares on the pixels of *training* mocks (training seeds), applied to each observed pixel's g - i
colour and i-band surface brightness. Pixels where g or i flux is <= 0 (noise) have no colour: the baseline is
scored on the pixels where it has an estimate (which favours it) and that share is printed.

Ablations (``--ablation-dir``, bundles trained by training.train_property_maps with the same short recipe:
1,500 mocks, 4 epochs; much less than the shipped bundle): ugriz vs gri vs r at 64 px, 64 vs 32 px (ugriz),
each scored on the same held-out galaxies (re-simulated at its resolution).

    python bench/accuracy_property_maps.py [--n 2000] [--bundle DIR] [--ablation-dir DIR] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safetensors.torch import load_file  # noqa: E402

from survey_infer.bundle import default_bundle_path, load_bundle  # noqa: E402
from survey_infer.models import build_model  # noqa: E402
from survey_infer.imaging import asinh_transform  # noqa: E402
from survey_infer.tasks.property_maps import MAP_NAMES, TASK  # noqa: E402
from training.mock_property_maps import BANDS, half_mass_ellipse_mask, simulate_block  # noqa: E402
from training.sim.ssp import SUN_ABS_MAG_AB  # noqa: E402
from training.train_property_maps import CHUNK, EVAL_SEEDS, TRAIN_SEED_BASE, predict, softening  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PAPER = {"log_sigma_mstar": 0.09, "log_sigma_gas": 0.13, "log_age_mw": 0.09, "log_sigma_sfr": 0.22,
         "log_z_star": None, "log_z_gas": None}  # fmt: skip
PAPER_NOTE = ("PICASSSO (Buck & Wolf 2021) scatter, dex: stellar mass 0.09, gas mass 0.13, age 0.09, SFR 0.22; "
              "they give stellar / gas *metal mass* (0.14 / 0.19), not metallicity, so no entry for log Z")  # fmt: skip
I_BAND, G_BAND = BANDS.index("i"), BANDS.index("g")
SN_CUT = 5.0


def test_seeds(n: int) -> list[int]:
    return [int(np.random.SeedSequence([EVAL_SEEDS["test"], k]).generate_state(1)[0]) for k in range(-(-n // CHUNK))]


def simulate(n: int, size: int, seeds: list[int]):
    sims = [simulate_block(min(CHUNK, n - k * CHUNK), size, s, k * CHUNK) for k, s in enumerate(seeds)]
    images = np.concatenate([s.images for s in sims])
    maps = np.concatenate([s.property_maps for s in sims])
    truth = {k: np.concatenate([s.truth[k] for s in sims]) for k in sims[0].truth}
    columns = {k: np.concatenate([s.columns[k] for s in sims]) for k in sims[0].columns}
    return images, maps, truth, columns


def load_model(bundle_dir: Path):
    bundle = load_bundle(bundle_dir)
    model = build_model("property_unet", **bundle.meta["architecture"]["kwargs"])
    model.load_state_dict(load_file(str(bundle_dir / "weights.safetensors")))
    return bundle, model


def run_bundle(bundle_dir: Path, images: np.ndarray):
    bundle, model = load_model(bundle_dir)
    spec = bundle.input_spec["image"]
    keep = [BANDS.index(b) for b in spec["bands"]]
    x = asinh_transform(images[:, keep], spec["softening"])
    tick = time.time()
    mean, sigma, p_empty = predict(model, x)
    return bundle, mean, sigma, p_empty, time.time() - tick


def scores(true: np.ndarray, pred: np.ndarray, region: np.ndarray) -> dict[str, dict[str, float]]:
    out = {}
    for k in range(true.shape[1]):
        name = MAP_NAMES[k]
        ok = region & np.isfinite(true[:, k]) & np.isfinite(pred[:, k])
        d = (true[:, k] - pred[:, k])[ok].astype(np.float64)
        out[name] = {"bias": float(d.mean()), "scatter": float(d.std()), "pixels": int(ok.sum()),
                     "within_0.2dex": float(np.mean(np.abs(d) < 0.2))}  # fmt: skip
    return out


def luminosity_density_i(sb_i: np.ndarray) -> np.ndarray:
    """i-band surface brightness (nmgy/arcsec^2) -> log10 Sigma_L,i (Lsun/kpc^2); NaN where sb <= 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        mu = 22.5 - 2.5 * np.log10(np.where(sb_i > 0, sb_i, np.nan))
    return -0.4 * (mu - SUN_ABS_MAG_AB[I_BAND] - 21.572) + 6.0


def colour(images: np.ndarray) -> np.ndarray:
    g, i = images[:, G_BAND].astype(np.float64), images[:, I_BAND].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -2.5 * np.log10(np.where((g > 0) & (i > 0), g / i, np.nan))


def well_measured(images: np.ndarray) -> np.ndarray:
    """Pixels with g and i above SN_CUT times the sky noise of a native pixel (per arcsec^2)."""
    soft = softening(BANDS)
    return (images[:, G_BAND] > SN_CUT * soft[G_BAND]) & (images[:, I_BAND] > SN_CUT * soft[I_BAND])


def fit_colour_ml(n_cal: int, size: int) -> tuple[float, float, int]:
    """log(Sigma*/Sigma_L,i) = a + b (g - i), least squares over the non-empty, well-measured (both bands above
    SN_CUT x noise) pixels of training mocks: noise-dominated colours would flatten the relation."""
    images, maps, _, _ = simulate(n_cal, size, [TRAIN_SEED_BASE + k for k in range(-(-n_cal // CHUNK))])
    x = colour(images)
    y = maps[:, 0] - luminosity_density_i(images[:, I_BAND])
    ok = np.isfinite(x) & np.isfinite(y) & well_measured(images)
    b, a = np.polyfit(x[ok], y[ok], 1)
    return float(a), float(b), int(ok.sum())


def colour_ml_maps(images: np.ndarray, a: float, b: float) -> np.ndarray:
    return a + b * colour(images) + luminosity_density_i(images[:, I_BAND])


def coverage(true, pred, sigma, scale, region) -> dict[str, float]:
    out = {}
    for k, name in enumerate(MAP_NAMES):
        ok = region & np.isfinite(true[:, k])
        z = np.abs(true[:, k][ok] - pred[:, k][ok]) / (scale[k] * sigma[:, k][ok])
        out[name] = float(np.mean(z < 1.0))
    return out


def totals(bundle, mean, sigma, p_empty, columns, truth):
    """The task's catalog totals (postprocess on the raw outputs) against the per-galaxy truth."""
    logit = np.log(np.clip(p_empty, 1e-7, 1 - 1e-7) / np.clip(1 - p_empty, 1e-7, 1))
    outputs = {"maps": mean, "maps_logvar": 2 * np.log(sigma), "empty_logit": logit}
    flags = np.zeros(len(mean), np.int32)
    cols = {"size_kpc": columns["size_kpc"], "distance_mpc": columns["distance_mpc"]}
    result = TASK.postprocess(outputs, cols, flags, bundle)
    pairs = {"log_mstar_map": truth["log_mstar_fov"], "log_sfr_map": np.log10(truth["sfr"]),
             "log_mgas_map": truth["log_mgas_fov"], "log_age_map": truth["log_age_mw"]}  # fmt: skip
    out = {}
    for col, true in pairs.items():
        ok = np.isfinite(result[col]) & np.isfinite(true)
        if col == "log_sfr_map":
            ok &= truth["sfr"] > 0.01  # star-forming galaxies (the total of a quenched one is -inf or noise)
        d = (true - result[col])[ok]
        out[col] = {"bias": float(np.mean(d)), "scatter": float(np.std(d)), "galaxies": int(ok.sum())}
    return out


def draw(images, true, pred, path: Path, rows: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2 * len(rows), 7, figsize=(15, 4.2 * len(rows)))
    for r, k in enumerate(rows):
        rgb = np.arcsinh(np.clip(images[k, [3, 2, 1]], 0, None) / 0.3)
        rgb = np.moveaxis(rgb / max(np.percentile(rgb, 99.5), 1e-6), 0, -1).clip(0, 1)
        for j, (label, data) in enumerate((("true", true), ("predicted", pred))):
            ax = axes[2 * r + j, 0]
            ax.imshow(rgb, origin="lower") if j == 0 else ax.axis("off")
            ax.set_title(f"galaxy {k} (irg)" if j == 0 else "")
            for m, name in enumerate(MAP_NAMES):
                finite = np.isfinite(true[k, m])
                lo, hi = (np.nanpercentile(true[k, m], [2, 98]) if finite.any() else (0, 1))
                ax = axes[2 * r + j, m + 1]
                im = ax.imshow(data[k, m], origin="lower", vmin=lo, vmax=hi, cmap="viridis")
                ax.set_title(f"{label} {name.removeprefix('log_')}", fontsize=8)
                ax.set_xticks([]), ax.set_yticks([])
                fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--n-cal", type=int, default=1000, help="training mocks for the colour-M/L fit")
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--ablation-dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python bench/accuracy_property_maps.py " + " ".join(argv if argv is not None else sys.argv[1:])
    bundle_dir = args.bundle or default_bundle_path("property_maps")
    bundle = load_bundle(bundle_dir)
    size = int(bundle.input_spec["image"]["shape"][-1])
    seeds = test_seeds(args.n)
    tick = time.time()
    images, true, truth, columns = simulate(args.n, size, seeds)
    region = half_mass_ellipse_mask(true[:, 0])
    sim_s = time.time() - tick
    bundle, pred, sigma, p_empty, infer_s = run_bundle(bundle_dir, images)
    cnn = scores(true, pred, region)
    mean_map = np.broadcast_to(np.asarray(bundle.meta["architecture"]["kwargs"]["target_mean"], np.float32)[None, :, None, None],
                               pred.shape)  # the trivial baseline: every pixel = the training mean of its map
    trivial = scores(true, mean_map, region)
    scale = bundle.output_spec.get("maps_err", {}).get("scale", [1.0] * 6)
    cover = coverage(true, pred, sigma, scale, region)
    empty_ok = {n: float(((p_empty[:, k] > 0.5) == np.isnan(true[:, k])).mean()) for k, n in enumerate(MAP_NAMES)}
    a, b, n_pix = fit_colour_ml(args.n_cal, size)
    base_maps = colour_ml_maps(images, a, b)
    base = scores(true[:, :1], base_maps[:, None], region)
    evaluated = region & np.isfinite(true[:, 0])
    base_share = float(np.isfinite(base_maps)[evaluated].mean())
    cnn_on_base_pixels = scores(true[:, :1], pred[:, :1], region & np.isfinite(base_maps))
    bright = region & well_measured(images)
    base_bright = scores(true[:, :1], base_maps[:, None], bright)["log_sigma_mstar"]
    cnn_bright = scores(true[:, :1], pred[:, :1], bright)["log_sigma_mstar"]
    bright_share = float(bright[evaluated].mean())
    tot = totals(bundle, pred, sigma, p_empty, columns, truth)

    lines = [f"property_maps accuracy: bundle {bundle.id}, {args.n} held-out mocks (seeds SeedSequence([940001, k])), "
             f"{size} px, pixels inside 2 half-mass radii, non-empty in the truth",
             f"command: {command}", "",
             f"{'map':18s}{'bias':>8s}{'scatter':>9s}{'paper':>7s}{'mean map':>10s}{'|d|<0.2':>9s}{'68% cov':>9s}"
             f"{'empty ok':>10s}{'pixels':>10s}"]  # fmt: skip
    for name in MAP_NAMES:
        s, p = cnn[name], PAPER[name]
        lines.append(f"{name:18s}{s['bias']:+8.3f}{s['scatter']:9.3f}{(f'{p:.2f}' if p else '-'):>7s}"
                     f"{trivial[name]['scatter']:10.3f}{s['within_0.2dex']:9.3f}{cover[name]:9.3f}{empty_ok[name]:10.3f}{s['pixels']:10d}")  # fmt: skip
    bs = base["log_sigma_mstar"]
    lines += ["", "mean map: the scatter of a constant map at each map's training mean (the trivial baseline)", PAPER_NOTE, "",
              f"colour-M/L baseline (stellar mass): log(Sigma*/Sigma_L,i) = {a:.3f} + {b:.3f} (g - i), fitted on "
              f"{n_pix} pixels of {args.n_cal} training mocks",
              f"  baseline bias {bs['bias']:+.3f} scatter {bs['scatter']:.3f} dex on the {base_share:.1%} of evaluated "
              f"pixels that have a colour; CNN on the same pixels: bias {cnn_on_base_pixels['log_sigma_mstar']['bias']:+.3f} "
              f"scatter {cnn_on_base_pixels['log_sigma_mstar']['scatter']:.3f}",
              f"  on the {bright_share:.1%} of evaluated pixels with g and i above {SN_CUT:g}x the sky noise: baseline "
              f"bias {base_bright['bias']:+.3f} scatter {base_bright['scatter']:.3f}, CNN bias {cnn_bright['bias']:+.3f} "
              f"scatter {cnn_bright['scatter']:.3f}", "",
              "catalog totals from the predicted maps (task.postprocess) vs truth within the field of view:"]  # fmt: skip
    for col, s in tot.items():
        lines.append(f"  {col:16s} bias {s['bias']:+.3f} scatter {s['scatter']:.3f} dex ({s['galaxies']} galaxies"
                     f"{', SFR > 0.01 Msun/yr' if col == 'log_sfr_map' else ''})")  # fmt: skip
    lines.append(f"  simulation {sim_s:.0f} s, inference {infer_s:.0f} s ({args.threads} thread(s), PyTorch)")

    ablations = {}
    if args.ablation_dir:
        variants = [("ugriz 64 px", "abl-ugriz64"), ("gri 64 px", "abl-gri64"), ("r 64 px", "abl-r64"),
                    ("ugriz 32 px", "abl-ugriz32")]  # fmt: skip
        cache = {size: (images, true, region)}
        for label, name in variants:
            path = args.ablation_dir / f"property_maps-{name}-v1"
            if not path.exists():
                continue
            s = int(load_bundle(path).input_spec["image"]["shape"][-1])
            if s not in cache:
                im, tr, _, _ = simulate(args.n, s, seeds)
                cache[s] = (im, tr, half_mass_ellipse_mask(tr[:, 0]))
            im, tr, reg = cache[s]
            ab, pr, _, _, _ = run_bundle(path, im)
            ablations[label] = {"bundle": ab.id, "training": {k: ab.meta["training"].get(k) for k in
                                ("n_train", "epochs_run", "wall_time_s")}, "scores": scores(tr, pr, reg)}  # fmt: skip
        if ablations:
            lines += ["", "ablations: short trainings with one recipe (far less than the bundle above); scatter dex on the "
                      "same held-out galaxies",
                      f"{'variant':14s}{'train':>7s}{'epochs':>7s}" + "".join(f"{n.removeprefix('log_'):>13s}" for n in MAP_NAMES)]  # fmt: skip
            for label, res in ablations.items():
                tr = res["training"]
                lines.append(f"{label:14s}{tr['n_train']:7d}{tr['epochs_run']:7d}"
                             + "".join(f"{res['scores'][n]['scatter']:13.3f}" for n in MAP_NAMES))
            lines.append("(32 px: each pixel covers 4x the area of a 64 px pixel; the region is 2 R_half at each grid)")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accuracy_property_maps.txt").write_text(text + "\n")
    (args.out / "accuracy_property_maps.json").write_text(json.dumps(
        {"bundle": bundle.id, "n": args.n, "cnn": cnn, "mean_map": trivial, "coverage_68": cover, "empty_accuracy": empty_ok,
         "baseline": {"a": a, "b": b, "scores": bs, "share_with_colour": base_share, "well_measured": {
                      "share": bright_share, "baseline": base_bright, "cnn": cnn_bright}, "sn_cut": SN_CUT,
                      "cnn_on_same_pixels": cnn_on_base_pixels["log_sigma_mstar"]},
         "totals": tot, "ablations": ablations, "command": command}, indent=1))  # fmt: skip
    draw(images, true, np.where(p_empty > 0.5, np.nan, pred), args.out / "accuracy_property_maps.png", [0, 1, 2, 3])
    print(f"wrote {args.out / 'accuracy_property_maps.txt'}, .json, .png")


if __name__ == "__main__":
    main()
