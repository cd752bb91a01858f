"""Train the mass_profiles two-branch CNN + conditional MAF on mock dwarf galaxies and write a model bundle.

Data (``training.sim.kinematics``): galaxies in dynamical equilibrium on a grid of dimensionless halo + tracer
DFs (NFW, Burkert, Einasto; isotropic and Osipkov-Merritt), rescaled per galaxy. Splits are by galaxy, never
by projection, each from its own seed: ``cnn`` (galaxies x ``--projections`` projections: trains the CNN),
``flow`` (other galaxies, one projection each: the CNN never saw them, so the flow learns the residuals of
unseen galaxies and its posteriors are not over-confident), ``val`` (early stopping of both). ``EVAL_SEEDS``
are reserved for ``bench/accuracy_mass_profiles.py`` and never trained on.

Stage 1: CNN, MSE on the standardised log masses (log10 M(< f R_h) - log10 M_s, per radius), AdamW +
OneCycle, augmentation by the exact symmetries (rotations/flips of the spatial histogram, v -> -v of the
dynamical one); best epoch by validation MSE. Stage 2: the CNN frozen, the zuko MAF (4 transforms) is trained
by maximum likelihood on the standardised residuals of the ``flow`` split given the 32 features; best epoch by
validation NLL. One torch thread, one process.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from survey_infer.bundle import BUNDLE_FORMAT
from survey_infer.models import MassProfileNet
from survey_infer.kinematics import StarBatch
from survey_infer.tasks.mass_profiles import BINS, N_SCALARS, RADII_F, galaxy_inputs, radius_name
from training.sim import kinematics as sim
from training.train import write_bundle

log = logging.getLogger(__name__)

TASK = "mass_profiles"
ARCHITECTURE = "mass_profile_cnn"
SEEDS = {"cnn": 5_100_000, "flow": 5_200_000, "val": 5_300_000, "grid": 5_000}
EVAL_SEEDS = {"test": 930_001, "test_shift": 930_002}
FIRST_ID = {"cnn": 0, "flow": 10_000_000, "val": 20_000_000, "test": 90_000_000}
GRAD_CLIP_NORM = 5.0


def projections_to_arrays(projections: list[sim.Projection]) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
    """Network inputs, targets (n, 10) log10 M(< f R_h) and per-projection truth columns."""
    batch = StarBatch.from_lists([(p.x, p.y, p.v_los, p.v_err) for p in projections])
    inputs, summary = galaxy_inputs(batch)
    targets = np.stack([p.truth["log_mass"] for p in projections]).astype(np.float32)
    keys = [k for k in projections[0].truth if k != "log_mass"]
    truth = {k: np.asarray([p.truth[k] for p in projections]) for k in keys}
    truth.update({f"meas_{k}": v for k, v in summary.items()})
    return inputs, targets, truth


def simulate_arrays(halos, n_galaxies: int, seed: int, projections: int, first_id: int):
    tick = time.time()
    projs = sim.simulate_split(halos, n_galaxies, seed, projections, first_id)
    arrays = projections_to_arrays(projs)
    log.info("simulated %d galaxies x %d projections in %.0f s", n_galaxies, projections, time.time() - tick)
    return arrays


def _augment(spatial: torch.Tensor, dynamical: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact symmetries: a random D4 transform of the spatial histogram, v -> -v of the dynamical one."""
    k = int(torch.randint(4, (1,), generator=gen))
    spatial = torch.rot90(spatial, k, dims=(2, 3))
    if int(torch.randint(2, (1,), generator=gen)):
        spatial = torch.flip(spatial, dims=(3,))
    if int(torch.randint(2, (1,), generator=gen)):
        dynamical = torch.flip(dynamical, dims=(2,))
    return spatial, dynamical


