"""A task's array outputs (maps.zarr, sfh.zarr): whole chunks per unit, aligned with the catalog, exactly once.

The machinery is shown with a test task: mass_to_light plus a row array (each row's image, echoed) and, in a
second variant, one array group per unit (as the IFU task writes per cube).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from distributed import Client, LocalCluster

from survey_infer import paths
from survey_infer.array_outputs import (
    RowArrayWriter,
    create_row_arrays,
    unit_chunk_rows,
    write_group_atomic,
    write_row_arrays,
)
from survey_infer.config import RunConfig
from survey_infer.errors import RefusedError
from survey_infer.outputs import read_done_marker
from survey_infer.pipeline import run_pipeline
from survey_infer.tasks import _TASK_MODULES
from survey_infer.tasks.base import ArrayOutput, UnitResult
from survey_infer.tasks.mass_to_light import MassToLight
from tests.conftest import assert_exactly_once, read_parts


class EchoMaps(MassToLight):
    """mass_to_light that also writes each row's image as a (1, 69, 69) map."""

    array_store = paths.MAPS_STORE

    def array_outputs(self, bundle):
        return [ArrayOutput("echo", (1, 69, 69), "float32", "", "the input cutout", {"planes": ["g"]})]

    def prepare(self, images, columns, bundle):
        inputs, flags = super().prepare(images, columns, bundle)
        self._last_images = images  # one unit at a time per thread in these tests (1 thread)
        return inputs, flags

    def postprocess(self, outputs, columns, flags, bundle):
        return {**super().postprocess(outputs, columns, flags, bundle), "echo": self._last_images.copy()}


class GroupPerUnit(MassToLight):
    """mass_to_light that writes one group per unit holding its rows' ml_g, keyed by its first object id."""

    array_store = paths.SFH_STORE

    def finish_unit(self, results, columns, bundle):
        name = f"first-{int(columns['object_id'][0])}"
        return UnitResult(rows=results, groups={name: {"ml_g": results["ml_g"]}}, group_attrs={name: {"n": 1}})


TASK = EchoMaps()


@pytest.fixture
def client():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as c:
            yield c


@pytest.fixture
def echo_task(monkeypatch):
    global TASK
    TASK = EchoMaps()
    monkeypatch.setitem(_TASK_MODULES, "mass_to_light", __name__)
    return TASK


def test_unit_chunks_follow_the_unit_boundaries():
    assert unit_chunk_rows(((0, 128), (128, 256), (256, 300))) == 128
    assert unit_chunk_rows(((0, 6), (6, 10), (10, 19))) == 2  # tiles: uneven units, whole chunks still
    assert unit_chunk_rows(((0, 50),)) == 50
    assert unit_chunk_rows(((0, 128), (128, 256), (256, 300)), rows_per_read=64) == 64  # a batch = a chunk
    assert unit_chunk_rows(((0, 100), (100, 200)), rows_per_read=64) == 100  # batches off the unit grid: units


def test_row_array_writer_writes_whole_chunks_as_batches_arrive(tmp_path):
    store = tmp_path / "maps.zarr"
    outputs = [ArrayOutput("maps", (2,), "float32", "", "test")]
    create_row_arrays(store, outputs, 12, ((0, 8), (8, 12)), {}, rows_per_read=4)
    assert zarr.open_array(str(store / "maps"), mode="r").chunks == (4, 2)
    writer = RowArrayWriter(store, 0, 8)
    writer.add(np.arange(4), {"maps": np.full((4, 2), 1.0, np.float32)})
    assert writer.written == 4 and not writer.pending  # written at once, no unit-sized buffer
    with pytest.raises(ValueError, match="got rows \\[0, 4\\) for a unit of \\[0, 8\\)"):
        writer.close()  # a unit whose batches fall short is refused, not marked whole
    writer.add(np.arange(4, 8), {"maps": np.full((4, 2), 2.0, np.float32)})
    writer.close()
    with pytest.raises(ValueError, match="past row 8"):
        writer.add(np.arange(2), {"maps": np.zeros((2, 2), np.float32)})
    written = zarr.open_array(str(store / "maps"), mode="r")[:]
    assert np.array_equal(written[:8, 0], [1.0] * 4 + [2.0] * 4) and np.isnan(written[8:]).all()
    uneven = RowArrayWriter(store, 8, 12)  # batches of 3 and 1 rows: held until they reach a chunk's end
    uneven.add(np.arange(8, 11), {"maps": np.full((3, 2), 3.0, np.float32)})
    assert uneven.written == 8 and uneven.pending_rows == 3
    uneven.add(np.arange(11, 12), {"maps": np.full((1, 2), 4.0, np.float32)})
    assert uneven.written == 12
    assert np.array_equal(zarr.open_array(str(store / "object_id"), mode="r")[:], np.arange(12))


