"""Give a bundle its trust description: a features output, an out-of-distribution score, recalibrated errors.

``fit_trust(bundle_dir)`` (``survey-infer trust BUNDLE``):

1. makes the engines return the penultimate layer: appends ``features`` to ``engine_io.outputs``, re-exports
   ``model.onnx`` (deploy.export: checked against PyTorch, features included) and, where the bundle has an
   INT8 model, re-quantizes it (deploy.quantize) on the calibration store it records (re-made from the mock
   seed it records when the store is gone) or on ``int8_store``. Weights are unchanged.
2. simulates in-distribution mocks with the task's own simulator at fresh seeds (``TRUST_SEEDS``: neither the
   training, validation nor the benches' test seeds; checked against the seeds the bundle records), a *fit*
   set and a *held-out* set, and runs both through the same path as a run (task.prepare -> engine.run ->
   task.postprocess, ONNX Runtime fp32 by default);
3. fits the mean and a Ledoit-Wolf shrunk covariance (scikit-learn) of the (per task: square-rooted or raw,
   ``TRANSFORM``) features of the fit set; the score (survey_infer.trust) is the Mahalanobis distance; its threshold is the 99th percentile of
   the held-out set's scores (rows the fit never saw), whose sorted scores are stored for ``--ood-threshold``;
4. recalibrates the uncertainties on the held-out set: for every output ``X`` with an ``X_err`` column and a
   truth column ``X``, one temperature T (``fit_error_scale``) that brings the coverage of +-1 err (68.27%
   nominal) and of +-1.96 err (95%) as close to nominal as one factor can (the smallest largest miss), folded
   into ``output_spec.X_err.scale`` (which the tasks apply);
5. writes ``trust.safetensors`` (mean, whitening, reference scores), the ``trust`` section of ``bundle.json``
   (seeds, counts, transform, shrinkage, threshold, the recalibration with coverages before and after) and
   the file's sha256 in ``files``.

A task opts in by (a) an architecture that can emit its features (an ``emit_features`` attribute: the model
returns its penultimate layer as a last output when set, survey_infer.models), (b) an entry in ``SIMULATORS``
below (in-distribution mocks with truth for a bundle), (c) a unit that calls ``survey_infer.trust.score_rows``
(the cutout worker does; so every cutout task is covered once (a) and (b) hold).

Hand-written here: the Mahalanobis distance (numpy, via the Cholesky factor of the shrunk precision), the
temperature search (a grid) and the coverages; the shrinkage is scikit-learn's LedoitWolf.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from survey_infer.bundle import (
    BUNDLE_JSON, FEATURES_OUTPUT, TRUST_KEY, Bundle, load_bundle, record_file, write_json_atomic,
)  # fmt: skip
from survey_infer.engines import make_engine
from survey_infer.engines.base import INT8_ONNX_FILE
from survey_infer.errors import BundleError
from survey_infer.flags import NO_ESTIMATE
from survey_infer.tasks import get_task
from survey_infer.trust import TRUST_FILE, TrustModel, describe, transform_features

log = logging.getLogger(__name__)

THRESHOLD_QUANTILE = 0.99
STATISTICS_KEY = "_input_statistics"
# Feature transform per task, chosen by comparing sqrt and none on bench/ood.py's shift families (other seeds
# and counts than the bench's run, but the same kinds of shift: those AUROCs are not blind): sqrt tames the
# heavy tails of mass_to_light's max-pooled features (uniform noise AUROC 0.94 -> 0.995); for star_clusters the
# raw activations separate blank sky better (0.81 -> 0.94).
# mass_profiles: "none" (its 32 features come out of a SiLU, which can be negative; not tuned on shifts).
TRANSFORM = {"mass_to_light": "sqrt", "star_clusters": "none", "mass_profiles": "none",
             "property_maps": "sqrt",  # mean-pooled bottleneck ReLUs: heavy tails (excess kurtosis ~26) set the threshold
             "sfh": "none"}  # sfh: the GELU latent (negative values too: no square root)
DEFAULT_TRANSFORM = "sqrt"
# Principal components of the features kept for the score, where the task's input statistics would otherwise
# be drowned among many features (mass_to_light: 512 activations beside 12 statistics).
PROJECTION_COMPONENTS = {"mass_to_light": 8, "property_maps": 8}
Z_68, Z_95 = 1.0, 1.959964  # half-widths of the 68.27% and 95% Gaussian intervals, in sigma
NOMINAL = {"68": 0.682689, "95": 0.95}
# Fresh seeds for the trust mocks, per task: not the training (1e6.., 3e6..), validation (2e6.., 4e6..), the
# reserved evaluation (900_001-2, 910_001-2) nor the INT8 calibration (424242) seeds. mass_profiles: not its
# training (cnn 5_100_000, flow 5_200_000, val 5_300_000, DF grid 5_000; training.train_mass_profiles.SEEDS)
# nor its reserved evaluation seeds (930_001-2, EVAL_SEEDS: bench/accuracy_mass_profiles.py, bench/ood.py).
TRUST_SEEDS = {"mass_to_light": {"fit": 930_001, "held_out": 930_002},
               "star_clusters": {"fit": 931_001, "held_out": 931_002},
               "mass_profiles": {"fit": 932_001, "held_out": 932_002},
               # property_maps: not its training (5e6.., val 6e6..) nor reserved seeds (940_001, 933_001-2)
               "property_maps": {"fit": 933_011, "held_out": 933_012},
               # sfh: not its training (940_000 + k, val 941_000 + k) nor bench (942_000, 942_500) seeds
               "sfh": {"fit": 934_001, "held_out": 934_002}}  # fmt: skip
FIRST_ID = 930_000_000
BATCH = 256


@dataclass
class Sample:
    """Mock rows as a store would hold them (images, or a StarBatch of galaxies; per-object columns) with their truth."""

    images: Any
    columns: dict[str, np.ndarray]
    truth: dict[str, np.ndarray]


def _mass_to_light_mocks(bundle: Bundle, n: int, seed: int, **observing: Any) -> Sample:
    from training.sim import get_simulator
    from training.sim.universe import Observing

    simulate = get_simulator(bundle.meta.get("training", {}).get("simulator", "universe"))
    size = int(bundle.input_spec["image"]["shape"][-1])
    bands = tuple(bundle.input_spec["image"].get("bands", ["g"]))
    extra = {"observing": Observing(**observing)} if observing else {}
    sim = simulate(n, size=size, seed=seed, first_id=FIRST_ID, bands=bands, **extra)
    return Sample(sim.images, sim.columns, sim.truth)


def _star_clusters_mocks(bundle: Bundle, n: int, seed: int, **_: Any) -> Sample:
    from training.sim.clusters import simulate_clusters

    size = int(bundle.input_spec["image"]["shape"][-1])
    sim = simulate_clusters(n, size=size, seed=seed, first_id=FIRST_ID, bands=tuple(bundle.input_spec["image"]["bands"]))
    return Sample(sim.images, sim.columns, sim.truth)


_HALOS: dict[tuple, list] = {}


def mass_profiles_halos(bundle: Bundle) -> list:
    """The bundle's training DF grid (same families, same grid seed), built once per process (~4 min, 1 core)."""
    from training.sim import kinematics as sim

    families = tuple(bundle.meta.get("training", {}).get("training_data", {}).get("families", sim.FAMILIES))
    seed = int(bundle.meta.get("training", {}).get("seeds", {}).get("grid", 0))
    key = (families, seed)
    if key not in _HALOS:
        _HALOS[key] = sim.build_grid(families, seed=seed)
    return _HALOS[key]


