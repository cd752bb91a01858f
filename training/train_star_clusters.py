"""Train the star_clusters ResNet on mock M31 clusters and write a model bundle.

Data: ``training.sim.clusters`` mocks (star-by-star Kroupa sampling, PARSEC isochrones, PHAT-like imaging on
crowded fields), simulated in memory; seeds TRAIN_SEED_BASE + k (training), VAL_SEED_BASE + k (validation),
one per CHUNK clusters; ``EVAL_SEEDS`` are reserved for ``bench/accuracy_star_clusters.py`` and never trained on.

Recipe: AdamW, cosine learning-rate decay over the planned epochs, batch 64, the exact D4 rotations/flips of
``training.train`` as augmentation; loss = Gaussian NLL of the three standardised targets (log age, log mass,
log r_h) after one epoch of MSE warm-up; best epoch by validation NLL; per-target error scales fitted on the
validation split (``training.train._error_scale``). One torch thread, one process: made to finish in under an
hour on a laptop-class CPU (``--time-budget-s``).
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
from survey_infer.models import ClusterResNet
from survey_infer.imaging import asinh_transform
from survey_infer.tasks.star_clusters import TARGETS, UNITS
from training.sim import clusters as sim
from training.train import _augment, _error_scale, write_bundle

log = logging.getLogger(__name__)

TASK = "star_clusters"
ARCHITECTURE = "cluster_resnet"
CHUNK = 1000
TRAIN_SEED_BASE = 3_000_000
VAL_SEED_BASE = 4_000_000
EVAL_SEEDS = {"test": 910_001, "baseline_calibration": 910_002}
FIRST_ID = {"train": 0, "val": 100_000_000}
EVAL_BATCH = 256
WARMUP_EPOCHS = 1
GRAD_CLIP_NORM = 5.0


def softening(bands: tuple[str, ...]) -> list[float]:
    """Per-band asinh softening: the sky + read noise of one pixel, in the store's flux units."""
    return [round(sim.noise_flux(b), 6) for b in bands]


def simulate_split(n: int, seeds: list[int], first_id: int, bands: tuple[str, ...], size: int):
    """Network inputs (n, C, S, S) float32 (asinh-scaled), targets (n, 3) float32, and the truth dict."""
    soft = softening(bands)
    images, targets, truth = [], [], []
    done = 0
    for s in seeds:
        count = min(CHUNK, n - done)
        out = sim.simulate_clusters(count, size=size, seed=s, first_id=first_id + done, bands=bands)
        images.append(asinh_transform(out.images, soft))
        targets.append(np.stack([out.truth[t] for t in TARGETS], axis=1).astype(np.float32))
        truth.append(out.truth)
        done += count
        log.info("simulated %d / %d", done, n)
    merged = {k: np.concatenate([t[k] for t in truth]) for k in truth[0]}
    return np.concatenate(images), np.concatenate(targets), merged