@torch.inference_mode()
def predict(model: MassProfileNet, inputs: dict[str, np.ndarray], batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(log_mass (n, 10), features (n, 32))."""
    model.eval()
    outs, feats = [], []
    n = len(inputs["scalars"])
    for s in range(0, n, batch):
        lm, f = model(*(torch.from_numpy(inputs[k][s : s + batch]) for k in ("spatial", "dynamical", "scalars")))
        outs.append(lm.numpy())
        feats.append(f.numpy())
    return np.concatenate(outs), np.concatenate(feats)


def train_mass_profiles(out_dir: Path, *, n_cnn: int, n_flow: int, n_val: int, projections: int = 4,
                        epochs: int = 30, flow_epochs: int = 60, families: tuple[str, ...] = sim.FAMILIES,
                        width: int = 16, hidden: int = 128, batch_size: int = 64, lr: float = 2e-3,
                        seed: int = 0, name: str = "cnn32", version: int = 1, threads: int | None = 1,
                        time_budget_s: float | None = None, halos=None, overwrite: bool = False) -> Path:  # fmt: skip
    """Simulate, train, and write ``<out_dir>/mass_profiles-<name>-v<version>/`` (without model.onnx)."""
    bundle_id = f"{TASK}-{name}-v{version}"
    if (Path(out_dir) / bundle_id).exists() and not overwrite:
        raise FileExistsError(f"{Path(out_dir) / bundle_id} exists; pass overwrite=True to replace it")
    if threads:
        torch.set_num_threads(threads)
    started = time.time()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    if halos is None:
        halos = sim.build_grid(families, seed=SEEDS["grid"])
    halos = [h for h in halos if h.family in families]
    grid_seconds = time.time() - started
    (xc, yc, _), (xf, yf, _), (xv, yv, _) = (
        simulate_arrays(halos, n, SEEDS[split] + 1000 * seed, p, FIRST_ID[split])
        for split, n, p in (("cnn", n_cnn, projections), ("flow", n_flow, 1), ("val", n_val, 1))
    )  # fmt: skip
    sim_seconds = time.time() - started - grid_seconds

    def standardise_target(x, y):
        return y - x["scalars"][:, :1]

    zc = standardise_target(xc, yc)
    t_mean, t_std = zc.mean(axis=0), zc.std(axis=0)
    kwargs: dict[str, Any] = {"bins": BINS, "width": width, "hidden": hidden, "n_features": 32, "n_scalars": N_SCALARS,
                              "n_radii": len(RADII_F), "target_mean": [float(v) for v in t_mean],
                              "target_std": [float(v) for v in t_std], "residual_std": [1.0] * len(RADII_F),
                              "flow_transforms": 4, "flow_hidden": [64, 64]}  # fmt: skip
    model = MassProfileNet(**kwargs)
    cnn_params = [p for n_, p in model.named_parameters() if not n_.startswith("flow.")]
    optimiser = torch.optim.AdamW(cnn_params, lr=lr, weight_decay=1e-4)
    n_train = len(yc)
    steps = math.ceil(n_train / batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=epochs * steps, pct_start=0.15)
    tc = {k: torch.from_numpy(v) for k, v in xc.items()}
    yc_t = torch.from_numpy(yc)
    best: dict[str, Any] = {"mse": np.inf}
    history, stopped_by = [], "max epochs"
    cnn_started = time.time()
    for epoch in range(1, epochs + 1):
        t0 = time.time()
        model.train()
        order = torch.from_numpy(rng.permutation(n_train))
        total = 0.0
        for s in range(0, n_train, batch_size):
            idx = order[s : s + batch_size]
            if len(idx) < 2:
                continue
            sp, dy = _augment(tc["spatial"][idx], tc["dynamical"][idx], gen)
            log_mass, _ = model(sp, dy, tc["scalars"][idx])
            loss = (((log_mass - yc_t[idx]) / model.target_std) ** 2).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(cnn_params, GRAD_CLIP_NORM)
            optimiser.step()
            scheduler.step()
            total += float(loss.detach()) * len(idx)
        pred, _ = predict(model, xv)
        mse = float(np.mean(((pred - yv) / t_std) ** 2))
        row = {"epoch": epoch, "train_mse": round(total / n_train, 5), "val_mse": round(mse, 5),
               "val_rmse_dex": [round(float(v), 4) for v in np.sqrt(np.mean((pred - yv) ** 2, axis=0))],
               "seconds": round(time.time() - t0, 1)}  # fmt: skip
        history.append(row)
        log.info("epoch %s", row)
        if mse < best["mse"]:
            best = {"mse": mse, "epoch": epoch, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        per_epoch = (time.time() - cnn_started) / epoch
        if time_budget_s and epoch < epochs and time.time() - started + per_epoch > time_budget_s:
            stopped_by = f"time budget ({time_budget_s:.0f} s)"
            break
    model.load_state_dict(best["state"])
    cnn_seconds = time.time() - cnn_started

    # Stage 2: the flow on residuals of galaxies the CNN never saw.
    flow_started = time.time()
    pf, ff = predict(model, xf)
    pv, fv = predict(model, xv)
    rf, rv = yf - pf, yv - pv
    residual_std = rf.std(axis=0)
    model.residual_std.copy_(torch.from_numpy(residual_std.astype(np.float32)))
    kwargs["residual_std"] = [float(v) for v in residual_std]
    for p in cnn_params:
        p.requires_grad_(False)
    flow_opt = torch.optim.AdamW(model.flow.parameters(), lr=1e-3, weight_decay=1e-5)
    flow_sched = torch.optim.lr_scheduler.CosineAnnealingLR(flow_opt, T_max=flow_epochs)
    ff_t, rf_t = torch.from_numpy(ff), torch.from_numpy(rf)
    fv_t, rv_t = torch.from_numpy(fv), torch.from_numpy(rv)
    best_flow: dict[str, Any] = {"nll": np.inf}
    flow_history = []
    for epoch in range(1, flow_epochs + 1):
        model.flow.train()
        order = torch.from_numpy(rng.permutation(len(rf)))
        total = 0.0
        for s in range(0, len(rf), 256):
            idx = order[s : s + 256]
            loss = -model.residual_log_prob(ff_t[idx], rf_t[idx]).mean()
            flow_opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.flow.parameters(), GRAD_CLIP_NORM)
            flow_opt.step()
            total += float(loss.detach()) * len(idx)
        flow_sched.step()
        model.flow.eval()
        with torch.inference_mode():
            nll = float(-model.residual_log_prob(fv_t, rv_t).mean())
        flow_history.append({"epoch": epoch, "train_nll": round(total / len(rf), 4), "val_nll": round(nll, 4)})
        if epoch % 10 == 0:
            log.info("flow epoch %s", flow_history[-1])
        if nll < best_flow["nll"]:
            best_flow = {"nll": nll, "epoch": epoch,
                         "state": {k: v.detach().clone() for k, v in model.flow.state_dict().items()}}  # fmt: skip
    model.flow.load_state_dict(best_flow["state"])
    flow_seconds = time.time() - flow_started

    # Validation metrics of the shipped model: point estimate and the posterior's 68% interval coverage.
    torch.manual_seed(seed + 1)
    with torch.inference_mode():
        samples = model.sample_posterior(fv_t, torch.from_numpy(pv), 200).numpy()
    p16, p50, p84 = np.percentile(samples, [15.865, 50, 84.135], axis=1)
    val_metrics = {
        radius_name(f): {"rmse_dex_cnn": round(float(np.sqrt(np.mean((pv[:, k] - yv[:, k]) ** 2))), 4),
                         "median_bias_dex": round(float(np.median(p50[:, k] - yv[:, k])), 4),
                         "coverage_68": round(float(np.mean((yv[:, k] > p16[:, k]) & (yv[:, k] < p84[:, k]))), 4)}
        for k, f in enumerate(RADII_F)
    }  # fmt: skip
    log.info("validation: %s", val_metrics)
    from importlib.metadata import version as _version

    meta = {
        "bundle_format": BUNDLE_FORMAT,
        "id": bundle_id,
        "task": TASK,
        "name": name,
        "version": version,
        "radii_f": list(RADII_F),
        "architecture": {"name": ARCHITECTURE, "kwargs": kwargs},
        "engine_io": {"inputs": ["spatial", "dynamical", "scalars"], "outputs": ["log_mass", "features"]},
        "input_spec": {
            "spatial": {"shape": [1, BINS, BINS], "dtype": "float32",
                        "normalisation": "2-D PDF of (y, x) / R_h in [-4, 4] (counts / (N bin area); "
                                         "survey_infer.tasks.mass_profiles.galaxy_inputs)"},
            "dynamical": {"shape": [1, BINS, BINS], "dtype": "float32",
                          "normalisation": "2-D PDF of (v - mean)/std(v) in [-4, 4] x R/R_h in [0, 4]"},
            "scalars": {"shape": [N_SCALARS], "dtype": "float32",
                        "columns": ["log10 M_s = log10(sigma^2 R_h / G) [Msun]", "log10 N_stars - 2",
                                    "mean(v_err) / std(v_los)", "log10 sigma(R < R_h) / sigma(R > R_h)",
                                    "excess kurtosis of v_los / 3"]},
            "n_stars_range": list(sim.N_STARS_RANGE),
            "positions": "kpc, projected about the galaxy centre",
        },  # fmt: skip
        "output_spec": {
            "log_mass": {"unit": "dex(Msun)", "radii": "r = f R_h, f = " + ", ".join(f"{f:.1f}" for f in RADII_F),
                         "r_half": "median projected radius of the stars (projected half-light radius)"},
            "samples": 100,
            "flow": "zuko MAF, 4 affine MADE transforms (64, 64), conditioned on the 32 features; runs in torch",
        },  # fmt: skip
        "training": {
            "simulator": "training.sim.kinematics",
            "training_data": {
                "families": list(families),
                "grid": [h.label for h in halos],
                "tracer": "Plummer sphere, massless, Osipkov-Merritt DF (galpy.df.osipkovmerrittdf); ra/b in "
                          + ", ".join("inf" if not np.isfinite(r) else f"{r:g}" for r in sim.RA_RATIOS),
                "priors": {"n_stars": list(sim.N_STARS_RANGE), "r_half_kpc": list(sim.R_HALF_KPC_RANGE),
                           "sigma_kms": list(sim.SIGMA_KMS_RANGE), "v_err_level_kms": list(sim.V_ERR_LEVEL_RANGE)},
            },  # fmt: skip
            "splits": {"cnn": {"galaxies": n_cnn, "projections_per_galaxy": projections},
                       "flow": {"galaxies": n_flow, "projections_per_galaxy": 1},
                       "val": {"galaxies": n_val, "projections_per_galaxy": 1},
                       "split_by": "galaxy (each split from its own seed; projections of a galaxy stay together)"},
            "seed": seed,
            "seeds": {k: SEEDS[k] + (1000 * seed if k != "grid" else 0) for k in SEEDS},
            "reserved_for_evaluation": dict(EVAL_SEEDS),
            "epochs_max": epochs,
            "epochs_run": len(history),
            "best_epoch": best["epoch"],
            "stopped_by": stopped_by,
            "flow_epochs": flow_epochs,
            "flow_best_epoch": best_flow["epoch"],
            "flow_val_nll": round(best_flow["nll"], 4),
            "batch_size": batch_size,
            "optimiser": {"name": "AdamW", "lr": lr, "weight_decay": 1e-4, "schedule": "OneCycle",
                          "grad_clip_norm": GRAD_CLIP_NORM},  # fmt: skip
            "augmentation": "spatial: random rotation by 90 deg and flip; dynamical: v -> -v (exact symmetries)",
            "validation": {"cnn_mse_standardised": round(best["mse"], 5), "per_radius": val_metrics},
            "history": history,
            "flow_history": flow_history[-5:],
            "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
                         "zuko": _version("zuko"), "galpy": _version("galpy"),
                         "survey-infer": _version("survey-infer")},  # fmt: skip
            "threads": torch.get_num_threads(),
            "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "seconds": {"df_grid": round(grid_seconds, 1), "simulation": round(sim_seconds, 1),
                        "cnn": round(cnn_seconds, 1), "flow": round(flow_seconds, 1),
                        "total": round(time.time() - started, 1)},  # fmt: skip
        },
        "files": {},
    }
    return write_bundle(Path(out_dir), bundle_id, meta, model)


def main(argv: list[str] | None = None) -> None:
    """``python -m training.train_mass_profiles OUT_DIR --n-cnn N --n-flow N --n-val N --epochs E``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n-cnn", type=int, default=3000, help="CNN training galaxies (default 3000)")
    parser.add_argument("--projections", type=int, default=4, help="projections per CNN galaxy (default 4)")
    parser.add_argument("--n-flow", type=int, default=4000, help="flow training galaxies (default 4000)")
    parser.add_argument("--n-val", type=int, default=600, help="validation galaxies (default 600)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--flow-epochs", type=int, default=60)
    parser.add_argument("--families", default=",".join(sim.FAMILIES), help="halo families to train on")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="cnn32")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--time-budget-s", type=float, default=None)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-export", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    bundle_dir = train_mass_profiles(
        args.out_dir, n_cnn=args.n_cnn, n_flow=args.n_flow, n_val=args.n_val, projections=args.projections,
        epochs=args.epochs, flow_epochs=args.flow_epochs, families=tuple(args.families.split(",")),
        width=args.width, seed=args.seed, name=args.name, version=args.version, threads=args.threads,
        time_budget_s=args.time_budget_s, overwrite=args.overwrite,
    )  # fmt: skip
    if not args.no_export:
        from deploy.export import export_onnx

        export_onnx(bundle_dir)
    print(bundle_dir)


if __name__ == "__main__":
    main()
