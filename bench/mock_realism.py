"""Realism of the mock universe (issue 4): M/L_g distribution, colour-M/L relation, example cutouts, speed.

    python bench/mock_realism.py [--n 10000] [--out bench/results/] [--seed 0]

On ``--n`` galaxies from ``training.sim.universe.simulate`` (69 px, g band) it reports, as a plain-text table
(printed and written to ``OUT/mock_realism.txt``):

- percentiles (1, 16, 50, 84, 99) of the true M/L_g and the fraction inside [0, 4] (the workshop's span);
- least-squares fits of log10 M/L_g = a + b (g - i) with (1) the true rest-frame g - i and (2) the
  observed-frame colour mag_g - mag_i (noise-free model magnitudes, so it includes the K-correction) with
  ``PHOTOMETRIC_NOISE_MAG`` = 0.03 mag of Gaussian noise added to each band independently (a typical SDSS
  model-magnitude error for r < 17.77 galaxies); slope b, intercept a and rms scatter (dex) of each, beside
  literature relations for the SDSS g band and g - i (see ``LITERATURE``), and how far the mocks lie from them;
- generation speed: ``simulate(4096, size=69)`` and ``simulate(1024, size=128)``, single process, after one
  warm-up call (the first call loads or builds the SSP table cache); cutouts/s per core is N over the process
  CPU time, cutouts/s wall is N over the wall time (lower when other processes share the cores);
- determinism: two calls with the same seed give bit-identical images and truth.

Single core: OMP/OPENBLAS/MKL/NUMEXPR thread counts are set to 1 below, *before* numpy is imported, so every
number here is one core's work (scipy.fft runs on one worker by default).

Figures in OUT: ``mock_realism.png`` (M/L_g histogram, colour-M/L plane with the fits and literature lines,
M/L_g against B/T and against stellar mass), ``mock_cutouts.png`` (69 px g-band examples spanning the M/L
range, and a row of 128 px ugriz mocks shown as g/r/i composites), ``mock_maps.png`` (truth maps of a few
128 px ugriz mocks).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # one core: the speed figures are per core

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from training.evaluate import PHOTOMETRIC_NOISE_MAG, fit_colour_relation, observed_colour  # noqa: E402
from training.sim.universe import MAP_NAMES, simulate  # noqa: E402

# The SSPs of the mocks are BC03 with a Chabrier IMF. Bell et al. (2003) use a "diet Salpeter" IMF; their
# log M/L is converted to Chabrier by adding CHABRIER_MINUS_DIET_SALPETER (Chabrier stars weigh ~0.1 dex less
# at fixed light: Bell et al. 2003 give -0.15 dex for Kroupa/Kennicutt; -0.1 dex is the usual Chabrier value).
CHABRIER_MINUS_DIET_SALPETER = -0.1
# log10 M/L_g = a + b (g - i), SDSS g band. The coefficients are as quoted from the papers' tables; the search
# tools available when this was written could not open either table itself. A secondary source (A&A 2026,
# aa57968-25, Table 2) confirms Zibetti et al.'s r-band g - i relation (a_r = -0.977, b_r = 1.157), which with
# the colour shift log M/L_g - log M/L_r = 0.4 [(g - r) - (g - r)_sun] agrees with the g-band row below.
LITERATURE = [
    # (label, a as published, b, IMF offset applied to a, note)
    ("Bell+03 (diet Salp. -> Chabrier -0.1)", -0.379, 0.914, CHABRIER_MINUS_DIET_SALPETER,
     "Bell, McIntosh, Katz & Weinberg 2003, ApJS 149, 289, Table 7 (g band, g-i)"),
    ("Zibetti+09 (Chabrier)", -1.197, 1.431, 0.0,
     "Zibetti, Charlot & Rix 2009, MNRAS 400, 1181, Table B1 (g band, g-i)"),
]  # fmt: skip
ISSUE_SLOPE = (1.0, 1.5)  # dex/mag, the issue's "known from the literature" range
ISSUE_SCATTER = (0.1, 0.2)  # dex
ML_SPAN = (0.0, 4.0)


# ------------------------------------------------------------------------------------------------ numbers
def speed(n: int, size: int, seed: int) -> dict:
    """Cutouts/s per core (CPU time) and wall, for one simulate() call after the caller's warm-up."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    simulate(n, size=size, seed=seed)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"n": n, "size": size, "wall_s": wall, "cpu_s": cpu, "per_core": n / cpu, "wall_rate": n / wall}