def test_row_arrays_of_another_shape_are_refused_on_resume(tmp_path):
    store = tmp_path / "maps.zarr"
    outputs = [ArrayOutput("maps", (2, 4, 4), "float32", "dex", "test")]
    create_row_arrays(store, outputs, 10, ((0, 5), (5, 10)), {})
    create_row_arrays(store, outputs, 10, ((0, 5), (5, 10)), {})  # the same again: kept
    with pytest.raises(RefusedError, match=r"array 'maps' .* has shape \(10, 2, 4, 4\)"):
        create_row_arrays(store, [ArrayOutput("maps", (3, 4, 4), "float32", "dex", "test")], 10, ((0, 10),), {})
    with pytest.raises(ValueError, match="'maps' has 4 rows for a batch of 5"):
        write_row_arrays(store, 0, 5, np.arange(5), {"maps": np.zeros((4, 2, 4, 4), np.float32)})


def test_background_row_writes_land_by_close_and_raise_their_errors_there(tmp_path):
    store = tmp_path / "maps.zarr"
    create_row_arrays(store, [ArrayOutput("maps", (2,), "float32", "", "test")], 12, ((0, 12),), {}, rows_per_read=4)
    writer = RowArrayWriter(store, 0, 12, background=True)
    for k in range(3):
        writer.add(np.arange(4 * k, 4 * k + 4), {"maps": np.full((4, 2), float(k), np.float32)})
    writer.close()
    np.testing.assert_array_equal(zarr.open_array(str(store / "maps"), mode="r")[:, 0], np.repeat([0.0, 1.0, 2.0], 4))
    failing = RowArrayWriter(store, 0, 12, background=True)
    failing.add(np.arange(4), {"maps": np.zeros((4, 3), np.float32)})  # the wrong shape: zarr refuses, in the thread
    with pytest.raises(ValueError):
        failing.close()
    abandoned = RowArrayWriter(store, 0, 12, background=True)
    abandoned.add(np.arange(4), {"maps": np.full((4, 2), 9.0, np.float32)})
    abandoned.abandon()  # waits for the write already running; nothing of it comes later
    assert zarr.open_array(str(store / "maps"), mode="r")[0, 0] == 9.0 and abandoned._executor._shutdown


def test_group_written_again_replaces_the_old_one_whole(tmp_path):
    store = tmp_path / "sfh.zarr"
    zarr.open_group(str(store), mode="w", zarr_format=3)
    write_group_atomic(store, "cube-1", {"a": np.ones((2, 3)), "b": np.zeros(4)}, {"note": "first"})
    write_group_atomic(store, "cube-1", {"a": np.full((2, 3), 7.0)}, {"note": "second"})
    group = zarr.open_group(str(store), mode="r")["cube-1"]
    assert sorted(group.array_keys()) == ["a"] and group.attrs["note"] == "second"
    np.testing.assert_array_equal(group["a"][:], 7.0)
    assert not list((tmp_path / ".array-groups.tmp").iterdir())
    with pytest.raises(ValueError, match="must be non-empty"):
        write_group_atomic(store, "../x", {"a": np.ones(1)}, {})


