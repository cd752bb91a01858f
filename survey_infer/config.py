"""The typed configuration of a run, checked on construction (the CLI builds one from its flags)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from survey_infer.engines.base import ENGINE_NAMES, PRECISIONS
from survey_infer.engines.base import default_threads as available_cores
from survey_infer.errors import RefusedError

DEFAULT_RETRIES = 2
CLUSTERS = ("local", "cuda", "slurm", "pbs")  # --cluster: LocalCluster, dask-cuda, dask-jobqueue SLURM / PBS
BATCH_CLUSTERS = ("slurm", "pbs")
DEFAULT_JOB_MEMORY = "4GB"  # per batch job (one Dask worker process with --cores threads)
DEFAULT_WALLTIME = "01:00:00"
_WALLTIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # MM, HH:MM:SS, D-HH:MM:SS (SLURM and PBS both read it)


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
    cluster: local (LocalCluster), cuda (dask-cuda LocalCUDACluster, one worker per GPU), slurm or pbs
        (dask-jobqueue: ``jobs`` batch jobs of one worker process with ``cores`` threads and ``memory`` each,
        ``walltime``, ``queue``, ``account``; ``interface`` e.g. lo keeps scheduler and workers on it;
        ``worker_wait`` seconds to wait for the first worker, default forever).
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
    cluster: str = "local"
    jobs: int | None = None
    cores: int | None = None
    memory: str | None = None
    walltime: str | None = None
    queue: str | None = None
    account: str | None = None
    interface: str | None = None
    worker_wait: float | None = None

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
        self._check_cluster()
        self.threads_per_worker_given = self.threads_per_worker is not None  # not a field: not in the record
        if self.threads_per_worker is None:
            self.threads_per_worker = max(1, available_cores() // self.workers)

    def _check_cluster(self) -> None:
        if self.cluster not in CLUSTERS:
            raise RefusedError(f"unknown cluster {self.cluster!r}; choose one of {', '.join(CLUSTERS)}")
        batch_only = ("jobs", "cores", "memory", "walltime", "queue", "account")
        if self.cluster not in BATCH_CLUSTERS:
            given = [f"--{n}" for n in batch_only if getattr(self, n) is not None]
            if given:
                raise RefusedError(f"{', '.join(given)}: only for --cluster slurm or pbs (this run has --cluster {self.cluster})")
        if self.scheduler and self.cluster != "local":
            raise RefusedError(f"--scheduler connects to a running scheduler; it cannot be combined with --cluster {self.cluster}")
        for name in ("jobs", "cores"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise RefusedError(f"--{name} must be a positive integer, got {value!r}")
        if self.memory is not None:
            from dask.utils import parse_bytes

            try:
                ok = parse_bytes(str(self.memory)) > 0
            except (ValueError, TypeError):
                ok = False
            if not ok:
                raise RefusedError(f"--memory {self.memory!r} is not an amount of memory such as 4GB or 16000MB")
        if self.walltime is not None and not _WALLTIME.match(str(self.walltime)):
            raise RefusedError(f"--walltime {self.walltime!r} is not MM, HH:MM:SS or D-HH:MM:SS")
        for name in ("queue", "account", "interface"):
            value = getattr(self, name)
            if value is not None and (not str(value).strip() or any(c.isspace() for c in str(value))):
                raise RefusedError(f"--{name} {value!r} must be one word")
        if self.worker_wait is not None and not self.worker_wait > 0:
            raise RefusedError(f"--worker-wait must be > 0 seconds, got {self.worker_wait!r}")

    @property
    def batch_cluster(self) -> bool:
        return self.cluster in BATCH_CLUSTERS

    def job_resources(self) -> dict:
        """One batch job's resources (defaults filled in): jobs, cores, memory, walltime, queue, account."""
        return {"jobs": self.jobs or 1, "cores": self.cores or 1, "memory": self.memory or DEFAULT_JOB_MEMORY,
                "walltime": self.walltime or DEFAULT_WALLTIME, "queue": self.queue, "account": self.account}

    def resolved_engine_threads(self) -> int:
        """Threads per inference call: the local cores shared out across every worker thread.

        0 means "let each worker decide" (a remote scheduler: the client cannot see the workers' cores).
        """
        if self.engine_threads:
            return self.engine_threads
        if self.scheduler or self.cluster != "local":
            return 0
        return max(1, available_cores() // (self.workers * self.threads_per_worker))

    def resolved_max_in_flight(self) -> int:
        if self.max_in_flight:
            return self.max_in_flight
        if self.batch_cluster:
            resources = self.job_resources()
            return 2 * resources["jobs"] * resources["cores"]
        return 2 * self.workers * self.threads_per_worker

    def to_record(self) -> dict:
        record = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in record.items()}
