"""Worker-side mechanics: engines load once per worker, reads run ahead of inference."""

from __future__ import annotations

import threading

import pytest
from distributed import Client, LocalCluster

from survey_infer.config import RunConfig
from survey_infer.pipeline import run_pipeline
from survey_infer.worker import prefetched


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

            per_worker = client.run(loaded_keys)
    assert list(per_worker.values()) == [[("torch", 1)], [("torch", 1)]]
