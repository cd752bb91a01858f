"""What a task declares (specs, pre- and post-processing); the pipeline owns the loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import pyarrow as pa

from survey_infer.errors import StoreError

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


class Task:
    """Base of every science task."""

    name: ClassVar[str]
    store_kind: ClassVar[str]

    def output_columns(self, bundle: Bundle) -> list[OutputColumn]:
        raise NotImplementedError

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
