"""What a task declares (specs, pre- and post-processing); the pipeline owns the loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa

from survey_infer.errors import BundleError, StoreError
from survey_infer.flags import NO_ESTIMATE, image_flags
from survey_infer.imaging import asinh_transform

if TYPE_CHECKING:
    from survey_infer.bundle import Bundle
    from survey_infer.store import CutoutStoreInfo
    from survey_infer.tiles import CutSpec, TilesStoreInfo


@dataclass(frozen=True)
class OutputColumn:
    """One catalog column a task writes, with its unit (recorded in the Parquet schema)."""

    name: str
    dtype: str
    unit: str
    description: str
    arrow_type: pa.DataType | None = None  # a list column's type (dtype is then its values' dtype)

    def field(self) -> pa.Field:
        kind = self.arrow_type if self.arrow_type is not None else pa.from_numpy_dtype(np.dtype(self.dtype))
        return pa.field(self.name, kind, metadata={"unit": self.unit, "description": self.description})


@dataclass(frozen=True)
class ArrayOutput:
    """One row-aligned array a task writes beside the catalog: (N, *per_row_shape) in its ``array_store``."""

    name: str
    per_row_shape: tuple[int, ...]
    dtype: str
    unit: str
    description: str
    attrs: dict[str, Any] = field(default_factory=dict)  # e.g. the names of a map stack's planes


@dataclass
class UnitResult:
    """What a unit writes: catalog columns (one value per catalog row, ``flag`` and ``ood_score`` included),
    row arrays (one entry per catalog row) and groups of arrays of any shape (group name -> arrays)."""

    rows: dict[str, np.ndarray]
    row_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    groups: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    group_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)  # group name -> its attrs


class Task:
    """Base of every science task."""

    name: ClassVar[str]
    store_kind: ClassVar[str]
    array_store: ClassVar[str | None] = None  # e.g. "maps.zarr": the Zarr store its array outputs go to

    def output_columns(self, bundle: Bundle) -> list[OutputColumn]:
        raise NotImplementedError

    def array_outputs(self, bundle: Bundle) -> list[ArrayOutput]:
        """Row-aligned arrays written to ``array_store`` (survey_infer.array_outputs); none by default."""
        return []

    input_statistic_names: ClassVar[tuple[str, ...]] = ()  # what input_statistics returns, in order

    def input_statistics(self, batch, bundle: Bundle) -> np.ndarray:
        """Per-row numbers measured on the raw input batch (N, len(input_statistic_names)) float32, which the
        ood score uses beside the network's features when the bundle's trust names them (survey_infer.trust)."""
        raise NotImplementedError(f"task {self.name} measures no input statistics")

    def finish_unit(self, results: dict[str, np.ndarray], columns: dict[str, np.ndarray], bundle: Bundle) -> UnitResult:
        """Turn a unit's concatenated postprocess results (with ``ood_score`` and ``flag``) into what it writes.

        By default each result row is a catalog row and the results named by `array_outputs` are row arrays.
        A task whose rows are not the engine's rows (one IFU cube = one catalog row, its spaxels the engine's
        rows) reduces them here and returns its per-unit arrays as ``groups``.
        """
        names = {out.name for out in self.array_outputs(bundle)}
        return UnitResult(rows={k: v for k, v in results.items() if k not in names},
                          row_arrays={k: results[k] for k in names if k in results})  # fmt: skip

    def batch_row_arrays(self, bundle: Bundle) -> set[str]:
        """The results the worker writes as row arrays batch by batch (`array_outputs.RowArrayWriter`) instead of
        handing them to `finish_unit`: all row arrays, unless the task reduces its rows in its own finish_unit."""
        if type(self).finish_unit is not Task.finish_unit:
            return set()
        return {out.name for out in self.array_outputs(bundle)}

    options: ClassVar[dict[str, str]] = {}
    option_names: ClassVar[tuple[str, ...]] = ()  # the options a task accepts (``--task-option KEY=VALUE``)

    def with_options(self, options: dict[str, str] | None) -> Task:
        """This task configured with run options; unknown ones are refused (exit 2) before any work."""
        if not options:
            return self
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            from survey_infer.errors import RefusedError

            accepted = ", ".join(self.option_names) or "none"
            raise RefusedError(f"task {self.name} has no option {', '.join(unknown)} (it accepts: {accepted})")
        import copy

        configured = copy.copy(self)
        configured.options = dict(options)
        return configured


class CutoutTask(Task):
    """A task whose unit of work is a block of cutout rows.

    Subclasses say which per-object columns they read, turn a batch into named engine inputs (flagging what
    cannot be used), and turn engine outputs into catalog columns.
    """

    store_kind = "cutouts"

    def check_store(self, info: CutoutStoreInfo | TilesStoreInfo, bundle: Bundle) -> CutSpec | None:
        """Refuse a store that cannot feed the bundle; for a tiles store, say how to cut its cutouts."""
        spec = bundle.input_spec["image"]
        expected = tuple(spec["shape"])
        bands = spec.get("bands")
        if info.kind == "tiles":
            from survey_infer.tiles import make_cut_spec

            return make_cut_spec(info, list(bands or info.bands[: expected[0]]), expected, self.framing(bundle))
        if info.image_shape != expected:
            raise StoreError(
                f"array 'images' in {info.path} has cutouts of shape {info.image_shape} (C, H, W); bundle "
                f"{bundle.id} expects {expected}"
            )
        if bands and info.bands and list(info.bands) != list(bands):
            raise StoreError(f"store {info.path} has bands {info.bands}; bundle {bundle.id} expects {bands}")
        return None

    def framing(self, bundle: Bundle) -> dict:
        """How the training cutouts were framed, for cutting new ones from tiles: the bundle's
        ``input_spec.image.framing``, or a fixed ``pixel_scale`` (arcsec/px) it records."""
        spec = bundle.input_spec["image"]
        if "framing" in spec:
            return dict(spec["framing"])
        if "pixel_scale" in spec:
            return {"kind": "pixel_scale", "arcsec_per_px": float(spec["pixel_scale"])}
        raise StoreError(f"bundle {bundle.id} records neither a framing nor a pixel_scale for its cutouts, so "
                         f"cutouts cannot be cut from tiles for it")  # fmt: skip

    def input_columns(self, bundle: Bundle) -> list[str]:
        """Per-object columns read for each unit (besides object_id, ra, dec)."""
        return []

    def prepare(
        self, images: np.ndarray, columns: dict[str, np.ndarray], bundle: Bundle
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Engine inputs for a batch, and int32 flags (N,)."""
        raise NotImplementedError

    def postprocess(
        self, outputs: dict[str, np.ndarray], columns: dict[str, np.ndarray], flags: np.ndarray, bundle: Bundle
    ) -> dict[str, np.ndarray]:
        """Catalog columns (each (N,)) from engine outputs; may add flags in place."""
        raise NotImplementedError

    def example_inputs(self, bundle: Bundle, n_rows: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Random engine inputs of the right shapes (export, engine checks)."""
        raise NotImplementedError


class AsinhCutoutTask(CutoutTask):
    """A cutout task whose network reads ``asinh(flux / softening_band)`` of linear images, with the softening
    recorded in the bundle's ``input_spec.image.softening``; unusable cutouts are zeroed and flagged."""

    @staticmethod
    def softening(bundle: Bundle) -> list[float]:
        spec = bundle.input_spec["image"]
        if "softening" not in spec:
            raise BundleError(f"bundle {bundle.id}: input_spec.image has no 'softening' (one value per band)")
        return list(spec["softening"])

    def prepare(self, images, columns, bundle):
        flags = image_flags(images)
        usable = (flags & NO_ESTIMATE) == 0
        clean = images if usable.all() else np.where(usable[:, None, None, None], images, 0.0)
        return {"image": np.ascontiguousarray(asinh_transform(clean, self.softening(bundle)))}, flags
