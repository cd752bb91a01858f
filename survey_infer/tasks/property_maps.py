"""property_maps: resolved stellar and gas property maps from ugriz cutouts (PICASSSO, Buck & Wolf 2021).

Input: 5-band cutouts (u, g, r, i, z; bands and shape from the bundle) in linear, sky-subtracted surface
brightness, nanomaggies per arcsec^2 (the store's ``survey.image_units`` must say ``nmgy_arcsec2``; a store of
per-cutout log-scaled images, which lose colours and surface brightness, is refused). The network reads
``asinh(sb / softening_band)`` with the softening the bundle records. Per-object columns: ``size_kpc`` (the
half-light radius that framed the cutout: 10 of them across) for the pixel area, and ``distance_mpc`` for the
pixel scale in arcsec; without them the maps are still written and the totals are null (``missing_metadata``).

Model: the paper's U-Net (``survey_infer.models.PropertyUNet``: GroupNorm blocks, depth 4, skip connections)
with three 1x1 heads per map and pixel: the log10 value, a log variance (Gaussian uncertainty) and the logit
that the pixel is empty (no stars, no gas, no star formation: the maps are NaN there).

Outputs, written by the pipeline beside the catalog (``DIR/maps.zarr``, rows aligned by ``object_id``):
``maps`` (N, 6, H, W) float32 in MAP_NAMES order (NaN = predicted empty), ``maps_err`` (N, 6, H, W) 1-sigma
dex (the network's sigma x a per-map scale fitted on the validation split) and ``pixel_scale_arcsec`` (N,).
Catalog columns: totals over the non-empty pixels of the predicted maps, ``log_mstar_map`` [dex(Msun)],
``log_sfr_map`` [dex(Msun/yr)], ``log_mgas_map`` [dex(Msun)], the mass-weighted ``log_age_map`` [dex(yr)] and
``log_z_star_map``, and ``empty_fraction`` (of the stellar-mass map).
"""

from __future__ import annotations

import numpy as np

from survey_infer.bundle import Bundle
from survey_infer.errors import BundleError, StoreError
from survey_infer.flags import FLAG_BITS, NO_ESTIMATE
from survey_infer.imaging import SB_STATISTIC_NAMES, surface_brightness_statistics
from survey_infer.tasks.base import ArrayOutput, AsinhCutoutTask, OutputColumn

MAP_NAMES = ("log_sigma_mstar", "log_z_star", "log_age_mw", "log_sigma_sfr", "log_sigma_gas", "log_z_gas")
MAP_UNITS = {
    "log_sigma_mstar": "dex(solMass / kpc2)", "log_z_star": "dex", "log_age_mw": "dex(yr)",
    "log_sigma_sfr": "dex(solMass / (yr kpc2))", "log_sigma_gas": "dex(solMass / kpc2)", "log_z_gas": "dex",
}  # fmt: skip
MAP_DESCRIPTIONS = {
    "log_sigma_mstar": "stellar surface mass density", "log_z_star": "mass-weighted log10 stellar Z/Zsun",
    "log_age_mw": "mass-weighted log10 stellar age", "log_sigma_sfr": "SFR surface density (last 100 Myr)",
    "log_sigma_gas": "gas surface mass density", "log_z_gas": "log10 gas-phase Z/Zsun",
}  # fmt: skip
IMAGE_UNITS = "nmgy_arcsec2"
FOV_IN_HALF_LIGHT_RADII = 10.0  # the framing of the training cutouts (survey_infer.stamps frames real ones so)
SUMMARIES = (
    ("log_mstar_map", "dex(Msun)", "log10 stellar mass summed over the non-empty pixels of the predicted map"),
    ("log_sfr_map", "dex(Msun/yr)", "log10 SFR summed over the non-empty pixels of the predicted map"),
    ("log_mgas_map", "dex(Msun)", "log10 gas mass summed over the non-empty pixels of the predicted map"),
    ("log_age_map", "dex(yr)", "stellar-mass-weighted mean of the predicted log10 age map"),
    ("log_z_star_map", "dex", "stellar-mass-weighted mean of the predicted log10 stellar Z/Zsun map"),
    ("empty_fraction", "", "fraction of pixels predicted empty in the stellar-mass map"),
)




