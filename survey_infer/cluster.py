"""Dask clients for a run: a LocalCluster by default, dask-cuda's one worker per GPU, dask-jobqueue batch jobs
(SLURM, PBS), or a running scheduler's address.

`client_for(config)` is the one place that starts a cluster; the pipeline only ever sees the client.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Iterator

import dask
from distributed import Client, LocalCluster

from survey_infer.config import RunConfig, available_cores
from survey_infer.errors import RefusedError

log = logging.getLogger(__name__)

# The workers' statistical profiler costs ~2% of a core per worker for nothing a batch job reads. Dask's
# nannies set MALLOC_TRIM_THRESHOLD_ in the workers, which also turns off glibc's adaptive mmap threshold: every
# batch-sized array is then a fresh mmap, zeroed page by page (8 page faults and ~15 us of system time per
# cutout here). A batch job's working set is flat, so the workers keep glibc's defaults.
WORKER_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
}
# Batch-job workers start in another process on another node: the same settings reach them through the
# variable dask reads at import (what LocalCluster's spawned workers inherit too).
INHERIT_CONFIG_VARIABLE = "DASK_INTERNAL_INHERIT_CONFIG"
JOB_NAME = "survey-infer"


def job_logs_dir(config: RunConfig) -> Path:
    """Where the batch jobs of a ``--cluster slurm|pbs`` run write their logs: beside the output directory."""
    return config.output.parent / f"{config.output.name}.jobs"


def worker_config_prologue() -> list[str]:
    """Shell lines for a batch job script that give its Dask worker ``WORKER_CONFIG``."""
    nested: dict = {}
    for dotted, value in WORKER_CONFIG.items():
        *parents, leaf = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    serialized = dask.config.serialize(nested)
    return [f"export {INHERIT_CONFIG_VARIABLE}={serialized}"]  # base64 text: safe unquoted


def jobqueue_cluster(config: RunConfig):
    """The dask-jobqueue cluster (not yet scaled) for ``--cluster slurm|pbs``."""
    try:
        import dask_jobqueue
    except ImportError as exc:
        raise RefusedError(f"--cluster {config.cluster} needs dask-jobqueue (pip install dask-jobqueue): {exc}") from exc
    resources = config.job_resources()
    kwargs = dict(
        cores=resources["cores"], processes=1, memory=resources["memory"], walltime=resources["walltime"],
        queue=resources["queue"], account=resources["account"], job_name=JOB_NAME, python=sys.executable,
        job_script_prologue=worker_config_prologue(), log_directory=str(job_logs_dir(config)),
        scheduler_options={"dashboard_address": ":0"}, silence_logs="error",
    )  # fmt: skip
    if config.interface:  # scheduler and workers listen on this interface (lo: a single-node cluster)
        kwargs["interface"] = config.interface
    cls = dask_jobqueue.SLURMCluster if config.cluster == "slurm" else dask_jobqueue.PBSCluster
    job_logs_dir(config).mkdir(parents=True, exist_ok=True)
    return cls(**kwargs)


def cuda_cluster(config: RunConfig):
    """dask-cuda's LocalCUDACluster: one worker per visible GPU, each pinned to its GPU (CUDA_VISIBLE_DEVICES)."""
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as exc:
        raise RefusedError(f"--cluster cuda needs dask-cuda (pip install 'survey-infer[gpu]' on a GPU node): {exc}") from exc
    try:
        from dask_cuda.utils import get_n_gpus

        # the node's cores shared out over its GPU workers, unless --threads-per-worker says otherwise
        threads = config.threads_per_worker if config.threads_per_worker_given else max(1, available_cores() // max(1, get_n_gpus()))
        return LocalCUDACluster(threads_per_worker=threads, dashboard_address=":0", silence_logs=logging.ERROR)
    except Exception as exc:  # no GPU, no NVML: say so before any work
        raise RefusedError(f"--cluster cuda could not start a LocalCUDACluster: {type(exc).__name__}: {exc}") from exc


def wait_for_first_worker(client: Client, config: RunConfig) -> None:
    """Batch jobs may queue: wait for one worker (forever unless ``worker_wait``), refuse clearly after that."""
    try:
        client.wait_for_workers(1, timeout=config.worker_wait)
    except TimeoutError as exc:
        raise RefusedError(
            f"no Dask worker joined within --worker-wait {config.worker_wait:g} s: the {config.cluster} jobs are "
            f"still queued or failed to start (job logs: {job_logs_dir(config)})"
        ) from exc


@contextlib.contextmanager
def client_for(config: RunConfig) -> Iterator[Client]:
    """A client for the run: connect to ``config.scheduler`` or start the cluster ``config.cluster`` names."""
    if config.scheduler:
        with Client(config.scheduler) as client:
            yield client
        return
    with dask.config.set(WORKER_CONFIG):
        if config.batch_cluster:
            cluster = jobqueue_cluster(config)
            log.info("%s job script:\n%s", config.cluster, cluster.job_script())
            cluster.scale(jobs=config.job_resources()["jobs"])
        elif config.cluster == "cuda":
            cluster = cuda_cluster(config)
        else:
            cluster = LocalCluster(
                n_workers=config.workers,
                threads_per_worker=config.threads_per_worker,
                processes=not config.in_process,
                dashboard_address=":0",  # a free port: never clash with another run
                silence_logs=logging.ERROR,
            )
    with cluster, Client(cluster) as client:
        if config.batch_cluster:
            wait_for_first_worker(client, config)
        yield client