def galaxies_sample(projections: list, first_id: int = FIRST_ID) -> Sample:
    """Simulated projections (training.sim.kinematics) as a Sample: a StarBatch, object_id, true log masses."""
    from survey_infer.kinematics import StarBatch
    from survey_infer.tasks.mass_profiles import RADII_F, radius_name

    stars = StarBatch.from_lists([(p.x, p.y, p.v_los, p.v_err) for p in projections])
    truth: dict[str, np.ndarray] = {}
    if projections and all("log_mass" in p.truth for p in projections):  # galaxies made without a halo have none
        log_m = np.stack([p.truth["log_mass"] for p in projections])
        truth = {radius_name(f): log_m[:, k] for k, f in enumerate(RADII_F)}
        for key in ("family", "halo_label", "n_stars", "ra_over_b", "sigma_scale_kms", "v_err_level_kms"):
            truth[key] = np.asarray([p.truth[key] for p in projections])
    return Sample(stars, {"object_id": np.arange(first_id, first_id + len(projections), dtype=np.int64)}, truth)


def _mass_profiles_mocks(bundle: Bundle, n: int, seed: int, **_: Any) -> Sample:
    from training.sim import kinematics as sim

    return galaxies_sample(sim.simulate_split(mass_profiles_halos(bundle), n, seed, 1, FIRST_ID))


