"""Dask clients for a run: an in-process LocalCluster by default, or a running scheduler's address."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import dask
from distributed import Client, LocalCluster

from survey_infer.config import RunConfig


# The workers' statistical profiler costs ~2% of a core per worker for nothing a batch job reads. Dask's
# nannies set MALLOC_TRIM_THRESHOLD_ in the workers, which also turns off glibc's adaptive mmap threshold: every
# batch-sized array is then a fresh mmap, zeroed page by page (8 page faults and ~15 us of system time per
# cutout here). A batch job's working set is flat, so the workers keep glibc's defaults.
WORKER_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
}


@contextlib.contextmanager
def client_for(config: RunConfig) -> Iterator[Client]:
    """A client for the run: connect to ``config.scheduler`` or start a LocalCluster of worker processes."""
    if config.scheduler:
        with Client(config.scheduler) as client:
            yield client
        return
    with dask.config.set(WORKER_CONFIG):
        cluster = LocalCluster(
            n_workers=config.workers,
            threads_per_worker=config.threads_per_worker,
            processes=not config.in_process,
            dashboard_address=":0",  # a free port: never clash with another run
            silence_logs=logging.ERROR,
        )
    with cluster, Client(cluster) as client:
        yield client