class PropertyMaps(AsinhCutoutTask):
    name = "property_maps"
    array_store = "maps.zarr"
    input_statistic_names = SB_STATISTIC_NAMES  # the ood score's view of the light (trust)

    def input_statistics(self, batch: np.ndarray, bundle: Bundle) -> np.ndarray:
        """Per-band S/N, light concentration for the framing and colours (imaging.surface_brightness_statistics)."""
        return surface_brightness_statistics(batch, FOV_IN_HALF_LIGHT_RADII)

    def check_store(self, info, bundle: Bundle):
        spec = bundle.input_spec["image"]
        if info.kind != "cutouts":
            raise StoreError(f"property_maps reads pre-cut cutouts in surface brightness; {info.path} is a "
                             f"{info.kind} store")  # fmt: skip
        bands = list(spec.get("bands") or [])
        if list(info.bands) != bands:
            raise StoreError(f"store {info.path} has bands {list(info.bands)} (attrs 'bands'); bundle {bundle.id} "
                             f"needs the bands {bands} in this order")  # fmt: skip
        super().check_store(info, bundle)
        wanted = spec.get("image_units", IMAGE_UNITS)
        got = (info.attrs.get("survey") or {}).get("image_units")
        if got != wanted:
            raise StoreError(
                f"array 'images' in {info.path} holds {got or 'unstated units'} (attrs survey.image_units); bundle "
                f"{bundle.id} needs linear surface brightness, survey.image_units = {wanted!r} (nanomaggies per "
                f"arcsec^2, sky subtracted), not per-cutout log-scaled images"
            )
        return None

    def input_columns(self, bundle: Bundle) -> list[str]:
        return ["size_kpc", "distance_mpc"]

    def output_columns(self, bundle: Bundle) -> list[OutputColumn]:
        return [OutputColumn(n, "float32", unit, desc) for n, unit, desc in SUMMARIES]

    def array_outputs(self, bundle: Bundle) -> list[ArrayOutput]:
        shape = tuple(bundle.input_spec["image"]["shape"][1:])
        names = list(MAP_NAMES)
        attrs = {"names": names, "units": [MAP_UNITS[n] for n in names], "empty": "NaN"}
        return [
            ArrayOutput("maps", (len(names), *shape), "float32", "see attrs units",
                        "log10 property maps in attrs 'names' order; NaN = predicted empty", attrs),
            ArrayOutput("maps_err", (len(names), *shape), "float32", "dex",
                        "1-sigma uncertainty of each map pixel (dex)", {"names": names}),
            ArrayOutput("pixel_scale_arcsec", (), "float64", "arcsec",
                        "pixel scale of the row's maps (the cutout's)"),
        ]  # fmt: skip

    def postprocess(self, outputs, columns, flags, bundle):
        raw = np.asarray(outputs["maps"], dtype=np.float32)
        n = len(raw)
        if raw.ndim != 4 or raw.shape[1] != len(MAP_NAMES):
            raise BundleError(f"bundle {bundle.id}: engine output 'maps' has shape {raw.shape}; (N, 6, H, W) expected")
        no_estimate = (flags & NO_ESTIMATE) != 0
        empty = self._empty_pixels(outputs, no_estimate, bundle)
        nan = np.float32(np.nan)
        maps = np.where(empty, nan, raw)
        err = self._map_errors(outputs, bundle)
        np.copyto(err, nan, where=empty)
        pix_kpc = FOV_IN_HALF_LIGHT_RADII * np.asarray(columns.get("size_kpc", np.full(n, np.nan)), np.float64) / raw.shape[-1]
        known = np.isfinite(pix_kpc) & (pix_kpc > 0)
        flags[~known & ~no_estimate] |= FLAG_BITS["missing_metadata"]
        sums = _map_summaries(raw, empty, np.where(known, pix_kpc**2, np.nan))
        for value in sums.values():
            value[no_estimate] = np.nan
        distance = np.asarray(columns.get("distance_mpc", np.full(n, np.nan)), dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            pixel_scale = np.where(known & np.isfinite(distance) & (distance > 0), pix_kpc / distance * 206.264806,
                                   np.nan)  # fmt: skip
        return {**sums, "maps": maps, "maps_err": err, "pixel_scale_arcsec": pixel_scale}

    @staticmethod
    def _empty_pixels(outputs, no_estimate: np.ndarray, bundle) -> np.ndarray:
        """(N, 6, H, W) bool: pixels predicted empty (probability above the bundle's threshold) or of rows
        without an estimate (``no_estimate`` (N,) bool)."""
        threshold = float(bundle.output_spec.get("empty_probability_threshold", 0.5))
        empty = np.asarray(outputs["empty_logit"]) > np.float32(np.log(threshold / (1.0 - threshold)))
        if no_estimate.any():
            empty[no_estimate] = True
        return empty

    @staticmethod
    def _map_errors(outputs, bundle) -> np.ndarray:
        """1-sigma dex per pixel: the network's sigma times the bundle's per-map scale (float32, a new array)."""
        scale = np.asarray(bundle.output_spec.get("maps_err", {}).get("scale", [1.0] * len(MAP_NAMES)), np.float32)
        err = np.exp(np.float32(0.5) * np.asarray(outputs["maps_logvar"], dtype=np.float32))
        err *= scale[None, :, None, None]
        return err

    def example_inputs(self, bundle, n_rows, seed=0):
        rng = np.random.default_rng(seed)
        shape = tuple(bundle.input_spec["image"]["shape"])
        return {"image": rng.normal(0.0, 1.5, size=(n_rows, *shape)).astype(np.float32)}


LN10 = np.float32(np.log(10.0))
TOTALS = (("log_mstar_map", 0), ("log_sfr_map", 3), ("log_mgas_map", 4))
MASS_WEIGHTED = (("log_age_map", 2), ("log_z_star_map", 1))


def _map_summaries(raw: np.ndarray, empty: np.ndarray, pixel_area: np.ndarray) -> dict[str, np.ndarray]:
    """The catalog's per-object summaries of a batch's maps (float32 (N,) each): totals over the non-empty pixels
    (x pixel area in kpc^2; -inf when every pixel is empty), stellar-mass-weighted means, the empty fraction.
    Linear values in float32 (maps are <= ~1e12), sums in float64: the hot path of every row."""
    filled = ~empty  # 0/1 products below: a masked assignment or np.where costs several times as much
    linear = np.exp(LN10 * raw[:, [k for _, k in TOTALS]]) * filled[:, [k for _, k in TOTALS]]
    with np.errstate(divide="ignore", invalid="ignore"):
        totals = linear.sum(axis=(2, 3), dtype=np.float64) * pixel_area[:, None]
        sums = {col: np.log10(totals[:, i]) for i, (col, _) in enumerate(TOTALS)}
        mass = linear[:, 0]
        for col, k in MASS_WEIGHTED:
            weight = mass * filled[:, k]
            weight_sum = weight.sum(axis=(1, 2), dtype=np.float64)
            weighted = np.einsum("nij,nij->n", weight, raw[:, k], dtype=np.float64)
            sums[col] = np.where(weight_sum > 0, weighted / weight_sum, np.nan)
    sums["empty_fraction"] = empty[:, 0].mean(axis=(1, 2))
    return {col: np.asarray(sums[col], dtype=np.float32) for col, _, _ in SUMMARIES}


TASK = PropertyMaps()
