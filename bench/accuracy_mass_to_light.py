"""Accuracy of the mass_to_light bundles against truth and the classical baselines, on held-out mock galaxies.

    python bench/accuracy_mass_to_light.py [--bundle DIR ...] [--n 10000] [--engine onnxruntime] [--precision fp32,int8]

Every bundle (default: every shipped mass_to_light bundle) runs on a held-out set of ``--n`` galaxies simulated
with a reserved seed (``training.train.EVAL_SEEDS['test']``, never trained on) at the bundle's cutout size,
through survey_infer's engine and the task's prepare/postprocess, as a run would. Beside each CNN, on the same
galaxies:

- the constant baseline: the training set's mean M/L_g (from the bundle's provenance);
- the colour-M/L relation log10 M/L_g = a + b (g - i) (Bell & de Jong 2001 / Zibetti et al. 2009 form), fitted
  by least squares on the bundle's own training galaxies (its first training seeds, re-simulated), in two
  forms: (i) with the true rest-frame g - i (an idealised, K-corrected, noise-free colour) and (ii) with the
  observed-frame g - i of the model magnitudes plus 0.03 mag of photometric noise per band (what a survey has);
- the workshop's published numbers, labelled as measured on real SDSS galaxies (not on this test set).

Columns: RMSE and R^2 on linear M/L_g, bias, median |error|, and the fraction of rows within 1 sigma (0.683
when the uncertainties are calibrated; the issue asks 0.60-0.76 for the images-only model).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from survey_infer.bundle import Bundle, list_shipped_bundles, load_bundle
from survey_infer.engines import make_engine
from survey_infer.engines.base import INT8_ONNX_FILE
from survey_infer.tasks import get_task
from training.evaluate import PHOTOMETRIC_NOISE_MAG, fit_colour_relation, observed_colour, regression_metrics
from training.sim import get_simulator
from training.train import CHUNK, EVAL_SEEDS

TEST_FIRST_ID = 900_000_000
COLOUR_FIT_GALAXIES = 10_000
# ../shared/science/mass_to_light.md: test-set RMSE and R^2 of the workshop's CNNs on real SDSS galaxies.
WORKSHOP = [
    ("69 px, 10k, images", 0.942, 0.411),
    ("128 px, 10k, images", 0.915, 0.445),
    ("128 px, 30k, images", 0.882, 0.484),
    ("69 px, 10k, images + distance, L_g", 0.853, 0.517),
    ("128 px, 30k, images + distance, L_g", 0.747, 0.630),
]


def run_cnn(bundle: Bundle, engine_name: str, threads: int, images, columns, batch: int = 512, precision: str = "fp32"):
    """ml_g, ml_g_err and the engine description, through the task exactly as a pipeline unit runs it."""
    task = get_task("mass_to_light")
    engine = make_engine(engine_name, bundle, threads=threads, precision=precision)
    wanted = task.input_columns(bundle)
    ml, err = [], []
    for start in range(0, len(images), batch):
        cols = {c: np.asarray(columns[c][start : start + batch]) for c in wanted}
        inputs, flags = task.prepare(images[start : start + batch], cols, bundle)
        out = task.postprocess(engine.run(inputs), cols, flags, bundle)
        ml.append(out["ml_g"])
        err.append(out["ml_g_err"])
    return np.concatenate(ml), np.concatenate(err), engine.describe()


def colour_rows(training_truth: dict, test_truth: dict, truth_ml: np.ndarray) -> list[tuple[str, dict]]:
    """The colour-M/L relation fitted on training galaxies, applied to the test galaxies (two colour kinds)."""
    rng = np.random.default_rng(0)
    log_ml = np.log10(np.asarray(training_truth["ml_g"], dtype=np.float64))
    rows = []
    for label, fit_colour, test_colour in (
        ("true rest-frame g-i", np.asarray(training_truth["g_i"]), np.asarray(test_truth["g_i"])),
        (f"observed g-i +{PHOTOMETRIC_NOISE_MAG} mag noise", observed_colour(training_truth, rng),
         observed_colour(test_truth, rng)),
    ):  # fmt: skip
        a, b, scatter = fit_colour_relation(fit_colour, log_ml)
        pred = 10 ** (a + b * test_colour)
        name = f"colour ({label}): log M/L = {a:.3f} + {b:.3f} (g-i), scatter {scatter:.3f} dex"
        rows.append((name, regression_metrics(pred, pred * np.log(10) * scatter, truth_ml)))
    return rows


def evaluate_bundle(bundle: Bundle, args, cache: dict) -> list[tuple[str, dict]]:
    training = bundle.meta["training"]
    size = int(bundle.input_spec["image"]["shape"][-1])
    seeds = training["seeds"]
    if set(seeds["train"] + seeds["val"]) & set(EVAL_SEEDS.values()):
        raise SystemExit(f"bundle {bundle.id} was trained on an evaluation seed; the comparison would be unfair")
    simulate = get_simulator(training["simulator"])
    key = (training["simulator"], size)
    if key not in cache:
        t0 = time.time()
        cache[key] = simulate(args.n, size=size, seed=EVAL_SEEDS["test"], first_id=TEST_FIRST_ID)
        print(f"simulated {args.n} held-out {size}x{size} galaxies in {time.time() - t0:.1f} s")
    test = cache[key]
    truth = np.asarray(test.truth["ml_g"], dtype=np.float64)
    rows = []
    for precision in args.precision.split(","):
        if precision != "fp32" and INT8_ONNX_FILE not in bundle.meta["files"]:
            print(f"{bundle.id}: no {INT8_ONNX_FILE}, {precision} skipped (survey-infer quantize)")
            continue
        t0 = time.time()
        ml, err, engine_info = run_cnn(bundle, args.engine, args.threads, test.images, test.columns, precision=precision)
        print(f"{bundle.id}: {engine_info['name']} {precision} {time.time() - t0:.1f} s")
        label = f"CNN {bundle.id}" + (f" [{precision}]" if precision != "fp32" else "")
        rows.append((label, regression_metrics(ml, err, truth)))
    const, const_sd = training["target_train_mean"], training["target_train_std"]
    rows.append((f"constant M/L = {const:.3f} (training mean)",
                 regression_metrics(np.full_like(truth, const), np.full_like(truth, const_sd), truth)))  # fmt: skip
    fit_key = ("fit", training["simulator"], tuple(seeds["train"][: COLOUR_FIT_GALAXIES // CHUNK]))
    if fit_key not in cache:  # truth of the bundle's first training galaxies (images are not needed, but cheap)
        parts = [simulate(CHUNK, size=32, seed=s).truth for s in fit_key[2]]
        cache[fit_key] = {k: np.concatenate([p[k] for p in parts]) for k in ("ml_g", "g_i", "mag_g", "mag_i")}
    return rows + colour_rows(cache[fit_key], test.truth, truth)


def print_table(title: str, rows: list[tuple[str, dict]]) -> None:
    name_w = max(len(r[0]) for r in rows)
    header = (f"{'model':<{name_w}}  {'RMSE':>6}  {'R^2':>6}  {'bias':>7}  {'med|err|':>8}  {'|err|<1sig':>10}  "
              f"{'|err|<1.96sig':>13}")  # fmt: skip
    print(f"\n{title}\n{header}\n{'-' * len(header)}")
    for name, m in rows:
        print(f"{name:<{name_w}}  {m['rmse']:6.3f}  {m['r2']:6.3f}  {m['bias']:+7.3f}  {m['median_abs_error']:8.3f}  "
              f"{m['within_1sigma']:10.3f}  {m['within_1.96sigma']:13.3f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="mass_to_light accuracy vs baselines")
    parser.add_argument("--bundle", type=Path, action="append", help="bundle directory (repeatable; default: shipped)")
    parser.add_argument("--n", type=int, default=10_000, help="held-out test galaxies per cutout size")
    parser.add_argument("--engine", default="onnxruntime")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="fp32", help="comma list: fp32,int8 (int8 where the bundle has one)")
    args = parser.parse_args(argv)
    print("command: " + shlex.join([sys.executable, *sys.argv]))
    cache: dict = {}
    bundles = ([load_bundle(path, task="mass_to_light") for path in args.bundle] if args.bundle
               else [b for b in list_shipped_bundles() if b.task == "mass_to_light"])  # fmt: skip
    for bundle in bundles:
        t = bundle.meta["training"]
        meta = bundle.input_spec.get("meta", {}).get("columns", [])
        title = (f"{bundle.id}: {t['image_size']} px, {t['n_train']} training galaxies, inputs: image"
                 f"{' + ' + ', '.join(meta) if meta else ' only'}; {t['epochs_run']} epochs ({t['stopped_by']}); "
                 f"held-out n={args.n}, seed {EVAL_SEEDS['test']}")  # fmt: skip
        print_table(title, evaluate_bundle(bundle, args, cache))
    print("\nworkshop (Dobbels), as published: real SDSS galaxies, SED-fit M/L targets, NOT this test set")
    for label, rmse, r2 in WORKSHOP:
        print(f"  {label:<40} RMSE {rmse:.3f}  R^2 {r2:.3f}")
    print("\nRMSE, bias, med|err| in Msun/Lsun (linear M/L_g); |err|<1sig, |err|<1.96sig: fraction of rows (0.683 and "
          "0.950 if calibrated; the CNNs' errors carry the scale that `survey-infer trust` recalibrated, training/trust.py).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