def _property_maps_mocks(bundle: Bundle, n: int, seed: int, **_: Any) -> Sample:
    """ugriz galaxies with gas in linear surface brightness (training.mock_property_maps), the bundle's size and
    bands; truth = the universe's per-galaxy truth (the maps themselves are not needed for the score)."""
    from training.mock_property_maps import BANDS, simulate_block

    size = int(bundle.input_spec["image"]["shape"][-1])
    bands = tuple(bundle.input_spec["image"]["bands"])
    sim = simulate_block(n, size, seed, FIRST_ID)
    return Sample(np.ascontiguousarray(sim.images[:, [BANDS.index(b) for b in bands]]), sim.columns, sim.truth)


def sfh_spectra(n: int, seed: int, **overrides: Any) -> Sample:
    """Mock spectra from the sfh training prior (training.sim.spectra.draw_params), ``overrides`` replacing some of
    its parameters (arrays or (low, high) uniform ranges), as SpectraChunks with one redshift per chunk (drawn
    from the prior too). Truth: the mass- and light-weighted mean log age and log Z."""
    from survey_infer.ifu import SpaxelBatch
    from training.sim import spectra as sim

    rng = np.random.default_rng(seed)
    params = sim.draw_params(rng, n)
    for start in range(0, n, BATCH):
        params.redshift[start : start + BATCH] = params.redshift[start]
    for name, value in overrides.items():
        setattr(params, name, rng.uniform(*value, n) if isinstance(value, tuple) else np.asarray(value))
    spec = sim.make_spectra(params, rng)
    batches = [SpaxelBatch(flux=spec.flux[a:b].astype(np.float32), ivar=spec.ivar[a:b].astype(np.float32), wave=spec.wave,
                           redshift=float(params.redshift[a]), photometry=spec.photometry[a:b].astype(np.float32),
                           photometry_ivar=spec.photometry_ivar[a:b].astype(np.float32), y=np.zeros(b - a, np.int64),
                           x=np.arange(b - a, dtype=np.int64), shape=(1, b - a))
               for a, b in ((a, min(a + BATCH, n)) for a in range(0, n, BATCH))]  # fmt: skip
    t = spec.truth
    truth = {"age_lw": t.age_lw, "age_mw": t.age_mw, "log_z_lw": t.z_lw, "log_z_mw": t.z_mw}
    return Sample(SpectraChunks(batches), {"object_id": np.arange(FIRST_ID, FIRST_ID + n, dtype=np.int64)}, truth)


def _sfh_mocks(bundle: Bundle, n: int, seed: int, **_: Any) -> Sample:
    return sfh_spectra(n, seed)


# task -> in-distribution mocks (bundle, n, seed) -> Sample: the opt-in point of a task (see the module doc)
SIMULATORS: dict[str, Callable[..., Sample]] = {"mass_to_light": _mass_to_light_mocks,
                                                "star_clusters": _star_clusters_mocks,
                                                "mass_profiles": _mass_profiles_mocks,
                                                "property_maps": _property_maps_mocks,
                                                "sfh": _sfh_mocks}  # fmt: skip


def simulate_in_distribution(bundle: Bundle, n: int, seed: int, **observing: Any) -> Sample:
    if bundle.task not in SIMULATORS:
        raise BundleError(f"task {bundle.task!r} has no in-distribution simulator for trust (training.trust.SIMULATORS)")
    return SIMULATORS[bundle.task](bundle, n, seed, **observing)


