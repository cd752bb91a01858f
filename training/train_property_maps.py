"""Train the property_maps U-Net (PICASSSO) on mock ugriz galaxies with gas and write a model bundle.

Data: ``training.mock_property_maps.simulate_block`` mocks (the universe with its gas, images in linear surface
brightness), simulated in memory, CHUNK galaxies per seed: TRAIN_SEED_BASE + k (training), VAL_SEED_BASE + k
(validation); ``EVAL_SEEDS`` are reserved for ``bench/accuracy_property_maps.py`` and trust, never trained on.

Input: ``asinh(surface brightness / softening_band)``, the softening about the sky noise of one native pixel
per arcsec^2 (recorded in the bundle). Targets: the six log10 maps, standardised per map (the standardisation
is part of the model, so the engine returns physical log10 values).

Loss (the paper's, plus two heads): per pixel and map w (mu - y)^2 with w = 1 on non-empty pixels and 1e-6 on
empty ones (the paper's tiny weight; empty targets filled with the map's mean), + the Gaussian NLL of y given
the *detached* mu for the log-variance head (per-pixel uncertainties; the mean is trained by the paper's loss
alone) + binary cross-entropy of the empty-pixel logit. Augmentation: the 8 exact rotations/flips (the paper's
90-degree rotations, flips and transposes) applied to images and maps together.

Recipe changes for a CPU budget (the paper: Adam lr 1e-5, 13 epochs, batch 16, 27,558 Illustris pairs at
256 px): narrower U-Net (``--width``, default 10 -> 160 at the bottleneck, paper 64 -> 1024), AdamW with a
one-cycle schedule peaking at ``--lr``, batch 32, best epoch by validation MSE on non-empty pixels, a time
budget. One torch thread by default.
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
from survey_infer.models import PropertyUNet
from survey_infer.imaging import asinh_transform
from survey_infer.tasks.property_maps import MAP_NAMES, MAP_UNITS
from training.mock_property_maps import BANDS, IMAGE_UNITS, simulate_block
from training.sim.universe import (
    ELECTRONS_PER_NMGY, EMPTY_SIGMA_MSUN_KPC2, EMPTY_SIGMA_SFR, FOV_IN_HALF_LIGHT_RADII, KS_A, KS_N,
    PIXEL_SCALE_ARCSEC, PROPERTY_MAP_NAMES, SKY_MAG_ARCSEC2,
)  # fmt: skip
from training.train import _error_scale, write_bundle

log = logging.getLogger(__name__)

TASK = "property_maps"
ARCHITECTURE = "property_unet"
CHUNK = 500
TRAIN_SEED_BASE = 5_000_000
VAL_SEED_BASE = 6_000_000
EVAL_SEEDS = {"test": 940_001, "trust_fit": 933_001, "trust_held_out": 933_002}
FIRST_ID = {"train": 0, "val": 100_000_000}
EMPTY_WEIGHT = 1e-6
GRAD_CLIP_NORM = 5.0
EVAL_BATCH = 128

assert tuple(MAP_NAMES) == tuple(PROPERTY_MAP_NAMES)


def softening(bands: tuple[str, ...]) -> list[float]:
    """Per band: the sky noise of one native SDSS pixel, in nanomaggies per arcsec^2 (the asinh softening)."""
    area = PIXEL_SCALE_ARCSEC**2
    out = []
    for b in bands:
        sky = 10 ** (-0.4 * (SKY_MAG_ARCSEC2[b] - 22.5)) * area  # nmgy per native pixel
        out.append(round(float(np.sqrt(sky / ELECTRONS_PER_NMGY[b]) / area), 5))
    return out


def chunk_seeds(base: int, n: int) -> list[int]:
    return [base + k for k in range(math.ceil(n / CHUNK))]


def simulate_split(n: int, seeds: list[int], first_id: int, size: int, bands: tuple[str, ...] = BANDS):
    """Network inputs (n, C, S, S) float32, target maps (n, 6, S, S) float32 (NaN = empty) and the truth."""
    images, maps, truths = [], [], []
    done = 0
    for s in seeds:
        count = min(CHUNK, n - done)
        if count <= 0:
            break
        sim = simulate_block(count, size, s, first_id + done, BANDS)
        keep = [BANDS.index(b) for b in bands]
        images.append(asinh_transform(sim.images[:, keep], softening(bands)))
        maps.append(sim.property_maps)
        truths.append(sim.truth)
        done += count
    truth = {k: np.concatenate([t[k] for t in truths]) for k in truths[0]}
    return np.concatenate(images), np.concatenate(maps), truth


def _d4(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = x.flip(-1) if flip else x
    return torch.rot90(x, k, dims=(-2, -1))


def _augment_pair(images: torch.Tensor, maps: torch.Tensor, generator: torch.Generator):
    """One random element of D4 per batch sub-group (exact), the same for image and maps."""
    out_i, out_m = images.clone(), maps.clone()
    k = torch.randint(0, 4, (len(images),), generator=generator)
    flip = torch.randint(0, 2, (len(images),), generator=generator).bool()
    for r in range(4):
        for f in (False, True):
            sel = (k == r) & (flip == f)
            if sel.any():
                out_i[sel] = _d4(images[sel], r, f)
                out_m[sel] = _d4(maps[sel], r, f)
    return out_i, out_m


def _losses(model: PropertyUNet, x: torch.Tensor, y: torch.Tensor, empty: torch.Tensor):
    """(paper's weighted MSE, variance-head NLL, empty BCE) on standardised targets ``y`` (0 where empty)."""
    mu, log_var, logit, _ = model.forward_standardised(x)
    w = torch.where(empty, torch.full_like(y, EMPTY_WEIGHT), torch.ones_like(y))
    mse = (w * (mu - y) ** 2).mean()
    nll = (w * 0.5 * (log_var + (y - mu.detach()) ** 2 * torch.exp(-log_var))).mean()
    bce = nn.functional.binary_cross_entropy_with_logits(logit, empty.float())
    return mse, nll, bce


@torch.inference_mode()
def predict(model: PropertyUNet, images: np.ndarray, batch: int = EVAL_BATCH):
    """Physical log10 maps, their sigma (dex, before any scale) and the empty probability, as numpy."""
    model.eval()
    means, sigmas, empties = [], [], []
    for start in range(0, len(images), batch):
        mean, log_var, logit = model(torch.from_numpy(images[start : start + batch]))[:3]
        means.append(mean.numpy())
        sigmas.append(np.exp(0.5 * log_var.numpy()))
        empties.append(torch.sigmoid(logit).numpy())
    return np.concatenate(means), np.concatenate(sigmas), np.concatenate(empties)


def train_property_maps(
    out_dir: Path, *, n_train: int, n_val: int, epochs: int, size: int = 64, bands: tuple[str, ...] = BANDS,
    width: int = 10, depth: int = 4, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
    name: str | None = None, version: int = 1, threads: int = 1, time_budget_s: float | None = None,
    overwrite: bool = False,
) -> Path:
    started = time.time()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    name = name or f"unet{size}"
    bundle_id = f"{TASK}-{name}-v{version}"
    if (Path(out_dir) / bundle_id).exists() and not overwrite:
        raise FileExistsError(f"{Path(out_dir) / bundle_id} exists (use --overwrite)")
    tick = time.time()
    train_seeds, val_seeds = chunk_seeds(TRAIN_SEED_BASE, n_train), chunk_seeds(VAL_SEED_BASE, n_val)
    x_train, m_train, _ = simulate_split(n_train, train_seeds, FIRST_ID["train"], size, bands)
    x_val, m_val, _ = simulate_split(n_val, val_seeds, FIRST_ID["val"], size, bands)
    sim_seconds = time.time() - tick
    log.info("simulated %d + %d mocks in %.0f s", n_train, n_val, sim_seconds)
    empty_train = np.isnan(m_train)
    mean = [float(np.nanmean(m_train[:, k])) for k in range(len(MAP_NAMES))]
    std = [float(np.nanstd(m_train[:, k])) for k in range(len(MAP_NAMES))]
    mu_, sd_ = np.array(mean, np.float32)[None, :, None, None], np.array(std, np.float32)[None, :, None, None]
    y_train = np.where(empty_train, 0.0, (m_train - mu_) / sd_).astype(np.float32)
    del m_train
    kwargs = {"in_channels": len(bands), "n_maps": len(MAP_NAMES), "width": width, "depth": depth,
              "target_mean": mean, "target_std": std}  # fmt: skip
    model = PropertyUNet(**kwargs)
    steps_per_epoch = math.ceil(n_train / batch_size)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    total_steps = epochs * steps_per_epoch
    train_started = time.time()

    def progress(step: int) -> float:
        """Share of the schedule done: by steps, or by the time budget if that runs out first."""
        done = step / total_steps
        if time_budget_s is not None:
            done = max(done, (time.time() - train_started) / max(time_budget_s - (train_started - started), 1.0))
        return min(done, 1.0)

    def set_lr(step: int) -> None:  # one cycle: linear warm-up over 10%, cosine decay to 1% of the peak
        p = progress(step)
        value = lr * (p / 0.1) if p < 0.1 else lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (p - 0.1) / 0.9)))
        for group in optimiser.param_groups:
            group["lr"] = value
    generator = torch.Generator().manual_seed(seed)
    xt, yt, et = torch.from_numpy(x_train), torch.from_numpy(y_train), torch.from_numpy(empty_train)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"mse": math.inf}
    stopped_by = "epochs"
    val_empty = np.isnan(m_val)
    step_count = 0
    for epoch in range(1, epochs + 1):
        model.train()
        tick = time.time()
        order = torch.randperm(n_train, generator=generator)
        totals = np.zeros(3)
        steps_run = 0
        for step in range(steps_per_epoch):
            if time_budget_s is not None and progress(step_count) >= 1.0:
                break  # the schedule has ended: validate what was trained
            steps_run += 1
            idx = order[step * batch_size : (step + 1) * batch_size]
            x, y = _augment_pair(xt[idx], torch.cat([yt[idx], et[idx].float()], dim=1), generator)
            y, empty = y[:, : len(MAP_NAMES)], y[:, len(MAP_NAMES) :] > 0.5
            mse, nll, bce = _losses(model, x, y, empty)
            loss = mse + nll + 0.1 * bce
            set_lr(step_count)
            step_count += 1
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
            optimiser.step()
            totals += [mse.item(), nll.item(), bce.item()]
        pred, sigma, p_empty = predict(model, x_val)
        delta = m_val - pred
        val_mse_std = float(np.nanmean((delta / sd_) ** 2))
        totals = [float(t) * steps_per_epoch / max(steps_run, 1) for t in totals]
        entry = {"epoch": epoch, "train_mse": round(totals[0] / steps_per_epoch, 5),
                 "train_nll": round(totals[1] / steps_per_epoch, 5), "train_bce": round(totals[2] / steps_per_epoch, 5),
                 "val_mse_standardised": round(val_mse_std, 5),
                 "val_empty_accuracy": round(float(((p_empty > 0.5) == val_empty).mean()), 4),
                 **{f"val_scatter_{n}": round(float(np.nanstd(delta[:, k])), 4) for k, n in enumerate(MAP_NAMES)},
                 "seconds": round(time.time() - tick, 1)}  # fmt: skip
        history.append(entry)
        log.info("%s", entry)
        if val_mse_std < best["mse"]:
            best = {"mse": val_mse_std, "epoch": epoch,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}  # fmt: skip
        if time_budget_s is not None and epoch < epochs and progress(step_count) >= 1.0:
            stopped_by = f"time budget {time_budget_s:.0f} s (the learning-rate schedule follows it)"
            break
    model.load_state_dict(best["state"])
    pred, sigma, p_empty = predict(model, x_val)
    scales = {}
    for k, n in enumerate(MAP_NAMES):
        ok = ~np.isnan(m_val[:, k])
        scales[n] = _error_scale(pred[:, k][ok].astype(np.float64), sigma[:, k][ok].astype(np.float64),
                                 m_val[:, k][ok].astype(np.float64))  # fmt: skip
    output_spec = {
        "maps": {"names": list(MAP_NAMES), "units": [MAP_UNITS[n] for n in MAP_NAMES]},
        "maps_err": {"unit": "dex", "scale": [round(scales[n], 5) for n in MAP_NAMES]},
        "empty_probability_threshold": 0.5,
    }
    input_spec = {
        "image": {
            "bands": list(bands), "shape": [len(bands), size, size], "dtype": "float32",
            "image_units": IMAGE_UNITS, "softening": softening(bands),
            "normalisation": "asinh(surface brightness [nmgy/arcsec^2] / softening_band) (task property_maps)",
            "framing": {"kind": "half_light_radii", "fov": FOV_IN_HALF_LIGHT_RADII},
        }
    }  # fmt: skip
    meta = {
        "bundle_format": BUNDLE_FORMAT,
        "id": bundle_id,
        "task": TASK,
        "name": name,
        "version": version,
        "architecture": {"name": ARCHITECTURE, "kwargs": kwargs},
        "engine_io": {"inputs": ["image"], "outputs": ["maps", "maps_logvar", "empty_logit", "features"]},
        "input_spec": input_spec,
        "output_spec": output_spec,
        "training": {
            "data": {
                "simulator": "training.mock_property_maps.simulate_block (universe + gas, property_maps=True)",
                "image_units": IMAGE_UNITS, "size": size, "bands": list(bands),
                "gas": f"Kennicutt-Schmidt A={KS_A}, N={KS_N} inverted on the stars' SFR map + extended "
                       "exponential atomic disc (training.sim.universe._property_maps)",
                "empty": f"surface density < {EMPTY_SIGMA_MSUN_KPC2:g} Msun/kpc^2, SFR < {EMPTY_SIGMA_SFR:.3g}",
            },  # fmt: skip
            "seed": seed,
            "seeds": {"train": [train_seeds[0], train_seeds[-1]], "val": [val_seeds[0], val_seeds[-1]],
                      "galaxies_per_seed": CHUNK, "reserved_for_evaluation": dict(EVAL_SEEDS)},  # fmt: skip
            "n_train": n_train, "n_val": n_val, "epochs_max": epochs, "epochs_run": len(history),
            "best_epoch": best["epoch"], "stopped_by": stopped_by, "batch_size": batch_size,
            "loss": "mean over pixels and maps of w (mu - y)^2 on standardised log10 maps, w = 1 (non-empty) or "
                    f"{EMPTY_WEIGHT:g} (empty) + Gaussian NLL of y given detached mu (log-variance head) + "
                    "0.1 BCE(empty logit)",
            "optimiser": {"name": "AdamW", "lr": lr, "weight_decay": 1e-4, "schedule": "one cycle (10% linear warm-up, cosine to 1%) over the planned steps or the time budget, whichever ends first",
                          "grad_clip_norm": GRAD_CLIP_NORM},  # fmt: skip
            "augmentation": "random element of D4 (90-degree rotations x flip) per galaxy, image and maps together",
            "error_scales": {n: round(v, 5) for n, v in scales.items()},
            "history": history,
            "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
            "threads": torch.get_num_threads(),
            "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "simulation_seconds": round(sim_seconds, 1),
            "wall_time_s": round(time.time() - started, 1),
            "paper_differences": [
                "mock universe (analytic components, BC03, dust) instead of Illustris; field of view 10 half-light "
                "radii at 64 px instead of 10 half-mass radii at 256 px",
                f"U-Net width {width} doubling to {width * 2**depth} (paper 64 -> 1024), AdamW one-cycle lr {lr} "
                "(paper Adam 1e-5, 13 epochs)",
                "extra heads: per-pixel Gaussian log variance (NLL on the detached mean) and an empty-pixel logit",
            ],
        },
        "files": {},
    }
    model.emit_features = True
    return write_bundle(Path(out_dir), bundle_id, meta, model)


def main(argv: list[str] | None = None) -> None:
    """``python -m training.train_property_maps OUT_DIR --n-train N --n-val N --epochs E``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n-train", type=int, required=True)
    parser.add_argument("--n-val", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--bands", default=",".join(BANDS))
    parser.add_argument("--width", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None)
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--time-budget-s", type=float, default=None)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-export", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    bundle_dir = train_property_maps(
        args.out_dir, n_train=args.n_train, n_val=args.n_val, epochs=args.epochs, size=args.size,
        bands=tuple(args.bands.split(",")), width=args.width, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, name=args.name, version=args.version, threads=args.threads,
        time_budget_s=args.time_budget_s, overwrite=args.overwrite,
    )  # fmt: skip
    if not args.no_export:
        from deploy.export import export_onnx

        export_onnx(bundle_dir)
    print(bundle_dir)


if __name__ == "__main__":
    main()