@torch.inference_mode()
def predict(model: nn.Module, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mean, sigma) (n, 3) of the network on asinh-scaled images."""
    model.eval()
    x_all = torch.as_tensor(images)
    means, lvs = [], []
    for start in range(0, len(x_all), EVAL_BATCH):
        x = x_all[start : start + EVAL_BATCH].contiguous(memory_format=torch.channels_last)
        m, lv = model(x)
        means.append(m.numpy())
        lvs.append(lv.numpy())
    return np.concatenate(means), np.sqrt(np.exp(np.concatenate(lvs).astype(np.float64)))


def _nll(pred: np.ndarray, sigma: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean(0.5 * (2 * np.log(sigma) + (pred - truth) ** 2 / sigma**2)))


def train_star_clusters(out_dir: Path, *, n_train: int, n_val: int, epochs: int, seed: int = 0,
                        bands: tuple[str, ...] = sim.BANDS, size: int = sim.SIZE,
                        widths: tuple[int, ...] = (24, 48, 96, 192), batch_size: int = 64, lr: float = 2e-3,
                        name: str = "resnet64", version: int = 1, threads: int | None = 1,
                        time_budget_s: float | None = None, overwrite: bool = False) -> Path:  # fmt: skip
    """Simulate, train, and write ``<out_dir>/star_clusters-<name>-v<version>/`` (without model.onnx)."""
    if n_train < 2 or n_val < 1 or epochs < 1:
        raise ValueError("n_train >= 2, n_val >= 1 and epochs >= 1 are needed")
    bundle_id = f"{TASK}-{name}-v{version}"
    if (Path(out_dir) / bundle_id).exists() and not overwrite:
        raise FileExistsError(f"{Path(out_dir) / bundle_id} exists; pass overwrite=True to replace it")
    if threads:
        torch.set_num_threads(threads)
    started = time.time()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    train_seeds = [TRAIN_SEED_BASE + 1000 * seed + k for k in range(-(-n_train // CHUNK))]
    val_seeds = [VAL_SEED_BASE + 1000 * seed + k for k in range(-(-n_val // CHUNK))]
    assert not set(train_seeds + val_seeds) & set(EVAL_SEEDS.values())
    x_train, y_train, _ = simulate_split(n_train, train_seeds, FIRST_ID["train"], bands, size)
    x_val, y_val, _ = simulate_split(n_val, val_seeds, FIRST_ID["val"], bands, size)
    sim_seconds = time.time() - started
    log.info("simulated %d + %d clusters in %.0f s", n_train, n_val, sim_seconds)

    t_mean = [float(v) for v in y_train.mean(axis=0)]
    t_std = [float(v) for v in y_train.std(axis=0)]
    kwargs = {"in_channels": len(bands), "widths": list(widths), "blocks": 1, "hidden": 256, "n_targets": 3,
              "target_mean": t_mean, "target_std": t_std}  # fmt: skip
    model = ClusterResNet(**kwargs).to(memory_format=torch.channels_last)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(n_train / batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                    pct_start=0.1)  # fmt: skip
    x_t, y_t = torch.from_numpy(x_train), torch.from_numpy(y_train)
    mean_t, std_t = torch.tensor(t_mean), torch.tensor(t_std)
    best: dict[str, Any] = {"nll": np.inf}
    history, stopped_by = [], "max epochs"
    for epoch in range(1, epochs + 1):
        t0 = time.time()
        model.train()
        order = torch.from_numpy(rng.permutation(n_train))
        total, seen = 0.0, 0
        for start in range(0, n_train, batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:
                continue
            x = _augment(x_t[idx], gen).contiguous(memory_format=torch.channels_last)
            y = (y_t[idx] - mean_t) / std_t
            mean, log_var = model(x)
            z = (mean - mean_t) / std_t
            lv = log_var - 2 * torch.log(std_t)  # log variance of the standardised target
            if epoch <= WARMUP_EPOCHS:
                loss = ((z - y) ** 2).mean() + 0.5 * (lv + (z.detach() - y) ** 2 / lv.exp()).mean()
            else:
                loss = 0.5 * (lv + (z - y) ** 2 / lv.exp()).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
            optimiser.step()
            scheduler.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        pred, sigma = predict(model, x_val)
        nll = _nll(pred, sigma, y_val)
        row = {"epoch": epoch, "train_loss": round(total / max(seen, 1), 5), "val_nll": round(nll, 5),
               "lr": optimiser.param_groups[0]["lr"], "seconds": round(time.time() - t0, 1),
               **{f"val_rmse_{t}": round(float(np.sqrt(np.mean((pred[:, k] - y_val[:, k]) ** 2))), 4)
                  for k, t in enumerate(TARGETS)}}  # fmt: skip
        history.append(row)
        log.info("epoch %s", row)
        if nll < best["nll"]:
            best = {"nll": nll, "epoch": epoch, "pred": pred, "sigma": sigma,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}  # fmt: skip
        mean_epoch = (time.time() - started - sim_seconds) / epoch
        if time_budget_s and epoch < epochs and time.time() - started + mean_epoch > time_budget_s:
            stopped_by = f"time budget ({time_budget_s:.0f} s)"
            log.info("stopping after epoch %d: %s", epoch, stopped_by)
            break

    model.load_state_dict(best["state"])
    model = model.to(memory_format=torch.contiguous_format).eval()
    scales = {t: _error_scale(best["pred"][:, k], best["sigma"][:, k], y_val[:, k]) for k, t in enumerate(TARGETS)}
    ranges = {"log_age": list(sim.LOG_AGE_RANGE), "log_mass": list(sim.LOG_MASS_RANGE), "log_rh": list(sim.LOG_RH_RANGE)}
    output_spec: dict[str, Any] = {}
    for t in TARGETS:
        output_spec[t] = {"unit": UNITS[t], "range": [ranges[t][0] - 0.3, ranges[t][1] + 0.3],
                          "training_range": ranges[t]}  # fmt: skip
        output_spec[f"{t}_err"] = {"unit": "dex", "scale": round(scales[t], 5)}
    from importlib.metadata import version as _version

    table = sim.load_table()
    meta = {
        "bundle_format": BUNDLE_FORMAT,
        "id": bundle_id,
        "task": TASK,
        "name": name,
        "version": version,
        "architecture": {"name": ARCHITECTURE, "kwargs": kwargs},
        "engine_io": {"inputs": ["image"], "outputs": ["params", "params_logvar"]},
        "input_spec": {"image": {
            "bands": list(bands), "shape": [len(bands), size, size], "dtype": "float32",
            "pixel_scale_arcsec": sim.PIXEL_SCALE_ARCSEC,
            "units": f"linear flux per pixel on the AB zero point {sim.FLUX_ZERO_POINT:g}, sky subtracted",
            "normalisation": "asinh(flux / softening) per band (survey_infer.imaging.asinh_transform)",
            "softening": softening(bands)}},  # fmt: skip
        "output_spec": output_spec,
        "training": {
            "simulator": "training.sim.clusters",
            "training_data": {
                "isochrones": table.provenance.get("isochrones"),
                "isochrone_table": "training/data/parsec_hst.npz (training/derive_isochrone_table.py)",
                "isochrone_sha256": table.provenance.get("isochrone_sha256"),
                "filters": table.provenance.get("filters"),
                "bolometric_corrections": table.provenance.get("magnitudes"),
                "imf": "Kroupa (2001), 0.08-120 Msun, stars drawn one by one up to the cluster mass",
                "priors": {"log_age": list(sim.LOG_AGE_RANGE), "log_mass": list(sim.LOG_MASS_RANGE),
                           "log_rh_pc": list(sim.LOG_RH_RANGE), "eff_gamma": list(sim.EFF_GAMMA_RANGE),
                           "av": list(sim.AV_RANGE), "field_sigma_msun_pc2": [3.0, 60.0]},  # fmt: skip
                "distance_kpc": sim.DISTANCE_KPC,
            },
            "seed": seed,
            "seeds": {"train": [train_seeds[0], train_seeds[-1]], "val": [val_seeds[0], val_seeds[-1]],
                      "clusters_per_seed": CHUNK, "reserved_for_evaluation": dict(EVAL_SEEDS)},  # fmt: skip
            "n_train": n_train,
            "n_val": n_val,
            "epochs_max": epochs,
            "epochs_run": len(history),
            "best_epoch": best["epoch"],
            "stopped_by": stopped_by,
            "batch_size": batch_size,
            "loss": "Gaussian NLL of the standardised (log age, log mass, log r_h) after 1 epoch of MSE warm-up",
            "head_choice": "Gaussian heads (mean + log variance per target), not binned softmax",
            "optimiser": {"name": "AdamW", "lr": lr, "weight_decay": 1e-4, "schedule": "OneCycle (cosine)",
                          "grad_clip_norm": GRAD_CLIP_NORM},  # fmt: skip
            "augmentation": "random 90-degree rotation and flip (exact)",
            "validation": {"nll": round(best["nll"], 5), **{k: v for k, v in history[best["epoch"] - 1].items()
                                                             if k.startswith("val_rmse")}},  # fmt: skip
            "error_scales": {t: round(v, 5) for t, v in scales.items()},
            "history": history,
            "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
                         "survey-infer": _version("survey-infer")},  # fmt: skip
            "threads": torch.get_num_threads(),
            "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "simulation_seconds": round(sim_seconds, 1),
            "wall_time_s": round(time.time() - started, 1),
        },
        "files": {},
    }
    return write_bundle(Path(out_dir), bundle_id, meta, model)


def main(argv: list[str] | None = None) -> None:
    """``python -m training.train_star_clusters OUT_DIR --n-train N --n-val N --epochs E``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n-train", type=int, required=True)
    parser.add_argument("--n-val", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bands", default=",".join(sim.BANDS))
    parser.add_argument("--widths", default="24,48,96,192")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--name", default="resnet64")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--time-budget-s", type=float, default=None)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-export", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    bundle_dir = train_star_clusters(
        args.out_dir, n_train=args.n_train, n_val=args.n_val, epochs=args.epochs, seed=args.seed,
        bands=tuple(args.bands.split(",")), widths=tuple(int(w) for w in args.widths.split(",")),
        batch_size=args.batch_size, lr=args.lr, name=args.name, version=args.version, threads=args.threads,
        time_budget_s=args.time_budget_s, overwrite=args.overwrite,
    )  # fmt: skip
    if not args.no_export:
        from deploy.export import export_onnx

        export_onnx(bundle_dir)
    print(bundle_dir)


if __name__ == "__main__":
    main()
