"""`survey-infer build-engine`: build (or find cached) a bundle's TensorRT plan for this GPU and TensorRT.

The plan is what `--engine tensorrt` (and `auto` on a GPU) loads; building it here, once, before a run fans
out saves each worker the wait. The cache, its key and its lock are `survey_infer.engines.tensorrt_engine`'s.
INT8 plans calibrate on rows of a cutouts store prepared as a run prepares them (deploy.quantize).
"""

from __future__ import annotations

from pathlib import Path

from survey_infer.bundle import load_bundle
from survey_infer.engines.base import EngineUnavailable
from survey_infer.engines.tensorrt_engine import (
    PlanResult,
    TRT_PRECISIONS,
    build_plan_bytes,
    default_profile,
    ensure_plan,
    import_tensorrt,
    plan_key,
)
from survey_infer.errors import RefusedError

CALIBRATION_ROWS = 1024


def build_engine(bundle_dir: Path, *, precision: str = "fp16", max_batch: int = 1024, opt_batch: int | None = None,
                 calibration: Path | None = None, force: bool = False, seed: int = 0) -> PlanResult:  # fmt: skip
    """Build or find ``bundle_dir``'s plan for this GPU; refuses (RefusedError) where TensorRT cannot run."""
    if precision not in TRT_PRECISIONS:
        raise RefusedError(f"build-engine: precision {precision!r}; choose one of {', '.join(TRT_PRECISIONS)}")
    if precision == "int8" and calibration is None:
        raise RefusedError("build-engine --precision int8 needs --calibration STORE (a cutouts store to calibrate on)")
    if precision != "int8" and calibration is not None:
        raise RefusedError("build-engine: --calibration only applies to --precision int8")
    bundle = load_bundle(bundle_dir)
    try:
        import_tensorrt()
        profile = default_profile(max_batch, opt_batch)
        key = plan_key(bundle, precision=precision, profile=profile)
    except EngineUnavailable as exc:
        raise RefusedError(f"build-engine: {exc}") from exc
    rows = None
    if calibration is not None:
        from deploy.quantize import calibration_inputs

        rows = calibration_inputs(bundle, Path(calibration), CALIBRATION_ROWS, seed)
    try:
        return ensure_plan(bundle, key, lambda b, k: build_plan_bytes(b, k, rows), force=force)
    except EngineUnavailable as exc:
        raise RefusedError(f"build-engine: {exc}") from exc