def identical(a, b) -> bool:
    if not np.array_equal(a.images, b.images):
        return False
    return a.truth.keys() == b.truth.keys() and all(np.array_equal(a.truth[k], b.truth[k]) for k in a.truth)


def other_load() -> str:
    try:
        one, five, _ = os.getloadavg()
        return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"
    except OSError:
        return "load average unavailable"


# ------------------------------------------------------------------------------------------------ figures
def realism_figure(truth: dict, obs_gi: np.ndarray, fits: dict, path: Path) -> None:
    ml = truth["ml_g"]
    log_ml = np.log10(ml)
    gi = truth["g_i"]
    quenched = truth["quenched"].astype(bool)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.6))

    ax = axes[0, 0]
    ax.hist(np.clip(ml, 0, 6), bins=np.linspace(0, 6, 61), color="0.35")
    ax.axvspan(*ML_SPAN, color="tab:green", alpha=0.12, label="workshop span 0-4")
    inside = np.mean((ml >= ML_SPAN[0]) & (ml <= ML_SPAN[1]))
    ax.set(xlabel="M*/L_g (Msun/Lsun, true)", ylabel="galaxies", xlim=(0, 6),
           title=f"(a) M/L_g: median {np.median(ml):.2f}, {100 * inside:.1f}% in [0, 4] (>6 piled at 6)")  # fmt: skip
    ax.legend(loc="upper right")

    ax = axes[0, 1]
    for mask, colour, label in ((~quenched, "tab:blue", "star-forming"), (quenched, "tab:red", "quenched")):
        ax.scatter(gi[mask], log_ml[mask], s=1.5, c=colour, alpha=0.35, lw=0, label=label, rasterized=True)
    x = np.linspace(np.percentile(gi, 0.2) - 0.05, np.percentile(gi, 99.8) + 0.05, 50)
    a, b, s = fits["true"]
    ax.plot(x, a + b * x, "k-", lw=2, label=f"fit, true g-i: b={b:.2f}, rms {s:.3f} dex")
    a, b, s = fits["observed"]
    label = f"fit, observed g-i +{PHOTOMETRIC_NOISE_MAG} mag: b={b:.2f}, rms {s:.3f}"
    ax.plot(x, a + b * x, "k--", lw=1.5, label=label)
    for (label, a_lit, b_lit, offset, _), style in zip(LITERATURE, (("tab:orange", "-."), ("tab:purple", ":"))):
        ax.plot(x, a_lit + offset + b_lit * x, color=style[0], ls=style[1], lw=2, label=f"{label}: b={b_lit}")
    ax.set(xlabel="g - i (points: true rest frame; dashed line: fit on observed-frame g - i)",
           ylabel="log10 M*/L_g", title="(b) colour-M/L relation")
    ax.legend(loc="upper left", fontsize=7, markerscale=6)

    ax = axes[1, 0]
    bt = truth["bt_light_g"]
    sc = ax.scatter(bt, ml, s=1.5, c=truth["log_mstar"], cmap="viridis", alpha=0.5, lw=0, rasterized=True)
    edges = np.linspace(0, 1, 11)
    centres, med, lo, hi = running(bt, ml, edges)
    ax.plot(centres, med, "k-o", ms=3, label="median")
    ax.fill_between(centres, lo, hi, color="k", alpha=0.15, label="16-84%")
    fig.colorbar(sc, ax=ax, label="log10 M*/Msun")
    ax.set(xlabel="B/T (g-band light)", ylabel="M*/L_g", ylim=(0, 6), title="(c) M/L_g against bulge fraction")
    ax.legend(loc="upper left", fontsize=8)

    ax = axes[1, 1]
    mstar = truth["log_mstar"]
    edges = np.linspace(9.0, 11.8, 15)
    for mask, colour, label in ((~quenched, "tab:blue", "star-forming"), (quenched, "tab:red", "quenched"),
                                (np.ones_like(quenched), "k", "all")):  # fmt: skip
        centres, med, lo, hi = running(mstar[mask], ml[mask], edges)
        ax.plot(centres, med, "-o", color=colour, ms=3, label=f"{label} (median, 16-84%)")
        ax.fill_between(centres, lo, hi, color=colour, alpha=0.12)
    ax.set(xlabel="log10 M*/Msun", ylabel="M*/L_g", ylim=(0, 6), title="(d) M/L_g against stellar mass")
    ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"Mock universe realism: {len(ml)} galaxies (training.sim.universe, BC03 Chabrier)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def running(x, y, edges):
    centres, med, lo, hi = [], [], [], []
    for left, right in zip(edges[:-1], edges[1:]):
        sel = (x >= left) & (x < right) if right < edges[-1] else (x >= left) & (x <= right)
        if sel.sum() >= 10:
            p16, p50, p84 = np.percentile(y[sel], [16, 50, 84])
            centres.append(0.5 * (left + right)), med.append(p50), lo.append(p16), hi.append(p84)
    return np.array(centres), np.array(med), np.array(lo), np.array(hi)