def run_rows(bundle: Bundle, images: np.ndarray, columns: dict[str, np.ndarray], *, engine: str = "onnxruntime",
             precision: str = "fp32", threads: int = 1, engine_obj=None,
             task_options: dict[str, str] | None = None, statistics: bool = False) -> dict[str, np.ndarray]:  # fmt: skip
    """A run's path for in-memory rows: task.prepare -> engine.run -> task.postprocess, batch by batch.

    ``images`` is an image array, or a StarBatch for a kinematics task; ``task_options`` as ``--task-option``.
    Returns the catalog columns, ``flag``, the engine's ``features`` (when it has them) and, with
    ``statistics``, the task's input statistics under STATISTICS_KEY."""
    task = get_task(bundle.task)
    if task_options:
        task = task.with_options(task_options)
    engine_obj = engine_obj or make_engine(engine, bundle, threads=threads, precision=precision)
    wanted = task.input_columns(bundle) + [c for c in ("object_id",) if c in columns]
    pieces: list[dict[str, np.ndarray]] = []
    for start in range(0, len(images), BATCH):
        batch = _rows(images, start, start + BATCH)
        n = len(batch)
        cols = {c: np.asarray(columns[c][start : start + BATCH]) if c in columns else np.full(n, np.nan) for c in wanted}
        inputs, flags = task.prepare(batch, cols, bundle)
        outputs = engine_obj.run(inputs)
        result = task.postprocess(outputs, cols, flags, bundle)
        if FEATURES_OUTPUT in outputs:
            result[FEATURES_OUTPUT] = outputs[FEATURES_OUTPUT]
        if statistics:
            result[STATISTICS_KEY] = task.input_statistics(batch, bundle)
        pieces.append({**result, "flag": flags})
    return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}


@dataclass
class SpectraChunks:
    """Mock spectra as SpaxelBatches of BATCH rows (a SpaxelBatch is one cube's spaxels: one redshift)."""

    batches: list

    def __len__(self) -> int:
        return sum(len(b) for b in self.batches)


