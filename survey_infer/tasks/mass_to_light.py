"""mass_to_light: the g-band stellar mass-to-light ratio from one g-band cutout (+ distance, L_g, size).

Inputs: log-scaled g-band cutouts in [-1, 1] (the store's preprocessing), and, where the bundle uses them,
per-object scalars transformed by log10 and standardised with the training set's mean and std. Outputs:
``ml_g`` (linear M/L in solar units), ``ml_g_err`` (1-sigma, from the network's predicted variance) and
``log_mstar`` = log10(M/L x L_g) where L_g is known.
"""

from __future__ import annotations

import numpy as np

from survey_infer.bundle import Bundle
from survey_infer.flags import FLAG_BITS, NO_ESTIMATE, image_flags
from survey_infer.imaging import LIGHT_STATISTIC_NAMES, light_statistics
from survey_infer.stamps import FOV_IN_HALF_LIGHT_RADII
from survey_infer.tasks.base import CutoutTask, OutputColumn

LUMINOSITY_COLUMN = "lum_g"


class MassToLight(CutoutTask):
    name = "mass_to_light"
    input_statistic_names = LIGHT_STATISTIC_NAMES  # the ood score's view of the light profile (trust)

    def input_statistics(self, batch: np.ndarray, bundle: Bundle) -> np.ndarray:
        """How concentrated each cutout's light is for its framing (survey_infer.imaging.light_statistics)."""
        return light_statistics(batch, FOV_IN_HALF_LIGHT_RADII)

    def meta_spec(self, bundle: Bundle) -> dict | None:
        return bundle.input_spec.get("meta")

    def framing(self, bundle: Bundle) -> dict:
        """The simulator frames every mock galaxy in a field ``FOV_IN_HALF_LIGHT_RADII`` half-light radii across."""
        return {"kind": "half_light", "fov_r_half": FOV_IN_HALF_LIGHT_RADII}

    def input_columns(self, bundle: Bundle) -> list[str]:
        meta = self.meta_spec(bundle)
        names = list(meta["columns"]) if meta else []
        return names + ([LUMINOSITY_COLUMN] if LUMINOSITY_COLUMN not in names else [])

    def output_columns(self, bundle: Bundle) -> list[OutputColumn]:
        return [
            OutputColumn("ml_g", "float32", "Msun/Lsun", "g-band stellar mass-to-light ratio"),
            OutputColumn("ml_g_err", "float32", "Msun/Lsun", "1-sigma uncertainty of ml_g"),
            OutputColumn("log_mstar", "float32", "dex(Msun)", "log10 stellar mass = log10(ml_g * lum_g)"),
        ]

    def prepare(self, images, columns, bundle):
        flags = image_flags(images)
        usable = (flags & NO_ESTIMATE) == 0
        clean = np.ascontiguousarray(images, dtype=np.float32)
        if not usable.all():  # rows without an estimate go through the model as zeros (and come out NaN)
            clean = clean.copy() if clean is images else clean
            clean[~usable] = 0.0
        inputs = {"image": clean}
        meta = self.meta_spec(bundle)
        if meta:
            inputs["meta"], missing = self._standardised_meta(columns, meta)
            flags[missing] |= FLAG_BITS["missing_metadata"]
        return inputs, flags

    @staticmethod
    def _standardised_meta(columns: dict[str, np.ndarray], meta: dict) -> tuple[np.ndarray, np.ndarray]:
        """log10 and standardise each meta column; missing or non-positive values become the training mean."""
        raw = np.stack([np.asarray(columns[c], dtype=np.float64) for c in meta["columns"]], axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            logged = np.log10(raw)
        bad = ~np.isfinite(logged)
        mean = np.asarray(meta["mean"], dtype=np.float64)
        std = np.asarray(meta["std"], dtype=np.float64)
        standardised = np.where(bad, 0.0, (logged - mean) / std)
        return standardised.astype(np.float32), bad.any(axis=1)

    def postprocess(self, outputs, columns, flags, bundle):
        ml = outputs["ml_g"].astype(np.float32)
        scale = float(bundle.output_spec.get("ml_g_err", {}).get("scale", 1.0))  # recalibration from training
        err = (scale * np.sqrt(np.exp(outputs["ml_g_logvar"].astype(np.float64)))).astype(np.float32)
        no_estimate = (flags & NO_ESTIMATE) != 0
        ml[no_estimate] = np.nan
        err[no_estimate] = np.nan
        lum = np.asarray(columns.get(LUMINOSITY_COLUMN, np.full(len(ml), np.nan)), dtype=np.float64)
        known = np.isfinite(lum) & (lum > 0)
        flags[~known] |= FLAG_BITS["no_luminosity"]
        with np.errstate(divide="ignore", invalid="ignore"):
            log_mstar = np.where(known & ~no_estimate, np.log10(ml.astype(np.float64) * lum), np.nan)
        return {"ml_g": ml, "ml_g_err": err, "log_mstar": log_mstar.astype(np.float32)}

    def example_inputs(self, bundle, n_rows, seed=0):
        rng = np.random.default_rng(seed)
        shape = tuple(bundle.input_spec["image"]["shape"])
        inputs = {"image": rng.uniform(-1, 1, size=(n_rows, *shape)).astype(np.float32)}
        meta = self.meta_spec(bundle)
        if meta:
            inputs["meta"] = rng.normal(size=(n_rows, len(meta["columns"]))).astype(np.float32)
        return inputs


TASK = MassToLight()