def composite(images: np.ndarray) -> np.ndarray:
    """(5, S, S) ugriz in [-1, 1] -> (S, S, 3) RGB from i, r, g. Each band was log-scaled on its own, so the
    hues are a display aid only (not physical colours)."""
    rgb = np.stack([images[3], images[2], images[1]], axis=-1)
    return np.clip((rgb + 1.0) / 2.0, 0.0, 1.0)


def cutouts_figure(sim69, sim128, path: Path, rows: int = 4, cols: int = 6) -> None:
    ml = sim69.truth["ml_g"]
    order = np.argsort(ml)
    picks = order[np.linspace(0, len(ml) - 1, rows * cols).round().astype(int)]  # evenly spread in M/L rank
    fig, axes = plt.subplots(rows + 1, cols, figsize=(1.9 * cols, 2.05 * (rows + 1)))
    for ax, k in zip(axes[:rows].ravel(), picks):
        ax.imshow(sim69.images[k, 0], cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        t = sim69.truth
        ax.set_title(f"M/L={t['ml_g'][k]:.2f} B/T={t['bt_light_g'][k]:.2f}\ncos i={t['cos_i'][k]:.2f}", fontsize=7)
    for ax, k in zip(axes[rows], range(cols)):
        ax.imshow(composite(sim128.images[k]), interpolation="nearest")
        t = sim128.truth
        ax.set_title(f"128px gri  M/L={t['ml_g'][k]:.2f}\nB/T={t['bt_light_g'][k]:.2f} cos i={t['cos_i'][k]:.2f}",
                     fontsize=7)  # fmt: skip
    for ax in axes.ravel():
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("Mock cutouts: rows 1-4 69 px g band (log-scaled, [-1, 1]) ordered by M/L_g; "
                 "row 5 128 px ugriz as i/r/g composite", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=64)
    plt.close(fig)


def maps_figure(sim, path: Path, count: int = 3) -> None:
    labels = {"log_mstar": "log M* per px (Msun)", "log_age": "mass-weighted log age (yr)",
              "log_z": "mass-weighted log Z/Zsun", "log_sfr": "log SFR per px (Msun/yr)"}  # fmt: skip
    fig, axes = plt.subplots(count, 2 + len(MAP_NAMES), figsize=(2.3 * (2 + len(MAP_NAMES)), 2.4 * count))
    order = np.argsort(sim.truth["bt_light_g"])
    shown = order[np.linspace(0, len(order) - 1, count).round().astype(int)]  # from disc- to bulge-dominated
    for row, k in enumerate(shown):
        axes[row, 0].imshow(sim.images[k, 1], cmap="gray", vmin=-1, vmax=1)
        axes[row, 0].set_title(f"g band  M/L={sim.truth['ml_g'][k]:.2f}", fontsize=7)
        axes[row, 1].imshow(composite(sim.images[k]))
        axes[row, 1].set_title(f"i/r/g  B/T={sim.truth['bt_light_g'][k]:.2f}", fontsize=7)
        mass = sim.maps[k, 0]
        for j, name in enumerate(MAP_NAMES):
            m = sim.maps[k, j].astype(np.float64)
            visible = mass > mass.max() - 3.0  # within 3 dex of the peak surface density
            if name == "log_sfr":
                visible &= m > -20  # -30 is the floor of pixels without star formation
            m = np.where(visible, m, np.nan)
            vmin, vmax = (np.nanmin(m), np.nanmax(m)) if visible.any() else (0.0, 1.0)
            im = axes[row, 2 + j].imshow(m, cmap="magma" if name != "log_age" else "RdYlBu_r", vmin=vmin, vmax=vmax)
            fig.colorbar(im, ax=axes[row, 2 + j], fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)
            axes[row, 2 + j].set_title(labels[name], fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("Truth maps (no PSF, no noise) of 128 px ugriz mocks; maps blank where M* < 1e-3 of the peak",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=64)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="galaxies for the statistics (69 px, g band)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speed-n", type=int, default=4096, help="cutouts timed at 69 px (128 px: a quarter)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print("command: " + shlex.join([sys.executable, *sys.argv]), flush=True)

    lines: list[str] = []

    def out(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    t0 = time.perf_counter()
    sim = simulate(args.n, size=69, seed=args.seed)  # also the warm-up of the SSP table cache
    t_stats = time.perf_counter() - t0
    truth = sim.truth
    ml = np.asarray(truth["ml_g"], dtype=np.float64)
    log_ml = np.log10(ml)
    obs_gi = observed_colour(truth, np.random.default_rng(args.seed + 1))
    fits = {"true": fit_colour_relation(truth["g_i"], log_ml), "observed": fit_colour_relation(obs_gi, log_ml)}
    obs_free = fit_colour_relation(truth["mag_g"] - truth["mag_i"], log_ml)  # observed frame without noise, for reference

    # speed and determinism (single process, 1 thread); the statistics run above warmed the SSP table
    simulate(64, size=69, seed=args.seed + 7)  # warm-up of the 69 px path
    s69 = speed(args.speed_n, 69, args.seed + 11)
    simulate(16, size=128, seed=args.seed + 7)
    s128 = speed(max(args.speed_n // 4, 1), 128, args.seed + 12)
    det_a = simulate(512, size=69, seed=args.seed + 3)
    det_b = simulate(512, size=69, seed=args.seed + 3)
    det_c = simulate(512, size=69, seed=args.seed + 4)
    deterministic = identical(det_a, det_b)
    seed_changes = not np.array_equal(det_a.images, det_c.images)
    ugriz = simulate(8, size=128, seed=args.seed + 5, bands=("u", "g", "r", "i", "z"), maps=True)
    det_maps = simulate(8, size=128, seed=args.seed + 5, bands=("u", "g", "r", "i", "z"), maps=True)
    deterministic_maps = identical(ugriz, det_maps) and np.array_equal(ugriz.maps, det_maps.maps)

    rule = "-" * 100
    out(rule)
    out(f"date        {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    out(f"machine     {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores; numpy "
        f"{np.__version__}, Python {platform.python_version()}")  # fmt: skip
    out(f"sample      {args.n} galaxies, simulate(n, size=69, seed={args.seed}, bands=('g',)) in {t_stats:.1f} s "
        f"(incl. SSP table load)")  # fmt: skip
    out(rule)
    pct = np.percentile(ml, [1, 16, 50, 84, 99])
    out("M*/L_g (true, Msun/Lsun)      p1      p16     p50     p84     p99    mean   in [0,4]   > 4")
    out(f"{'':28}" + "".join(f"{v:8.3f}" for v in pct) + f"{ml.mean():8.3f}"
        f"{100 * np.mean((ml >= 0) & (ml <= 4)):9.1f}%{100 * np.mean(ml > 4):6.1f}%")  # fmt: skip
    out(f"quenched fraction {np.mean(truth['quenched']):.3f}; median M/L_g star-forming "
        f"{np.median(ml[~truth['quenched']]):.3f}, quenched {np.median(ml[truth['quenched']]):.3f}")  # fmt: skip
    out(rule)
    out("log10 M/L_g = a + b (g - i)                              a        b    rms (dex)  IMF offset in a")
    out(f"{'fit, true rest-frame g-i':52}{fits['true'][0]:8.3f} {fits['true'][1]:8.3f} {fits['true'][2]:9.3f}")
    out(f"{'fit, observed-frame g-i, +0.03 mag noise per band':52}{fits['observed'][0]:8.3f} "
        f"{fits['observed'][1]:8.3f} {fits['observed'][2]:9.3f}")  # fmt: skip
    out(f"{'fit, observed-frame g-i, no noise (reference)':52}{obs_free[0]:8.3f} {obs_free[1]:8.3f} {obs_free[2]:9.3f}")
    for label, a_lit, b_lit, offset, _ in LITERATURE:
        out(f"{label + ' (as quoted)':52}{a_lit + offset:8.3f} {b_lit:8.3f} {'':>9}  {offset:+.2f} dex")
    for label, a_lit, b_lit, offset, _ in LITERATURE:
        resid = log_ml - (a_lit + offset + b_lit * truth["g_i"])
        out(f"  mocks about {label}: mean offset {resid.mean():+.3f} dex, rms {np.sqrt(np.mean(resid**2)):.3f} dex "
            f"(true g-i)")  # fmt: skip
    out(f"  literature scatter for comparison: ~0.1-0.2 dex (issue); g-i range of the mocks (p1-p99) "
        f"{np.percentile(truth['g_i'], 1):.2f} to {np.percentile(truth['g_i'], 99):.2f} mag")  # fmt: skip
    for key, name in (("true", "true g-i"), ("observed", "observed g-i + noise")):
        a, b, s = fits[key]
        out(f"  {name:22} slope in [{ISSUE_SLOPE[0]:g}, {ISSUE_SLOPE[1]:g}]: "
            f"{'yes' if ISSUE_SLOPE[0] <= b <= ISSUE_SLOPE[1] else 'no'} (b={b:.3f}); scatter in "
            f"[{ISSUE_SCATTER[0]:g}, {ISSUE_SCATTER[1]:g}]: "
            f"{'yes' if ISSUE_SCATTER[0] <= s <= ISSUE_SCATTER[1] else 'no'} ({s:.3f} dex)")  # fmt: skip
    out(rule)
    out("generation speed (1 process, 1 thread)       N    wall (s)   CPU (s)  cutouts/s/core  cutouts/s wall")
    for s in (s69, s128):
        out(f"  simulate(N, size={s['size']:<3})               {s['n']:6d} {s['wall_s']:10.2f} {s['cpu_s']:9.2f} "
            f"{s['per_core']:15.0f} {s['wall_rate']:15.0f}")  # fmt: skip
    out(f"  target >= 500 cutouts/s per core at 69 px: {'yes' if s69['per_core'] >= 500 else 'no'}; "
        f"100k 69 px cutouts take {1e5 / s69['per_core'] / 60:.1f} CPU-min")  # fmt: skip
    out(f"  machine during the timing: {other_load()} (per-core rate uses this process's CPU time)")
    out(f"deterministic (same seed -> identical images and truth, 512 x 69 px): {'yes' if deterministic else 'no'}; "
        f"ugriz 128 px with maps: {'yes' if deterministic_maps else 'no'}; "
        f"another seed differs: {'yes' if seed_changes else 'no'}")  # fmt: skip
    out(rule)
    out(f"photometric noise added to observed colours: {PHOTOMETRIC_NOISE_MAG} mag Gaussian per band (g and i)")
    out(f"IMF: mocks are BC03 Chabrier; Bell+03 diet-Salpeter zero point shifted by {CHABRIER_MINUS_DIET_SALPETER:+.2f}"
        " dex; Zibetti+09 is Chabrier (no shift)")  # fmt: skip
    for label, _, _, _, ref in LITERATURE:
        out(f"{label}: {ref}")

    realism_figure(truth, obs_gi, fits, args.out / "mock_realism.png")
    sim128 = simulate(6, size=128, seed=args.seed + 6, bands=("u", "g", "r", "i", "z"))
    cutouts_figure(sim, sim128, args.out / "mock_cutouts.png")
    maps_figure(ugriz, args.out / "mock_maps.png")
    out(f"figures: {args.out / 'mock_realism.png'}, {args.out / 'mock_cutouts.png'}, {args.out / 'mock_maps.png'}")
    (args.out / "mock_realism.txt").write_text(
        "command: " + shlex.join([sys.executable, *sys.argv]) + "\n" + "\n".join(lines) + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
