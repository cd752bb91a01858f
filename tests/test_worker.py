"""Worker-side mechanics: engines load once per worker, reads run ahead of inference."""

from __future__ import annotations

import platform
import threading

import pytest
from distributed import Client, LocalCluster

from survey_infer.config import RunConfig, available_cores
from survey_infer.pipeline import run_pipeline
from survey_infer.worker import keep_freed_memory, prefetched


def test_prefetch_reads_the_next_item_while_the_current_one_is_used():
    producing = [threading.Event() for _ in range(3)]

    def items():
        for index in range(3):
            producing[index].set()
            yield index

    seen = []
    for item in prefetched(items()):
        if item + 1 < 3:
            # Without read-ahead the producer would only start item+1 after this body ends: a deadlock.
            assert producing[item + 1].wait(timeout=10), f"item {item + 1} was not read ahead"
        seen.append(item)
    assert seen == [0, 1, 2]


def test_prefetch_hands_reader_errors_to_the_consumer():
    def broken():
        yield 1
        raise OSError("chunk 3 is truncated")

    with pytest.raises(OSError, match="truncated"):
        list(prefetched(broken()))


def test_engine_is_loaded_once_per_worker(small_store, tmp_path, tiny_bundle):
    config = RunConfig(task="mass_to_light", input=small_store, output=tmp_path / "out", bundle=tiny_bundle,
                       engine="torch", progress=False, build_catalog=False)  # fmt: skip
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            assert run_pipeline(config, client).exit_code == 0

            def loaded_keys():
                from survey_infer import worker

                return [(key.engine, count) for key, count in worker.ENGINE_LOADS.items()]

            def blas_threads():
                from threadpoolctl import threadpool_info

                return sorted({pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"})

            per_worker = client.run(loaded_keys)
            blas_per_worker = client.run(blas_threads)
    assert list(per_worker.values()) == [[("torch", 1)], [("torch", 1)]]
    # each of a worker's 2 threads runs inference of cores // 2 threads; numpy's BLAS gets the same, not all cores
    expected = [max(1, available_cores() // 2)]
    assert all(threads == expected for threads in blas_per_worker.values()), blas_per_worker


def test_workers_keep_freed_memory_for_the_next_batch():
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's; elsewhere the allocator is left alone")
    assert keep_freed_memory() is True  # both mallopt calls accepted