def _rows(images: Any, start: int, stop: int) -> Any:
    """Rows [start, stop) of an image array, of a StarBatch (galaxies) or of SpectraChunks (BATCH-aligned)."""
    from survey_infer.kinematics import StarBatch

    if isinstance(images, SpectraChunks):
        if start % BATCH or stop - start > BATCH:
            raise ValueError(f"SpectraChunks are read {BATCH} rows at a time from a multiple of {BATCH}")
        return images.batches[start // BATCH]
    if isinstance(images, StarBatch):
        stop = min(stop, len(images))
        lo, hi = int(images.offsets[start]), int(images.offsets[stop])
        return StarBatch(images.x[lo:hi], images.y[lo:hi], images.v_los[lo:hi], images.v_err[lo:hi],
                         images.offsets[start : stop + 1] - lo)  # fmt: skip
    return images[start:stop]


def interval_coverage(samples: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """Per output (last axis) coverage of the central 68.27% and 95% intervals of posterior samples (n, S, K)
    for truth (n, K): the fraction of rows whose truth lies between the samples' 15.87-84.13 (2.5-97.5)
    percentiles. Rows with non-finite samples are skipped."""
    samples, truth = np.asarray(samples, np.float64), np.asarray(truth, np.float64)
    ok = np.isfinite(samples).all(axis=(1, 2)) & np.isfinite(truth).all(axis=1)
    lo68, hi68, lo95, hi95 = np.percentile(samples[ok], [15.865, 84.135, 2.5, 97.5], axis=1)
    t = truth[ok]
    return {"68": np.mean((lo68 <= t) & (t <= hi68), axis=0), "95": np.mean((lo95 <= t) & (t <= hi95), axis=0)}


# ------------------------------------------------------------------------------------------ recalibration
def coverage(residual: np.ndarray, err: np.ndarray, z: float) -> float:
    """Fraction of rows with |residual| <= z * err (finite rows only)."""
    residual, err = np.asarray(residual, dtype=np.float64), np.asarray(err, dtype=np.float64)
    ok = np.isfinite(residual) & np.isfinite(err) & (err > 0)
    if not ok.any():
        raise ValueError("no row has a finite residual and a positive finite error")
    return float(np.mean(np.abs(residual[ok]) <= z * err[ok]))


def coverages(residual: np.ndarray, err: np.ndarray) -> dict[str, float]:
    return {"68": coverage(residual, err, Z_68), "95": coverage(residual, err, Z_95)}


def fit_error_scale(residual: np.ndarray, err: np.ndarray) -> float:
    """The factor T on ``err`` whose +-1 and +-1.96 intervals miss their nominal coverage (68.27%, 95%) by the
    smallest largest amount; on a tie, the one nearest the 68.27% quantile of |residual| / err."""
    residual, err = np.asarray(residual, dtype=np.float64), np.asarray(err, dtype=np.float64)
    ok = np.isfinite(residual) & np.isfinite(err) & (err > 0)
    if ok.sum() < 20:
        raise ValueError(f"{int(ok.sum())} usable rows; at least 20 are needed to fit an error scale")
    ratio = np.sort(np.abs(residual[ok]) / err[ok])
    t68 = float(np.quantile(ratio, NOMINAL["68"]))
    grid = t68 * np.geomspace(0.5, 2.0, 1201)
    cov68 = np.searchsorted(ratio, grid * Z_68, side="right") / len(ratio)
    cov95 = np.searchsorted(ratio, grid * Z_95, side="right") / len(ratio)
    miss = np.maximum(np.abs(cov68 - NOMINAL["68"]), np.abs(cov95 - NOMINAL["95"]))
    best = np.flatnonzero(miss <= miss.min() + 1e-12)
    return float(grid[best[np.argmin(np.abs(np.log(grid[best] / t68)))]])


# ------------------------------------------------------------------------------------------ features
def ensure_features_output(bundle_dir: Path, int8_store: Path | None = None) -> None:
    """Make the bundle's engines return ``features`` (re-export ONNX, re-quantize INT8); no-op if they do."""
    from deploy.export import export_onnx

    meta_path = bundle_dir / BUNDLE_JSON
    bundle = load_bundle(bundle_dir)
    if bundle.emits_features:
        return
    meta = json.loads(meta_path.read_text())
    meta["engine_io"]["outputs"] = [*meta["engine_io"]["outputs"], FEATURES_OUTPUT]
    meta.pop(TRUST_KEY, None)
    write_json_atomic(meta_path, meta)
    export_onnx(bundle_dir)
    if INT8_ONNX_FILE in meta["files"]:
        _requantize(bundle_dir, meta.get("int8", {}), int8_store)


def _requantize(bundle_dir: Path, int8: dict, store: Path | None) -> None:
    """Quantize again with the calibration the bundle records (its store, or a mock re-made from its seed)."""
    from deploy.quantize import quantize_bundle
    from training.mock import write_mock_cutouts

    calib = int8.get("calibration", {})
    rows, seed = int(calib.get("rows", 1024)), int(calib.get("seed", 0))
    check_rows = int(int8.get("vs_fp32_on_held_out_rows", {}).get("rows", 1024))
    if store is None:
        store = Path(calib.get("store", ""))
        mock_seed = calib.get("survey", {}).get("seed")
        if not (store.name and store.exists()):
            if mock_seed is None:
                raise BundleError(f"bundle {bundle_dir}: its INT8 calibration store {store} is gone and it records no "
                                  "mock seed; give one with --int8-calibration")  # fmt: skip
            size = int(load_bundle(bundle_dir).input_spec["image"]["shape"][-1])
            log.warning("re-making the INT8 calibration mock store %s (seed %s)", store, mock_seed)
            write_mock_cutouts(store, 2 * (rows + check_rows), size=size, seed=int(mock_seed), overwrite=True)
    quantize_bundle(bundle_dir, store, rows=rows, check_rows=check_rows, seed=seed)


# ------------------------------------------------------------------------------------------ the fit
def _check_seeds(bundle: Bundle, seeds: dict[str, int]) -> None:
    used = bundle.meta.get("training", {}).get("seeds", {})
    reserved = {**bundle.meta.get("training", {}).get("reserved_for_evaluation", {}), **used.get("reserved_for_evaluation", {})}
    taken = {int(v) for v in reserved.values()}
    for split, value in used.items():  # train/val: a list of seeds or [first, last] of a range; or one seed a split
        if split == "reserved_for_evaluation" or split.endswith("_per_seed"):
            continue
        values = [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
        if values:
            taken |= set(range(min(values), max(values) + 1))
    clash = taken & set(seeds.values())
    if clash:
        raise BundleError(f"bundle {bundle.id} used seeds {sorted(clash)}, which trust would re-use; pick others")


def _principal_components(features: np.ndarray, components: int | None) -> tuple[np.ndarray | None, float]:
    """The (F, K) projection on the leading ``components`` principal axes and the variance they explain."""
    if not components or components >= features.shape[1]:
        return None, 1.0
    from sklearn.decomposition import PCA

    pca = PCA(n_components=components, random_state=0).fit(features)
    return pca.components_.T.astype(np.float32), float(pca.explained_variance_ratio_.sum())


def fit_trust(bundle_dir: str | Path, *, n_fit: int = 8000, n_held_out: int = 8000, engine: str = "onnxruntime",
              threads: int = 1, int8_store: Path | None = None, seeds: dict[str, int] | None = None,
              transform: str | None = None, components: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Write the bundle's trust description (see the module doc); returns the ``trust`` section written.

    ``components``: principal components of the features kept (default PROJECTION_COMPONENTS, else all); the
    task's input statistics (``Task.input_statistic_names``) are appended when it has any."""
    from safetensors.numpy import save_file
    from sklearn.covariance import LedoitWolf

    bundle_dir = Path(bundle_dir)
    t0 = time.time()
    ensure_features_output(bundle_dir, int8_store)
    bundle = load_bundle(bundle_dir)
    seeds = dict(seeds or TRUST_SEEDS.get(bundle.task, {}))
    if set(seeds) != {"fit", "held_out"}:
        raise BundleError(f"task {bundle.task!r}: trust needs a 'fit' and a 'held_out' seed (training.trust.TRUST_SEEDS)")
    _check_seeds(bundle, seeds)
    transform = transform or TRANSFORM.get(bundle.task, DEFAULT_TRANSFORM)
    engine_obj = make_engine(engine, bundle, threads=threads)
    task = get_task(bundle.task)
    statistic_names = list(task.input_statistic_names)
    components = components if components is not None else PROJECTION_COMPONENTS.get(bundle.task)
    runs = {}
    for split, n in (("fit", n_fit), ("held_out", n_held_out)):
        tick = time.time()
        sample = simulate_in_distribution(bundle, n, seeds[split])
        out = run_rows(bundle, sample.images, sample.columns, engine_obj=engine_obj, statistics=bool(statistic_names))
        usable = (out["flag"] & NO_ESTIMATE) == 0
        runs[split] = (sample, out, usable)
        log.info("trust %s: %d mocks simulated and run in %.1f s", split, n, time.time() - tick)

    _, fit_out, fit_ok = runs["fit"]
    fit_features = fit_out[FEATURES_OUTPUT][fit_ok]
    projection, explained = _principal_components(transform_features(fit_features, transform), components)

    def rows(out: dict[str, np.ndarray], ok: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return out[FEATURES_OUTPUT][ok], (out[STATISTICS_KEY][ok] if statistic_names else None)

    lw = LedoitWolf().fit(describe(*rows(fit_out, fit_ok), transform, projection))
    precision = (lw.precision_ + lw.precision_.T) / 2
    whitening = np.linalg.cholesky(precision)  # L L^T = precision: d P d^T = |d L|^2
    model = TrustModel(lw.location_, whitening, transform, np.zeros(10), np.inf, THRESHOLD_QUANTILE, projection,
                       len(statistic_names))  # fmt: skip
    sample, held_out, held_ok = runs["held_out"]
    reference = np.sort(model.score(*rows(held_out, held_ok)))
    threshold = float(np.quantile(reference, THRESHOLD_QUANTILE))
    fit_scores = model.score(*rows(fit_out, fit_ok))

    meta_path = bundle_dir / BUNDLE_JSON
    meta = json.loads(meta_path.read_text())
    recalibration = {}
    names = [c.name for c in task.output_columns(bundle)]
    for name in names:
        if f"{name}_err" not in names or name not in sample.truth:
            continue
        residual = (held_out[name].astype(np.float64) - np.asarray(sample.truth[name], dtype=np.float64))[held_ok]
        err = held_out[f"{name}_err"].astype(np.float64)[held_ok]
        temperature = fit_error_scale(residual, err)
        spec = meta["output_spec"].setdefault(f"{name}_err", {})
        previous = float(spec.get("scale", 1.0))
        spec["scale"] = round(previous * temperature, 6)
        recalibration[name] = {
            "previous_scale": previous, "temperature": round(temperature, 6), "scale": spec["scale"],
            "coverage_before": coverages(residual, err),
            "coverage_after": coverages(residual, err * spec["scale"] / previous),
        }  # fmt: skip
    intervals = {}
    if "log_mass_samples" in held_out:  # a posterior (mass_profiles): per-output coverage of its sample intervals
        from survey_infer.tasks.mass_profiles import RADII_F, radius_name

        names_r = [radius_name(f) for f in RADII_F]
        cov = interval_coverage(held_out["log_mass_samples"][held_ok],
                                np.stack([np.asarray(sample.truth[k], np.float64)[held_ok] for k in names_r], 1))
        intervals = {"method": "coverage of the posterior samples' central 68.27% (15.87-84.13 percentiles) and 95% "
                               "(2.5-97.5) intervals on the held-out mocks, per radius; no recalibration is applied "
                               "unless one is outside +-0.05 of nominal (bench/ood.py reports it on fresh mocks)",
                     "samples_per_row": int(held_out["log_mass_samples"].shape[1]),
                     "coverage": {k: {"68": round(float(cov["68"][i]), 4), "95": round(float(cov["95"][i]), 4)}
                                  for i, k in enumerate(names_r)}}  # fmt: skip
    arrays = {"mean": lw.location_.astype(np.float64), "whitening": whitening.astype(np.float64),
              "reference_scores": reference.astype(np.float64)}  # fmt: skip
    if projection is not None:
        arrays["projection"] = projection.astype(np.float64)
    save_file(arrays, str(bundle_dir / TRUST_FILE))
    section = {
        "file": TRUST_FILE,
        "method": "mahalanobis",
        "features": f"engine output {FEATURES_OUTPUT!r}: the penultimate layer ({fit_out[FEATURES_OUTPUT].shape[1]} "
                    "activations)",
        "transform": transform,
        **({"projection": {"method": "the transformed features projected on their leading principal axes "
                                     "(sklearn PCA on the fit mocks)", "components": int(projection.shape[1]),
                           "explained_variance_ratio": round(explained, 4)}} if projection is not None else {}),
        **({"input_statistics": statistic_names} if statistic_names else {}),
        "covariance": "Ledoit-Wolf shrinkage (sklearn.covariance.LedoitWolf)",
        "shrinkage": float(lw.shrinkage_),
        "threshold": threshold,
        "threshold_quantile": THRESHOLD_QUANTILE,
        "reference": f"reference_scores: the {len(reference)} held-out mocks' scores (sorted)",
        "mocks": {"simulator": SIMULATORS[bundle.task].__name__.strip("_"), "seeds": seeds,
                  "fit_rows": int(fit_ok.sum()), "held_out_rows": int(held_ok.sum()),
                  "engine": engine_obj.describe()},
        "fit_score_quantiles": {q: float(np.quantile(fit_scores, float(q))) for q in ("0.5", "0.99")},
        "held_out_score_quantiles": {q: float(np.quantile(reference, float(q))) for q in ("0.5", "0.9", "0.99", "0.999")},
        "recalibration": {
            "method": "one temperature per output on its *_err, fitted on the held-out mocks: the factor whose +-1 and "
                      "+-1.96 err intervals miss 68.27% and 95% coverage by the smallest largest amount; folded into "
                      "output_spec.<name>_err.scale (coverage_after is on the same rows: see bench/ood.py for fresh ones)",
            "outputs": recalibration,
            **({"posterior_intervals": intervals} if intervals else {}),
        },
        "seconds": round(time.time() - t0, 1),
    }  # fmt: skip
    meta[TRUST_KEY] = section
    write_json_atomic(meta_path, meta)
    record_file(bundle_dir, TRUST_FILE)
    load_bundle(bundle_dir)  # every sha256 still matches
    return section
