"""A million cutouts on this machine: mass_to_light end to end, peak memory of every process, flat in N.

    python bench/million.py --n 1000000 --compare 100000

1. Codec: on a sample of mock cutouts, the on-disk size and the read CPU per cutout of float32/float16 x
   blosc-lz4/blosc-zstd/uncompressed. The store uses the cheapest read whose full size fits the disk with room
   to spare (--codec/--dtype force one). float16 storage is checked against float32 on the same cutouts: the
   largest change of ml_g it causes is printed.
2. Mocks the stores of --compare and --n cutouts with the mock universe (cached in --workdir; parallel over
   the cores, each process writing whole shards).
3. Bare reference: the fastest CPU engine (ONNX Runtime at all cores, --precision fp32 or int8) on 4,096
   in-memory cutouts, before and after the runs (this VM's speed drifts: the reference is their mean), each
   time the faster of one session x all cores and one 1-thread session per core side by side.
4. Each N, in a fresh process: `run_pipeline` exactly as `survey-infer run` does it (LocalCluster of worker
   processes, HATS catalog built), while a thread samples every 0.5 s the RSS of that process (the client, which
   hosts the scheduler and the nannies) and of each Dask worker. Peaks are given over the whole run, over its units (up to
   the last unit's done marker) and over the HATS catalog build (hats-import runs on the same workers). Rows are
   counted in the Parquet parts and in the HATS catalog (catalogs.open_run), and object ids checked unique.
Prints one table (both N side by side) ending with `pipeline_vs_engine <ratio>` for the largest N.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from throughput import CpuMonitor, _cpu_model, bare_inputs, bare_label, log  # noqa: E402
from throughput import measure_bare_modes, tree_bytes  # noqa: E402

from survey_infer.bundle import default_bundle_path, load_bundle  # noqa: E402
from survey_infer.config import available_cores  # noqa: E402

TASK = "mass_to_light"
SAMPLE_ROWS = 8192
ROWS_PER_UNIT = 4096
# The store's inner chunk, which is the batch the engine gets. 1024-row chunks read for 4.9 us a cutout against
# 10.2 at 256 (zarr's per-chunk overhead), yet whole runs at 100k were 2-4% slower with them and the worker's
# peak RSS doubled (693 -> 1,367 MiB; 2026-11-24): the batch's temporaries no longer stay in the caches.
DEFAULT_ROWS_PER_BATCH = 256


# ------------------------------------------------------------------------------------------------ stores


def _simulate_block(args: tuple) -> tuple[int, np.ndarray, dict]:
    from training.sim import DEFAULT_SIMULATOR, get_simulator

    start, count, seed = args
    sim = get_simulator(DEFAULT_SIMULATOR)(count, size=69, seed=seed, first_id=start, bands=("g",), maps=False)
    return start, sim.images, sim.columns


def _write_blocks(args: tuple) -> int:
    """Simulate and write whole shards [start, start+count) of an existing store (run in a worker process)."""
    import zarr

    from survey_infer.store import write_block

    store, blocks = args
    group = zarr.open_group(str(store), mode="r+")
    for start, count, seed in blocks:
        _, images, columns = _simulate_block((start, count, seed))
        write_block(group, start, images, columns)
    return sum(count for _, count, _ in blocks)


def mock_store(path: Path, n: int, dtype: str, codec: str, processes: int, rows_per_batch: int) -> tuple[Path, float]:
    """A mock g-band 69 px cutouts store of ``n`` rows (reused when complete); seconds spent mocking."""
    from survey_infer.store import create_cutouts_store, open_cutouts
    from training.mock import EXTRA_COLUMNS, mock_survey

    done_marker = path.with_name(path.name + ".complete")
    if done_marker.exists():
        info = open_cutouts(path)
        if info.n_rows == n and str(info.image_dtype) == dtype and info.rows_per_read == rows_per_batch:
            return path, 0.0
    log(f"mocking {n} cutouts into {path} ({dtype}, {codec}) on {processes} processes")
    tick = time.perf_counter()
    create_cutouts_store(path, n, (1, 69, 69), EXTRA_COLUMNS, survey=mock_survey(("g",), "universe", 7),
                         rows_per_unit=ROWS_PER_UNIT, rows_per_batch=rows_per_batch, image_dtype=dtype,
                         image_codec=codec, overwrite=True)  # fmt: skip
    blocks = [(start, min(ROWS_PER_UNIT, n - start), int(np.random.SeedSequence([7, i]).generate_state(1)[0]))
              for i, start in enumerate(range(0, n, ROWS_PER_UNIT))]  # fmt: skip
    chunks = [(path, blocks[i :: processes * 8]) for i in range(processes * 8)]
    with concurrent.futures.ProcessPoolExecutor(processes) as pool:
        written = 0
        for rows in pool.map(_write_blocks, chunks):
            written += rows
            log(f"  {written}/{n} mocked")
    done_marker.write_text("complete\n")
    return path, time.perf_counter() - tick


def codec_table(workdir: Path, sample: tuple[np.ndarray, dict], rows_per_batch: int) -> list[dict]:
    """Disk bytes and read CPU per cutout of each dtype x codec on the same sample."""
    from survey_infer.store import IMAGE_CODECS, create_cutouts_store, iter_image_batches, write_block

    images, columns = sample
    rows = []
    for dtype in ("float32", "float16"):
        for codec in IMAGE_CODECS:
            path = workdir / f"codec-{dtype}-{codec}.zarr"
            group = create_cutouts_store(path, len(images), images.shape[1:], {}, survey={"bands": ["g"]},
                                         rows_per_unit=ROWS_PER_UNIT, rows_per_batch=rows_per_batch, image_dtype=dtype,
                                         image_codec=codec, overwrite=True)  # fmt: skip
            write_block(group, 0, images, {k: columns[k] for k in ("object_id", "ra", "dec")})
            size = tree_bytes(path / "images")
            best = np.inf
            for _ in range(3):  # CPU time of a full read, best of three (the page cache is warm after the write)
                tick = time.process_time()
                for _ in iter_image_batches(path, 0, len(images), rows_per_batch):
                    pass
                best = min(best, time.process_time() - tick)
            rows.append({"dtype": dtype, "codec": codec, "bytes_per_row": size / len(images),
                         "read_us_per_row": 1e6 * best / len(images)})  # fmt: skip
            shutil.rmtree(path)
    return rows


def choose_codec(table: list[dict], n: int, workdir: Path) -> dict:
    """The cheapest read whose store of ``n`` rows takes at most half the free disk."""
    free = shutil.disk_usage(workdir).free
    fitting = [row for row in table if row["bytes_per_row"] * n < 0.5 * free]
    return min(fitting or table, key=lambda row: row["read_us_per_row"])


def float16_effect(bundle_dir: Path, images: np.ndarray) -> float:
    """Largest |ml_g(float16 pixels) - ml_g(float32 pixels)| over the sample (same engine, same rows)."""
    from survey_infer.engines import make_engine

    engine = make_engine("onnxruntime", load_bundle(bundle_dir), threads=available_cores(), device="cpu")
    exact = engine.run({"image": images})["ml_g"]
    rounded = engine.run({"image": images.astype(np.float16).astype(np.float32)})["ml_g"]
    return float(np.max(np.abs(exact - rounded)))


def measure_bare(bundle_dir: Path, inputs: dict, threads: int, precision: str, seconds: float, batch: int) -> dict:
    """The bare ONNX Runtime engine at ``precision`` on in-memory cutouts (no I/O) in the pipeline's batches: one
    session of all cores and one single-threaded session per core side by side (as the pipeline's worker threads run
    it); the faster of the two is the reference, so the ratio never flatters the pipeline."""
    modes = measure_bare_modes("onnxruntime", bundle_dir, inputs, batch, threads, seconds, precision)
    best = max(modes, key=lambda m: m["rows_per_s"])
    return {**best, "modes": {bare_label(m): m["rows_per_s"] for m in modes}}


# ------------------------------------------------------------------------------------------------ memory


class RssSampler:
    """RSS of this process and of every descendant (Dask nannies, workers), sampled in a thread; the peaks of the
    whole run and of any time span of it (the units, the catalog build)."""

    def __init__(self, interval: float = 0.5) -> None:
        import psutil

        self.psutil, self.interval = psutil, interval
        self.samples: list[tuple[float, int, int]] = []  # (unix time, pid, rss bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = self.psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                rss = proc.memory_info().rss
            except self.psutil.Error:
                continue
            self.samples.append((time.time(), proc.pid, rss))

    @property
    def peaks(self) -> dict[int, int]:
        return self.peaks_between(-np.inf, np.inf)

    def peaks_between(self, start: float, stop: float) -> dict[int, int]:
        """Peak RSS of each process over the samples taken in [start, stop] (unix times)."""
        peaks: dict[int, int] = {}
        for when, pid, rss in self.samples:
            if start <= when <= stop:
                peaks[pid] = max(peaks.get(pid, 0), rss)
        return peaks

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def run_and_measure(store: Path, bundle_dir: Path, out_dir: Path, precision: str) -> dict:
    """One `survey-infer run`-equivalent with the catalog; wall, rows/s, peak RSS by role, rows counted."""
    import pyarrow.parquet as pq

    from survey_infer import paths
    from survey_infer.cluster import client_for
    from survey_infer.config import RunConfig
    from survey_infer.pipeline import plan_run, run_pipeline

    shutil.rmtree(out_dir, ignore_errors=True)
    config_kwargs = {"precision": precision} if precision != "fp32" else {}
    config = RunConfig(task=TASK, input=store, output=out_dir, bundle=bundle_dir, engine="onnxruntime", device="cpu",
                       progress=False, **config_kwargs)  # fmt: skip
    tick = time.perf_counter()
    with RssSampler() as rss:
        plan = plan_run(config)
        with client_for(config) as client:
            roles = {os.getpid(): "client + scheduler"}
            roles.update({pid: "worker" for pid in client.run(os.getpid).values()})
            monitor = CpuMonitor()
            result = run_pipeline(config, client, plan)
            cpu = monitor.stop()
    wall = time.perf_counter() - tick
    record = result.record
    from catalogs import open_run

    catalog_rows = open_run(out_dir).info()["rows"] if result.exit_code == 0 else 0
    parts = sorted((out_dir / "parts").glob("*.parquet"))
    counted = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    ids = pq.read_table(parts, columns=["object_id"]).column(0).to_numpy()
    units_end = max(p.stat().st_mtime for p in (out_dir / paths.DONE_DIR).iterdir())  # the last unit's done marker
    phases = {"": rss.peaks, " units": rss.peaks_between(-np.inf, units_end),
              " catalog": rss.peaks_between(units_end, np.inf)}  # fmt: skip
    by_role: dict[str, list[int]] = {}
    for phase, peaks in phases.items():
        for pid, peak in peaks.items():
            by_role.setdefault(roles.get(pid, "other child processes") + phase, []).append(peak)
    return {
        "exit_code": result.exit_code, "status": record["status"], "wall_s": wall,
        "units_s": record["timings"]["units_seconds"], "catalog_s": record["timings"]["catalog_seconds"],
        "rows_per_s": record["rows"]["out"] / record["timings"]["units_seconds"], "wall_rows_per_s": counted / wall,
        "rows_counted": counted, "catalog_rows": catalog_rows, "ids_unique": len(np.unique(ids)) == len(ids), "rss": by_role,
        "other_cores": cpu["other_cores"], "engine": record.get("engine"), "failures": record["failures"][:3],
    }  # fmt: skip


def run_in_fresh_process(store: Path, bundle_dir: Path, out_dir: Path, precision: str) -> dict:
    """`run_and_measure` in a new Python process, so that the client's RSS is the run's own: this process holds
    the codec sample, the bare engines and the earlier runs' leftovers (bench/README.md, 2026-11-24)."""
    import json
    import subprocess

    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child-run", str(store), str(bundle_dir),
                           str(out_dir), precision], capture_output=True, text=True, cwd=REPO)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"the run of {store} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--compare", type=int, default=100_000, help="a smaller N run in the same table (0: none)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "survey-infer-million")
    parser.add_argument("--dtype", choices=["float32", "float16"], help="images dtype (default: measured)")
    parser.add_argument("--codec", choices=["blosc-lz4", "blosc-zstd", "none"], help="images codec (default: measured)")
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32", help="ONNX Runtime model precision")
    parser.add_argument("--bare-seconds", type=float, default=15.0)
    parser.add_argument("--rows-per-batch", type=int, default=DEFAULT_ROWS_PER_BATCH,
                        help="the store's inner chunk rows: the batch the engine gets (the bare reference's too)")
    parser.add_argument("--results", type=Path, help="also write the table here")
    parser.add_argument("--child-run", nargs=4, metavar=("STORE", "BUNDLE", "OUT", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_run:  # one run, measured in this fresh process (run_in_fresh_process)
        import json

        store, bundle, out, precision = args.child_run
        print(json.dumps(run_and_measure(Path(store), Path(bundle), Path(out), precision), default=str))
        return 0
    command = " ".join(shlex.quote(a) for a in ["python", "bench/million.py", *sys.argv[1:]])
    cores = available_cores()
    args.workdir.mkdir(parents=True, exist_ok=True)
    bundle_dir = default_bundle_path(TASK)

    sample = _simulate_block((0, SAMPLE_ROWS, 12345))[1:]
    codecs = codec_table(args.workdir, sample, args.rows_per_batch)
    chosen = choose_codec(codecs, args.n, args.workdir)
    dtype, codec = args.dtype or chosen["dtype"], args.codec or chosen["codec"]
    f16_change = float16_effect(bundle_dir, sample[0])

    sizes = sorted({n for n in (args.compare, args.n) if n})
    batch = args.rows_per_batch
    suffix = "" if batch == DEFAULT_ROWS_PER_BATCH else f"-b{batch}"
    stores = {n: mock_store(args.workdir / f"mock-{n}-{dtype}-{codec}{suffix}.zarr", n, dtype, codec, cores, batch)
              for n in sizes}  # fmt: skip

    from survey_infer.store import open_cutouts

    inputs = bare_inputs(bundle_dir, stores[sizes[0]][0], 4096)
    log("bare engine before the runs")
    before = measure_bare(bundle_dir, inputs, cores, args.precision, args.bare_seconds, batch)
    runs = {}
    for n in sizes:
        log(f"run {n}")
        runs[n] = run_in_fresh_process(stores[n][0], bundle_dir, args.workdir / f"out-{n}", args.precision)
    log("bare engine after the runs")
    after = measure_bare(bundle_dir, inputs, cores, args.precision, args.bare_seconds, batch)
    reference = (before["rows_per_s"] + after["rows_per_s"]) / 2

    mib = 1024.0**2
    lines = [f"# {command}",
             f"# {datetime.now(timezone.utc).isoformat(timespec='seconds')}, {_cpu_model()}, {cores} cores, "
             f"onnxruntime {args.precision}",
             "", f"codec on {SAMPLE_ROWS} mock cutouts (69x69 g band), read {batch} at a time:",
             f"{'dtype':9s}{'codec':12s}{'bytes/cutout':>14s}{'read CPU us/cutout':>20s}"]  # fmt: skip
    for row in codecs:
        mark = "  <- used" if (row["dtype"], row["codec"]) == (dtype, codec) else ""
        lines.append(f"{row['dtype']:9s}{row['codec']:12s}{row['bytes_per_row']:14.0f}{row['read_us_per_row']:20.1f}{mark}")
    lines.append(f"float16 pixels change ml_g by at most {f16_change:.2e} Msun/Lsun on the sample (same engine)")
    lines += ["", f"{'':46s}" + "".join(f"{n:>16,d}" for n in sizes)]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"{label:46s}" + "".join(f"{v:>16s}" for v in values))

    row("mock (s, cached = 0)", [f"{stores[n][1]:.0f}" for n in sizes])
    row("store size on disk (GiB)", [f"{tree_bytes(stores[n][0]) / 1024**3:.2f}"
                                     for n in sizes])  # fmt: skip
    row("status", [runs[n]["status"] for n in sizes])
    row("rows counted in parts", [f"{runs[n]['rows_counted']:,d}" for n in sizes])
    row("rows in the HATS catalog", [f"{runs[n]['catalog_rows']:,d}" for n in sizes])
    row("object ids unique", [str(runs[n]["ids_unique"]) for n in sizes])
    row("wall, end to end (s)", [f"{runs[n]['wall_s']:.1f}" for n in sizes])
    row("  of which units (s)", [f"{runs[n]['units_s']:.1f}" for n in sizes])
    row("  of which HATS catalog (s)", [f"{runs[n]['catalog_s']:.1f}" for n in sizes])
    row("cutouts/s (units)", [f"{runs[n]['rows_per_s']:.0f}" for n in sizes])
    row("cutouts/s (wall, end to end)", [f"{runs[n]['wall_rows_per_s']:.0f}" for n in sizes])
    roles = sorted({role for n in sizes for role in runs[n]["rss"]})
    for role in roles:
        row(f"peak RSS {role} (MiB)", [" / ".join(f"{p / mib:.0f}" for p in sorted(runs[n]["rss"].get(role, [])))
                                       for n in sizes])  # fmt: skip
    row("other processes' CPU (cores)", [f"{runs[n]['other_cores']:.2f}" for n in sizes])
    row("pipeline_vs_engine", [f"{runs[n]['rows_per_s'] / reference:.3f}" for n in sizes])
    modes = lambda m: ", ".join(f"{k} {v:.0f}" for k, v in m["modes"].items())  # noqa: E731
    lines.append(f"bare onnxruntime {args.precision} (sessions x threads each), the faster counts: before {modes(before)} "
                 f"(others {before['other_cores']:.2f} cores); after {modes(after)} (others {after['other_cores']:.2f}); "
                 f"reference {reference:.0f} cutouts/s")  # fmt: skip
    for n in sizes:
        for failure in runs[n]["failures"]:
            lines.append(f"FAILED ({n}): {failure}")
    largest = runs[sizes[-1]]
    lines.append(f"rows_ok {largest['rows_counted'] == largest['catalog_rows'] == sizes[-1] and largest['ids_unique']}")
    lines.append(f"pipeline_vs_engine {largest['rows_per_s'] / reference:.3f}")
    text = "\n".join(lines)
    print(text)
    if args.results:
        args.results.write_text(text + "\n")
    return 0 if all(runs[n]["exit_code"] == 0 for n in sizes) else 1


if __name__ == "__main__":
    sys.exit(main())
