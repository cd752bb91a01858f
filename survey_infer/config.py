"""The typed configuration of a run, checked on construction (the CLI builds one from its flags)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from survey_infer.engines.base import ENGINE_NAMES, PRECISIONS
from survey_infer.engines.base import default_threads as available_cores
from survey_infer.errors import RefusedError

DEFAULT_RETRIES = 2


@dataclass
class RunConfig:
    """Everything a run needs. Defaults work out of the box on one machine.

    workers / threads_per_worker: the LocalCluster (ignored with ``scheduler``).
    in_process: run the LocalCluster's workers as threads of this process: less overhead (pipeline/engine
        throughput 1.00 against 0.88 on 2 cores, bench/README.md) but no fault isolation: a crashing worker
        takes the run down with it (finished units are kept; run the command again to resume).
    precision: fp32, or int8 for the bundle's quantized ONNX model (`survey-infer quantize`; ONNX Runtime).
    engine_threads: threads each inference call may use; by default the cores left per worker thread.
    rows_per_unit: rows in one unit of work; a multiple of the store's row block (default: one block).
    max_in_flight: units submitted but not finished at any time (default: 2 per worker thread).
    ood_threshold: flag rows ``ood`` above this quantile (0-1) of the bundle's held-out in-distribution
        ood_score distribution (default: the bundle's own threshold, its 99th percentile; survey_infer.trust).
    """

    task: str
    input: Path
    output: Path
    bundle: Path | None = None
    engine: str = "auto"
    device: str = "auto"
    precision: str = "fp32"
    workers: int = 1
    threads_per_worker: int | None = None
    in_process: bool = False
    engine_threads: int | None = None
    scheduler: str | None = None
    rows_per_unit: int | None = None
    max_in_flight: int | None = None
    retries: int = DEFAULT_RETRIES
    overwrite: bool = False
    build_catalog: bool = True
    progress: bool = True
    task_options: dict[str, str] | None = None  # the task's own options (Task.with_options), e.g. samples
    ood_threshold: float | None = None

    def __post_init__(self) -> None:
        self.input = Path(self.input)
        self.output = Path(self.output)
        self.bundle = Path(self.bundle) if self.bundle is not None else None
        if self.engine not in ENGINE_NAMES:
            raise RefusedError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINE_NAMES)}")
        if self.precision not in PRECISIONS:
            raise RefusedError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        for name in ("workers", "threads_per_worker", "engine_threads", "rows_per_unit", "max_in_flight"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise RefusedError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.ood_threshold is not None:
            from survey_infer.trust import check_quantile

            self.ood_threshold = check_quantile(self.ood_threshold)
        if self.retries < 0:
            raise RefusedError(f"--retries must be >= 0, got {self.retries}")
        if self.threads_per_worker is None:
            self.threads_per_worker = max(1, available_cores() // self.workers)

    def resolved_engine_threads(self) -> int:
        """Threads per inference call: the local cores shared out across every worker thread.

        0 means "let each worker decide" (a remote scheduler: the client cannot see the workers' cores).
        """
        if self.engine_threads:
            return self.engine_threads
        if self.scheduler:
            return 0
        return max(1, available_cores() // (self.workers * self.threads_per_worker))

    def resolved_max_in_flight(self) -> int:
        return self.max_in_flight or 2 * self.workers * self.threads_per_worker

    def to_record(self) -> dict:
        record = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in record.items()}
