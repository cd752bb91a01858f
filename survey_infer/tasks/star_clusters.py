"""star_clusters: log age, log mass and log half-light radius of semi-resolved star clusters (M31, HST).

Input: 3-band cutouts (F336W, F475W or F438W, F814W; bands and shape from the bundle) in linear flux per pixel
on a fixed photometric scale, sky subtracted (the mock stores: AB zero point 25). The absolute flux matters
(it carries the mass), so there is no per-cutout normalisation: each band is mapped by
``asinh(flux / softening_band)`` with the softening (about the sky noise per pixel) that the bundle records,
which keeps single faint stars and the brightest giants in one range.

Model: a ResNet with Gaussian heads (``survey_infer.models.ClusterResNet``), a choice stated here: per target a
mean and a log variance trained by Gaussian negative log-likelihood, not the binned softmax of the paper's
follow-up. ``*_err`` = the network's sigma x a per-target scale fitted on the validation split (68.27% of
validation rows within 1 sigma), recorded in ``output_spec``.

Outputs: ``log_age`` [dex(yr)], ``log_mass`` [dex(Msun), initial stellar mass], ``log_rh`` [dex(pc), projected
half-light radius at 785 kpc] and their 1-sigma ``*_err`` [dex]. Estimates outside the training ranges
(recorded in the bundle) are kept and flagged ``out_of_range``.
"""

from __future__ import annotations

import numpy as np

from survey_infer.bundle import Bundle
from survey_infer.errors import BundleError
from survey_infer.flags import FLAG_BITS, NO_ESTIMATE
from survey_infer.tasks.base import AsinhCutoutTask, OutputColumn

TARGETS = ("log_age", "log_mass", "log_rh")
UNITS = {"log_age": "dex(yr)", "log_mass": "dex(Msun)", "log_rh": "dex(pc)"}
DESCRIPTIONS = {
    "log_age": "log10 cluster age",
    "log_mass": "log10 initial stellar mass of the cluster",
    "log_rh": "log10 projected half-light radius",
}




class StarClusters(AsinhCutoutTask):
    name = "star_clusters"

    def output_columns(self, bundle: Bundle) -> list[OutputColumn]:
        cols = []
        for t in TARGETS:
            cols.append(OutputColumn(t, "float32", UNITS[t], DESCRIPTIONS[t]))
            cols.append(OutputColumn(f"{t}_err", "float32", "dex", f"1-sigma uncertainty of {t}"))
        return cols

    def postprocess(self, outputs, columns, flags, bundle):
        mean = outputs["params"].astype(np.float64)
        log_var = outputs["params_logvar"].astype(np.float64)
        if mean.ndim != 2 or mean.shape[1] != len(TARGETS):
            raise BundleError(f"bundle {bundle.id}: engine output 'params' has shape {mean.shape}; (N, 3) expected")
        no_estimate = (flags & NO_ESTIMATE) != 0
        result = {}
        for k, t in enumerate(TARGETS):
            spec = bundle.output_spec.get(t, {})
            scale = float(bundle.output_spec.get(f"{t}_err", {}).get("scale", 1.0))
            value = mean[:, k].copy()
            err = scale * np.sqrt(np.exp(log_var[:, k]))
            lo, hi = spec.get("range", (-np.inf, np.inf))
            flags[~no_estimate & ((value < lo) | (value > hi))] |= FLAG_BITS["out_of_range"]
            value[no_estimate] = np.nan
            err[no_estimate] = np.nan
            result[t] = value.astype(np.float32)
            result[f"{t}_err"] = err.astype(np.float32)
        return result

    def example_inputs(self, bundle, n_rows, seed=0):
        rng = np.random.default_rng(seed)
        shape = tuple(bundle.input_spec["image"]["shape"])
        return {"image": rng.normal(0.0, 1.5, size=(n_rows, *shape)).astype(np.float32)}


TASK = StarClusters()
