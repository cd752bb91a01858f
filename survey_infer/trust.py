"""Trust: an out-of-distribution score for every row, from the bundle's description of its training data.

A bundle opts in by carrying (all written by ``survey-infer trust``, ``training.trust.fit_trust``):

- ``engine_io.outputs`` ending in ``features``: the network's penultimate layer, returned by every engine
  (the ONNX graph exports it as an output, the PyTorch engine returns it too);
- ``trust.safetensors`` (listed in ``files``, so its sha256 is checked like every other file) holding the mean
  ``mean`` (D,) and a whitening matrix ``whitening`` (D, D) of the transformed features of in-distribution
  mocks, and ``reference_scores``: the sorted scores of held-out in-distribution mocks that the fit never saw;
- a ``trust`` section in ``bundle.json``: the feature transform, the threshold and the quantile it was set at,
  the mocks' seeds and counts, and the uncertainty recalibration that was fitted with them.

The score of a row is the Mahalanobis distance ``|| (x - mean) @ whitening ||`` of its description ``x``, with
``whitening @ whitening.T`` the inverse of a Ledoit-Wolf shrunk covariance. ``x`` is the transformed features
``t(f)`` (``t`` = ``sqrt`` of the non-negative ReLU activations, which tames their heavy tails, or ``none``;
the bundle says which), optionally projected on their leading principal components (``projection`` (F, K) in
the trust file), followed by the task's input statistics when the bundle names them (``Task.input_statistics``:
numbers a task measures on its raw input that the network's features need not keep, e.g. how concentrated a
cutout's light is for its framing, or how much a galaxy's stars rotate). A row whose score exceeds the threshold
gets the ``ood`` flag: a warning, its estimate is kept. Rows without an estimate (``NO_ESTIMATE`` flags) get a
NaN score.

The threshold is by default the 99th percentile of the held-out in-distribution scores (1% of in-distribution
rows are flagged); ``survey-infer run --ood-threshold Q`` picks another quantile Q of the same scores.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from survey_infer.bundle import FEATURES_OUTPUT, TRUST_KEY, Bundle, check_trust_listing
from survey_infer.errors import BundleError, RefusedError

TRUST_FILE = "trust.safetensors"
TRANSFORMS = ("sqrt", "none")
SCORE_COLUMN = "ood_score"
SCORE_DESCRIPTION = ("out-of-distribution score: Mahalanobis distance of the network's penultimate-layer features "
                     "(and the task's input statistics, where the bundle names them) from the training mocks' "
                     "(bundle trust section); rows above the threshold are flagged ood")  # fmt: skip


def transform_features(features: np.ndarray, transform: str, dtype: type = np.float64) -> np.ndarray:
    """The transform applied to the features before the Mahalanobis distance (float64 for fitting; the run's
    scoring passes float32)."""
    values = np.asarray(features, dtype=dtype)
    if transform == "sqrt":
        return np.sqrt(np.maximum(values, 0.0))
    if transform == "none":
        return values
    raise ValueError(f"unknown feature transform {transform!r}; known: {TRANSFORMS}")


def describe(features: np.ndarray, statistics: np.ndarray | None, transform: str, projection: np.ndarray | None,
             dtype: type = np.float64) -> np.ndarray:
    """Rows' descriptions for the score: transformed features, projected when ``projection`` (F, K) is given,
    then the input statistics when given (the fit uses float64, the run's scoring float32)."""
    x = transform_features(features, transform, dtype)
    if projection is not None:
        x = x @ np.asarray(projection, dtype)
    if statistics is not None:
        x = np.concatenate([x, np.asarray(statistics, dtype)], axis=1)
    return x


@dataclass(frozen=True)
class TrustModel:
    """A bundle's in-distribution description: Mahalanobis score and its calibrated threshold."""

    mean: np.ndarray  # (D,)
    whitening: np.ndarray  # (D, D) float32: whitening @ whitening.T = inverse (shrunk) covariance
    transform: str
    reference_scores: np.ndarray  # sorted scores of held-out in-distribution rows
    threshold: float
    threshold_quantile: float
    projection: np.ndarray | None = None  # (F, K) float32: features onto principal components (None: all F)
    n_statistics: int = 0  # the task's input statistics appended after the (projected) features

    @property
    def n_features(self) -> int:
        return len(self.projection) if self.projection is not None else len(self.mean) - self.n_statistics

    def describe_rows(self, features: np.ndarray, statistics: np.ndarray | None = None) -> np.ndarray:
        """The rows' descriptions ``x`` (N, D) float32: transformed, projected features, then the statistics."""
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise BundleError(f"engine output {FEATURES_OUTPUT!r} has shape {features.shape}; the bundle's trust "
                              f"description expects (N, {self.n_features})")  # fmt: skip
        if self.n_statistics and (statistics is None or np.shape(statistics) != (len(features), self.n_statistics)):
            raise BundleError(f"the bundle's trust description needs {self.n_statistics} input statistics per row "
                              f"(Task.input_statistics); got {None if statistics is None else np.shape(statistics)}")  # fmt: skip
        # float32 matmuls (half the cost of float64 on the run's hot path; scores agree to ~1e-6 relative)
        return describe(features, statistics if self.n_statistics else None, self.transform, self.projection, np.float32)

    def score(self, features: np.ndarray, statistics: np.ndarray | None = None) -> np.ndarray:
        """Mahalanobis distance of each row (features (N, F), statistics (N, S) when the bundle uses them) ->
        float64 (N,)."""
        centred = self.describe_rows(features, statistics) - self.mean.astype(np.float32)
        whitened = centred @ self.whitening
        return np.sqrt(np.einsum("ij,ij->i", whitened, whitened, dtype=np.float64))

    def threshold_at(self, quantile: float) -> float:
        """The score below which a fraction ``quantile`` of the held-out in-distribution rows lie."""
        check_quantile(quantile)
        return float(np.quantile(self.reference_scores, quantile))


def check_quantile(quantile: float) -> float:
    if not isinstance(quantile, (int, float)) or not 0.0 < float(quantile) < 1.0:
        raise RefusedError(f"--ood-threshold must be a quantile strictly between 0 and 1 (e.g. 0.99), got {quantile!r}")
    return float(quantile)


def load_trust(bundle: Bundle) -> TrustModel | None:
    """The bundle's trust description (None when it carries none), checked for shape and finiteness."""
    section = bundle.meta.get(TRUST_KEY)
    if section is None:
        return None
    from safetensors.numpy import load_file

    check_trust_listing(bundle.path, bundle.meta)
    name = section["file"]
    try:
        arrays = load_file(str(bundle.path / name))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad bundle file
        raise BundleError(f"bundle {bundle.path}: {name} is not a readable safetensors file ({exc})") from exc
    missing = [k for k in ("mean", "whitening", "reference_scores") if k not in arrays]
    projection = np.asarray(arrays["projection"], np.float32) if "projection" in arrays else None
    n_statistics = len(section.get("input_statistics", []))
    if missing:
        raise BundleError(f"bundle {bundle.path}: {name} lacks arrays {missing}")
    mean, whitening, reference = (np.asarray(arrays[k], dtype=np.float64) for k in ("mean", "whitening", "reference_scores"))
    d = mean.shape[0] if mean.ndim == 1 else -1
    if d < 1 or whitening.shape != (d, d) or reference.ndim != 1 or reference.size < 10:
        raise BundleError(f"bundle {bundle.path}: {name} arrays have shapes mean {mean.shape}, whitening "
                          f"{whitening.shape}, reference_scores {reference.shape}; (D,), (D, D), (>=10,) expected")  # fmt: skip
    if not (np.isfinite(mean).all() and np.isfinite(whitening).all() and np.isfinite(reference).all()):
        raise BundleError(f"bundle {bundle.path}: {name} holds non-finite values")
    if projection is not None and (projection.ndim != 2 or projection.shape[1] + n_statistics != d
                                   or not np.isfinite(projection).all()):  # fmt: skip
        raise BundleError(f"bundle {bundle.path}: {name} projection has shape {projection.shape}; (F, "
                          f"{d - n_statistics}) finite values expected")  # fmt: skip
    transform = section.get("transform", "none")
    if transform not in TRANSFORMS:
        raise BundleError(f"bundle {bundle.path}: trust.transform {transform!r}; one of {TRANSFORMS} expected")
    quantile = float(section["threshold_quantile"])
    return TrustModel(mean, whitening.astype(np.float32), transform, np.sort(reference), float(section["threshold"]),
                      quantile, projection, n_statistics)  # fmt: skip


_CACHE: dict[tuple[str, str], TrustModel | None] = {}
_CACHE_LOCK = threading.Lock()


def bundle_trust(bundle: Bundle) -> TrustModel | None:
    """`load_trust`, once per bundle directory and trust file digest in this process."""
    key = (str(bundle.path.resolve()), str(bundle.meta.get("files", {}).get(TRUST_FILE)))
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = load_trust(bundle)
        return _CACHE[key]


def resolve_threshold(bundle: Bundle, quantile: float | None) -> dict[str, Any]:
    """The run's threshold and where it came from (the run record's ``trust`` section, without counts)."""
    trust = load_trust(bundle)
    if trust is None:
        if quantile is not None:
            raise RefusedError(f"--ood-threshold: bundle {bundle.id} carries no trust description (no "
                               f"{TRUST_FILE}); write one with `survey-infer trust {bundle.path}`")  # fmt: skip
        return {"enabled": False, "reason": f"bundle {bundle.id} carries no trust description: ood_score is null"}
    section = bundle.meta[TRUST_KEY]
    if quantile is None:
        value, source, q = trust.threshold, "bundle", trust.threshold_quantile
    else:
        value, source, q = trust.threshold_at(quantile), "--ood-threshold", check_quantile(quantile)
    return {
        "enabled": True,
        "threshold": value,
        "quantile": q,
        "source": source,
        "meaning": f"a row is flagged ood when ood_score > {value:.4g}, the {100 * q:g}th percentile of "
                   f"{len(trust.reference_scores)} held-out in-distribution mocks' scores",
        "score": section.get("method", "mahalanobis"),
    }  # fmt: skip


def score_rows(trust: TrustModel | None, outputs: dict[str, np.ndarray], flags: np.ndarray, threshold: float | None,
               no_estimate: int, ood_bit: int, statistics: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """``ood_score`` (float32, NaN without trust or estimate) for a batch; sets ``ood_bit`` in ``flags`` in place.
    ``statistics``: the task's input statistics of the batch, when the bundle's trust uses them."""
    n = len(flags)
    if trust is None:
        return np.full(n, np.nan, dtype=np.float32)
    if FEATURES_OUTPUT not in outputs:
        raise BundleError(f"the engine returned no {FEATURES_OUTPUT!r} output, which the bundle's trust needs")
    score = trust.score(outputs[FEATURES_OUTPUT], statistics)
    score[(flags & no_estimate) != 0] = np.nan
    limit = trust.threshold if threshold is None else threshold
    with np.errstate(invalid="ignore"):
        flags[score > limit] |= ood_bit
    return score.astype(np.float32)