def test_row_arrays_align_with_catalog_and_survive_a_resume(client, echo_task, small_store, tmp_path, tiny_bundle):
    out = tmp_path / "out"
    config = RunConfig(input=small_store, output=out, bundle=tiny_bundle, task="mass_to_light", engine="torch",
                       progress=False, build_catalog=False)  # fmt: skip
    assert run_pipeline(config, client).exit_code == 0
    maps = zarr.open_group(str(out / "maps.zarr"), mode="r")
    assert maps["echo"].shape == (600, 1, 69, 69) and maps["echo"].chunks[0] == 64  # a batch of the store
    assert maps["echo"].attrs["planes"] == ["g"]
    images = zarr.open_group(str(small_store), mode="r")["images"][:]
    catalog = read_parts(out).set_index("object_id")
    ids = maps["object_id"][:]
    np.testing.assert_array_equal(np.sort(ids), np.arange(600))
    np.testing.assert_array_equal(maps["echo"][:], images)  # row i of the maps is row i of the store
    assert catalog.loc[ids].index.tolist() == ids.tolist()  # and joins to the catalog by object_id

    # A unit whose map region was damaged and whose done marker is gone is redone whole; nothing is lost.
    echo = zarr.open_array(str(out / "maps.zarr" / "echo"), mode="r+")
    echo[128:256] = np.nan
    paths.done_marker_path(out, 1).unlink()
    assert read_done_marker(out, 1) is None
    record = run_pipeline(config, client).record
    assert record["units"]["ran"] == 1 and record["arrays"]["arrays"] == ["echo"]
    np.testing.assert_array_equal(zarr.open_group(str(out / "maps.zarr"), mode="r")["echo"][:], images)
    assert_exactly_once(out, 600)


def test_one_group_per_unit_and_overwrite_clears_the_old_store(client, monkeypatch, small_store, tmp_path, tiny_bundle):
    global TASK
    TASK = GroupPerUnit()
    monkeypatch.setitem(_TASK_MODULES, "mass_to_light", __name__)
    out = tmp_path / "out"
    (out / "sfh.zarr" / "stale").mkdir(parents=True)
    (out / "run.json").write_text("{}")
    config = RunConfig(input=small_store, output=out, bundle=tiny_bundle, task="mass_to_light", engine="torch",
                       progress=False, build_catalog=False, overwrite=True)  # fmt: skip
    record = run_pipeline(config, client).record
    assert record["arrays"]["layout"] == "groups"
    root = zarr.open_group(str(out / "sfh.zarr"), mode="r")
    assert sorted(root.group_keys()) == [f"first-{s}" for s in sorted((0, 128, 256, 384, 512), key=str)]
    catalog = read_parts(out).set_index("object_id")
    np.testing.assert_allclose(root["first-128"]["ml_g"][:], catalog.loc[range(128, 256), "ml_g"].to_numpy())
    assert not (out / "sfh.zarr" / "stale").exists()


def test_a_batch_of_empty_rows_still_writes_its_chunk(tmp_path):
    """Units own their chunks and write them whole, NaN or not (zarr's empty-chunk test is skipped: it cost a third
    of the write), so a redone unit always replaces what an earlier attempt wrote."""
    store = tmp_path / "maps.zarr"
    create_row_arrays(store, [ArrayOutput("maps", (2,), "float32", "", "test")], 8, ((0, 8),), {}, rows_per_read=4)
    writer = RowArrayWriter(store, 0, 8)
    writer.add(np.arange(4), {"maps": np.full((4, 2), np.nan, np.float32)})
    writer.add(np.arange(4, 8), {"maps": np.ones((4, 2), np.float32)})
    writer.close()
    assert sorted(p.name for p in (store / "maps" / "c").iterdir()) == ["0", "1"]
