"""Accuracy of the mass_to_light bundle against truth and two baselines, on held-out simulated galaxies.

    python bench/accuracy_mass_to_light.py [--bundle DIR] [--n 5000] [--engine onnxruntime]

Rows: the CNN (through survey_infer's engine and the task's prepare/postprocess, as a run would), the
constant baseline (mean M/L of the training set, from the bundle's provenance) and the colour baseline
log10 M/L_g = a + b (g - i), fitted by least squares on a separate simulated calibration set with the true g - i.
Columns: RMSE and R^2 on linear M/L, bias (mean of prediction - truth), median |error|, and the fraction of
rows with |error| < 1 sigma (0.683 for calibrated Gaussian errors). The baselines' sigma: the training set's
std of M/L for the constant; the calibration residual scatter in dex, converted to linear M/L, for the colour
relation. Test and calibration seeds are reserved (training.train.EVAL_SEEDS) and never trained on.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from survey_infer.bundle import default_bundle_path, load_bundle
from survey_infer.engines import make_engine
from survey_infer.tasks import get_task
from training.evaluate import regression_metrics
from training.sim import get_simulator
from training.train import EVAL_SEEDS

TEST_FIRST_ID = 900_000_000
CALIB_FIRST_ID = 910_000_000


def run_cnn(bundle, engine_name: str, threads: int, images, columns, batch: int = 512):
    task = get_task("mass_to_light")
    engine = make_engine(engine_name, bundle, threads=threads)
    wanted = task.input_columns(bundle)
    ml, err = [], []
    for start in range(0, len(images), batch):
        cols = {c: np.asarray(columns[c][start : start + batch]) for c in wanted}
        inputs, flags = task.prepare(images[start : start + batch], cols, bundle)
        out = task.postprocess(engine.run(inputs), cols, flags, bundle)
        ml.append(out["ml_g"])
        err.append(out["ml_g_err"])
    return np.concatenate(ml), np.concatenate(err), engine.describe()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="mass_to_light accuracy vs baselines")
    parser.add_argument("--bundle", type=Path, default=None, help="bundle directory (default: the shipped one)")
    parser.add_argument("--n", type=int, default=5000, help="held-out test galaxies")
    parser.add_argument("--n-calib", type=int, default=5000, help="colour-relation calibration galaxies")
    parser.add_argument("--engine", default="onnxruntime")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    print("command: " + shlex.join([sys.executable, *sys.argv]))
    bundle = load_bundle(args.bundle or default_bundle_path("mass_to_light"), task="mass_to_light")
    training = bundle.meta.get("training", {})
    simulator = training.get("simulator", "universe")
    simulate = get_simulator(simulator)
    size = bundle.input_spec["image"]["shape"][-1]
    used = set(training.get("seeds", {}).get("train", [])) | set(training.get("seeds", {}).get("val", []))
    if used & set(EVAL_SEEDS.values()):
        raise SystemExit(f"bundle {bundle.id} was trained on an evaluation seed; the comparison would be unfair")

    t0 = time.time()
    test = simulate(args.n, size=size, seed=EVAL_SEEDS["test"], first_id=TEST_FIRST_ID)
    calib = simulate(args.n_calib, size=size, seed=EVAL_SEEDS["calibration"], first_id=CALIB_FIRST_ID)
    truth = np.asarray(test.truth["ml_g"], dtype=np.float64)
    sim_s = time.time() - t0

    t0 = time.time()
    ml_cnn, err_cnn, engine_info = run_cnn(bundle, args.engine, args.threads, test.images, test.columns)
    cnn_s = time.time() - t0

    if "target_train_mean" in training:
        const, const_sd, const_src = training["target_train_mean"], training["target_train_std"], "bundle provenance"
    else:  # an older bundle: draw the training distribution again (M/L needs no images, but simulate renders them)
        draw = simulate(5000, size=size, seed=training.get("seeds", {}).get("train", [1_000_000])[0])
        const, const_sd, const_src = float(np.mean(draw.truth["ml_g"])), float(np.std(draw.truth["ml_g"])), "resimulated"

    log_ml_cal = np.log10(np.asarray(calib.truth["ml_g"], dtype=np.float64))
    g_i_cal = np.asarray(calib.truth["g_i"], dtype=np.float64)
    b, a = np.polyfit(g_i_cal, log_ml_cal, 1)
    scatter_dex = float(np.std(log_ml_cal - (a + b * g_i_cal)))
    ml_col = 10 ** (a + b * np.asarray(test.truth["g_i"], dtype=np.float64))
    sigma_col = ml_col * np.log(10) * scatter_dex

    rows = [
        (f"CNN {bundle.id} ({engine_info['name']})", regression_metrics(ml_cnn, err_cnn, truth)),
        (f"constant M/L = {const:.3f}", regression_metrics(np.full_like(truth, const), np.full_like(truth, const_sd), truth)),
        (f"colour: log M/L = {a:.3f} + {b:.3f} (g-i)", regression_metrics(ml_col, sigma_col, truth)),
    ]
    print(f"bundle: {bundle.id} sha256 {bundle.sha256()[:16]}...  engine: {engine_info}")
    print(f"held-out: {args.n} galaxies of simulator {simulator!r}, {size}x{size} px, seed {EVAL_SEEDS['test']}; "
          f"colour calibration: {args.n_calib} galaxies, seed {EVAL_SEEDS['calibration']} "
          f"(scatter {scatter_dex:.3f} dex); constant from {const_src}")  # fmt: skip
    print(f"truth M/L_g: mean {truth.mean():.3f}, std {truth.std():.3f}; simulate {sim_s:.1f} s, CNN {cnn_s:.1f} s")
    print()
    name_w = max(len(r[0]) for r in rows)
    header = f"{'model':<{name_w}}  {'RMSE':>6}  {'R^2':>6}  {'bias':>7}  {'med|err|':>8}  {'|err|<1sig':>10}"
    print(header)
    print("-" * len(header))
    for name, m in rows:
        print(f"{name:<{name_w}}  {m['rmse']:6.3f}  {m['r2']:6.3f}  {m['bias']:+7.3f}  {m['median_abs_error']:8.3f}  "
              f"{m['within_1sigma']:10.3f}")  # fmt: skip
    print()
    print("RMSE, bias, med|err| in Msun/Lsun (linear M/L_g); |err|<1sig: fraction of rows (0.683 if calibrated).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
