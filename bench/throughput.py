"""Throughput benchmark: the bare engine (no I/O) against the whole pipeline, on the same store and bundle.

    python bench/throughput.py --n 200000

1. Finds the bundle (the shipped mass_to_light one if present, else a width-32 random-weight bundle of the same
   architecture in the work directory: throughput does not depend on weight values) and makes sure it has a
   model.onnx (deploy.export.export_onnx if importable, else torch.onnx.export here).
2. Finds or mocks the store (reused when it exists with the same n, size and chunking: mocking 200k cutouts
   takes minutes).
3. Bare engines: each engine's throughput on an in-memory float32 batch (after warm-up), engine threads = all
   cores unless --bare-threads says otherwise, and as one 1-thread session per core side by side (the
   pipeline's default); the fastest at all cores is the reference; FLOPs per cutout counted with torch's FlopCounterMode.
4. Pipeline: run_pipeline on a LocalCluster (client_for) with the fastest engine, catalog building off for the
   timed part: rows/s from submission to the last unit (record["timings"]["units_seconds"]), and wall time
   including the cluster start; then the HATS catalog build, timed separately (--no-catalog skips it).
5. Measures the best bare engine again after the pipeline: this shared VM's speed drifts by +-10% over seconds
   to minutes, so the reference is the mean of the two measurements that bracket the pipeline.
6. Prints a plain-text table ending with `pipeline_vs_engine <ratio>` (pipeline rows/s over the reference).
   The `others*` numbers say how much CPU other processes took meanwhile (--wait-idle waits for a quiet machine).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
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
if str(REPO) not in sys.path:  # `python bench/throughput.py` from a checkout
    sys.path.insert(0, str(REPO))

from survey_infer.bundle import (  # noqa: E402
    ONNX_FILE,
    BUNDLE_JSON,
    default_bundle_path,
    load_bundle,
    record_file,
    sha256_file,
    write_json_atomic,
)
from survey_infer.config import available_cores  # noqa: E402
from survey_infer.errors import BundleError  # noqa: E402

TASK = "mass_to_light"
RANDOM_KWARGS = {"in_channels": 1, "n_meta": 3, "width": 32, "hidden": 512}  # the shipped base architecture
RANDOM_META = {"columns": ["distance_mpc", "lum_g", "size_kpc"], "transform": "log10",
               "mean": [2.2, 10.0, 0.5], "std": [0.2, 0.5, 0.2]}  # fmt: skip


class CpuMonitor:
    """Cores' worth of CPU used by *other* processes while a section ran (the machine is shared).

    Busy time of the whole machine (/proc/stat) minus the CPU time of this process and its live children (the
    LocalCluster's workers, the nanny processes), read with psutil.
    """

    def __init__(self) -> None:
        self.start()

    @staticmethod
    def _busy() -> float | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> dict[int, float]:
        import psutil

        me = psutil.Process()
        times = {}
        for proc in [me, *me.children(recursive=True)]:
            try:
                cpu = proc.cpu_times()
                times[proc.pid] = cpu.user + cpu.system
            except psutil.Error:
                pass
        return times

    def start(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t0
        busy = self._busy()
        own = sum(t - self.own0.get(pid, 0.0) for pid, t in self._own().items())
        if busy is None or self.busy0 is None or wall <= 0:
            return {"own_cores": own / max(wall, 1e-9), "other_cores": float("nan")}
        return {"own_cores": own / wall, "other_cores": max(0.0, (busy - self.busy0 - own) / wall)}


def wait_for_idle(max_wait: float, threshold: float = 0.15, window: float = 3.0) -> float:
    """Wait (at most ``max_wait`` s) until other processes use under ``threshold`` cores; return seconds waited."""
    if max_wait <= 0:
        return 0.0
    tick = time.perf_counter()
    announced = False
    while time.perf_counter() - tick < max_wait:
        monitor = CpuMonitor()
        time.sleep(window)
        if monitor.stop()["other_cores"] < threshold:
            return time.perf_counter() - tick
        if not announced:
            log(f"machine busy with other processes: waiting up to {max_wait:.0f} s for it to go idle")
            announced = True
    log("machine still busy: measuring anyway (see the others* column)")
    return time.perf_counter() - tick


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- bundle


def _export_onnx_here(bundle_dir: Path) -> None:
    """torch.onnx.export with a dynamic batch axis and the engine_io names; records the sha256."""
    import warnings

    import torch

    from survey_infer.tasks import get_task

    bundle = load_bundle(bundle_dir)
    io = bundle.meta["engine_io"]
    inputs, outputs = list(io["inputs"]), list(io["outputs"])
    model = bundle.build_torch_model().float().eval()
    example = get_task(bundle.task).example_inputs(bundle, 4, seed=0)
    args = tuple(torch.from_numpy(example[n]) for n in inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, args, str(bundle_dir / ONNX_FILE), dynamo=False, input_names=inputs, output_names=outputs,
            dynamic_axes={n: {0: "batch"} for n in [*inputs, *outputs]}, opset_version=17, do_constant_folding=True,
        )  # fmt: skip
    record_file(bundle_dir, ONNX_FILE)


def ensure_onnx(bundle_dir: Path) -> str:
    """Give the bundle a model.onnx; return how it was made."""
    if load_bundle(bundle_dir).onnx_path is not None:
        return "present"
    try:
        from deploy.export import export_onnx
    except ImportError:
        _export_onnx_here(bundle_dir)
        return "torch.onnx.export (bench)"
    export_onnx(bundle_dir)
    return "deploy.export.export_onnx"


def make_random_bundle(directory: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    from survey_infer.models import build_model

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = build_model("ml_cnn", **RANDOM_KWARGS)
    save_file(model.state_dict(), str(directory / "weights.safetensors"))
    meta = {
        "bundle_format": 1, "id": "mass_to_light-benchrandom-v1", "task": TASK, "name": "benchrandom", "version": 1,
        "architecture": {"name": "ml_cnn", "kwargs": RANDOM_KWARGS},
        "engine_io": {"inputs": ["image", "meta"], "outputs": ["ml_g", "ml_g_logvar"]},
        "input_spec": {"image": {"bands": ["g"], "shape": [1, 69, 69], "dtype": "float32"}, "meta": RANDOM_META},
        "output_spec": {"ml_g": {"unit": "Msun/Lsun"}},
        "training": {"notes": "random weights, for the throughput benchmark only"},
        "files": {"weights.safetensors": sha256_file(directory / "weights.safetensors")},
    }  # fmt: skip
    write_json_atomic(directory / BUNDLE_JSON, meta)
    return directory


def find_bundle(args: argparse.Namespace, workdir: Path) -> tuple[Path, str]:
    """(bundle directory with a model.onnx, description for the table)."""
    if args.bundle:
        bundle_dir = Path(args.bundle)
        how = ensure_onnx(bundle_dir)
        return bundle_dir, f"{bundle_dir} (onnx: {how})"
    try:
        shipped = default_bundle_path(TASK)
    except BundleError:
        shipped = None
    if shipped is not None:
        bundle = load_bundle(shipped)
        if bundle.onnx_path is not None:
            return shipped, f"shipped trained {bundle.id} ({shipped})"
        copy = workdir / f"{shipped.name}-with-onnx"  # never write into the installed package
        if not (copy / ONNX_FILE).is_file():
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(shipped, copy)
        how = ensure_onnx(copy)
        return copy, f"shipped trained {bundle.id}, copied to {copy} (onnx: {how})"
    size = args.size
    bundle_dir = workdir / f"bundle-ml_cnn-w32-s{size}-random"
    try:
        load_bundle(bundle_dir)
    except BundleError:
        shutil.rmtree(bundle_dir, ignore_errors=True)
        make_random_bundle(bundle_dir)
        if size != 69:
            meta = json.loads((bundle_dir / BUNDLE_JSON).read_text())
            meta["input_spec"]["image"]["shape"] = [1, size, size]
            write_json_atomic(bundle_dir / BUNDLE_JSON, meta)
    how = ensure_onnx(bundle_dir)
    return bundle_dir, f"RANDOM weights, width 32 ml_cnn (no shipped bundle yet) {bundle_dir} (onnx: {how})"


# ---------------------------------------------------------------------------------------------- store


def ensure_store(args: argparse.Namespace, workdir: Path) -> tuple[Path, str, float]:
    """(store path, 'reused'|'mocked', seconds spent mocking)."""
    from survey_infer.store import open_cutouts
    from training.mock import write_mock_cutouts

    codec = "" if args.store_codec == "blosc-lz4" else f"-{args.store_codec}"
    path = Path(args.store) if args.store else workdir / (
        f"mock-n{args.n}-s{args.size}-u{args.store_rows_per_unit}-b{args.store_rows_per_batch}{codec}.zarr")
    if path.exists():
        try:
            info = open_cutouts(path)
            if info.n_rows == args.n and info.image_shape == (1, args.size, args.size):
                return path, "reused", 0.0
            log(f"store {path} has {info.n_rows} rows of {info.image_shape}; re-mocking it")
        except Exception as exc:  # noqa: BLE001 - half-written or foreign: mock again
            log(f"store {path} unusable ({exc}); re-mocking it")
    log(f"mocking {args.n} cutouts into {path} (about 1 ms a cutout on one core)")
    tick = time.perf_counter()
    write_mock_cutouts(path, args.n, size=args.size, seed=0, rows_per_unit=args.store_rows_per_unit,
                       rows_per_batch=args.store_rows_per_batch, image_codec=args.store_codec, overwrite=True)  # fmt: skip
    return path, "mocked", time.perf_counter() - tick


def images_codec(store: Path) -> str:
    """The images' inner-chunk codecs, e.g. 'blosc lz4 clevel 3 shuffle' or 'uncompressed'."""
    import zarr

    try:
        codecs = zarr.open_group(str(store), mode="r")["images"].metadata.to_dict()["codecs"]
        inner = codecs[0]["configuration"]["codecs"] if codecs[0]["name"] == "sharding_indexed" else codecs
        names = []
        for codec in inner:
            if codec["name"] == "bytes":
                continue
            conf = codec.get("configuration", {})
            details = [str(conf[k]) for k in ("cname", "clevel", "shuffle") if k in conf]
            names.append(" ".join([codec["name"], *details]))
        return ", ".join(names) or "uncompressed"
    except Exception:  # noqa: BLE001 - descriptive only
        return "codec unknown"


# ---------------------------------------------------------------------------------------------- bare engine


def count_flops(bundle_dir: Path) -> float:
    """FLOPs per cutout of the bundle's torch model (FlopCounterMode: 2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from survey_infer.tasks import get_task

    bundle = load_bundle(bundle_dir)
    model = bundle.build_torch_model().float().eval()
    batch = 8
    example = get_task(bundle.task).example_inputs(bundle, batch, seed=0)
    tensors = [torch.from_numpy(example[n]) for n in bundle.meta["engine_io"]["inputs"]]
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(*tensors)
    return counter.get_total_flops() / batch


def bare_inputs(bundle_dir: Path, store: Path, rows: int) -> dict[str, np.ndarray]:
    """The store's first ``rows`` cutouts, prepared by the task, held in memory as float32."""
    from survey_infer.store import iter_image_batches, open_cutouts, read_columns
    from survey_infer.tasks import get_task

    bundle = load_bundle(bundle_dir)
    task = get_task(TASK)
    info = open_cutouts(store)
    rows = min(rows, info.n_rows)
    images = np.concatenate([b for _, b in iter_image_batches(store, 0, rows, info.rows_per_read)])
    wanted = [c for c in task.input_columns(bundle) if c in info.columns]
    columns = read_columns(store, 0, rows, wanted)
    inputs, _ = task.prepare(images, columns, bundle)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()}


def time_engine(engine, inputs: dict[str, np.ndarray], batch: int, min_seconds: float) -> dict:
    """Rows/s of engine.run over ``inputs`` in batches, after warm-up; at least ``min_seconds`` and 2 passes."""
    n = len(next(iter(inputs.values())))
    starts = list(range(0, n - batch + 1, batch)) or [0]
    for s in starts[:3]:  # warm-up: allocations, thread pools, kernel selection
        engine.run({k: v[s : s + batch] for k, v in inputs.items()})
    rows, passes, per_batch = 0, 0, []
    tick = time.perf_counter()
    while passes < 2 or time.perf_counter() - tick < min_seconds:
        for s in starts:
            t0 = time.perf_counter()
            engine.run({k: v[s : s + batch] for k, v in inputs.items()})
            per_batch.append(time.perf_counter() - t0)
            rows += min(batch, n - s)
        passes += 1
    seconds = time.perf_counter() - tick
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
            "batch_ms_median": 1e3 * float(np.median(per_batch))}  # fmt: skip


def time_engines_side_by_side(engines: list, inputs: dict[str, np.ndarray], batch: int, min_seconds: float) -> dict:
    """Rows/s of several engines each run by its own Python thread at once, as a worker's threads run a shared
    bundle's sessions (the pipeline's default: one single-threaded inference call per core)."""
    if len(engines) == 1:
        return time_engine(engines[0], inputs, batch, min_seconds)
    results: list[dict] = [{} for _ in engines]

    def one(k: int) -> None:
        results[k] = time_engine(engines[k], inputs, batch, min_seconds)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(engines))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"rows": sum(r["rows"] for r in results), "seconds": max(r["seconds"] for r in results),
            "rows_per_s": sum(r["rows_per_s"] for r in results),
            "batch_ms_median": float(np.median([r["batch_ms_median"] for r in results]))}  # fmt: skip


def measure_bare(engine_name: str, bundle_dir: Path, inputs, batch: int, threads: int, min_seconds: float,
                 sessions: int = 1, precision: str = "fp32") -> dict:  # fmt: skip
    """The bare engine on in-memory inputs: one session of ``threads`` threads, or ``sessions`` sessions of
    threads // sessions threads each, run side by side (which is faster depends on the model and machine)."""
    from survey_infer.engines import make_engine
    from survey_infer.worker import keep_freed_memory

    keep_freed_memory()  # the allocator settings the pipeline's workers run with
    bundle = load_bundle(bundle_dir)
    per_session = max(1, threads // sessions)
    engines = [make_engine(engine_name, bundle, threads=per_session, device="cpu",
                           **({"precision": precision} if precision != "fp32" else {}))
               for _ in range(sessions)]  # fmt: skip
    monitor = CpuMonitor()
    result = time_engines_side_by_side(engines, inputs, batch, min_seconds)
    result.update(engine=engine_name, threads=threads, sessions=sessions, describe=engines[0].describe(),
                  **monitor.stop())  # fmt: skip
    del engines
    gc.collect()
    return result


def measure_bare_modes(engine_name: str, bundle_dir: Path, inputs, batch: int, threads: int, min_seconds: float,
                       precision: str = "fp32") -> list[dict]:  # fmt: skip
    """`measure_bare` as one session of all ``threads`` and as ``threads`` 1-thread sessions side by side (the
    pipeline's worker threads run the latter): which is faster depends on the model and machine."""
    return [measure_bare(engine_name, bundle_dir, inputs, batch, threads, min_seconds, sessions=k, precision=precision)
            for k in sorted({1, threads})]  # fmt: skip


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (a store or one of its arrays) on disk."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def bare_label(result: dict) -> str:
    """'onnxruntime 1x2' (sessions x threads each): how a bare measurement ran."""
    return f"{result['engine']} {result['sessions']}x{max(1, result['threads'] // result['sessions'])}"


# ---------------------------------------------------------------------------------------------- pipeline


def run_whole_pipeline(args, store: Path, bundle_dir: Path, engine: str, out_dir: Path) -> dict:
    from survey_infer.config import RunConfig
    from survey_infer.pipeline import plan_run, run_pipeline

    if out_dir.exists():
        shutil.rmtree(out_dir)  # a fresh run every time: never resume (and skip) a previous one's units
    config = RunConfig(
        task=TASK, input=store, output=out_dir, bundle=bundle_dir, engine=engine, device="cpu",
        workers=args.workers, threads_per_worker=args.threads_per_worker, engine_threads=args.engine_threads,
        rows_per_unit=args.rows_per_unit, max_in_flight=args.max_in_flight, build_catalog=False, progress=False,
        in_process=args.in_process,
    )  # fmt: skip
    wall_start = time.perf_counter()
    plan = plan_run(config)
    result: dict = {"threads_per_worker": config.threads_per_worker,
                    "engine_threads": config.resolved_engine_threads(),
                    "max_in_flight": config.resolved_max_in_flight(), "n_units": plan.n_units,
                    "rows_per_unit": plan.spec.rows(0)[1] - plan.spec.rows(0)[0], "rows_per_read": plan.spec.rows_per_read}  # fmt: skip
    from survey_infer.cluster import client_for

    with client_for(config) as client:
        client.wait_for_workers(config.workers)
        result["cluster_start_s"] = time.perf_counter() - wall_start
        monitor = CpuMonitor()
        run = run_pipeline(config, client, plan)
        result["wall_s"] = time.perf_counter() - wall_start
        result.update(monitor.stop())
        if args.catalog and run.exit_code == 0:
            from survey_infer.hats_catalog import build_hats_catalog

            tick = time.perf_counter()
            build_hats_catalog(out_dir, client, progress=False)
            result["catalog_s"] = time.perf_counter() - tick
    record = run.record
    timings = record["timings"]
    result.update(
        exit_code=run.exit_code, status=record["status"], rows=record["rows"]["out"],
        units_s=timings["units_seconds"], rows_per_s=record["rows"]["out"] / timings["units_seconds"],
        wall_rows_per_s=record["rows"]["out"] / result["wall_s"], worker_infer_s=timings["worker_infer_seconds"],
        failures=record["failures"][:3], engine_record=record.get("engine"),
    )  # fmt: skip
    return result


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000, help="cutouts in the mock store (default 200000)")
    p.add_argument("--size", type=int, default=69, help="cutout side in pixels (default 69)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "survey-infer-bench",
                   help="stores, bundle and outputs (default /tmp/survey-infer-bench)")
    p.add_argument("--store", type=Path, help="store to use (reused if it has --n rows, else mocked there)")
    p.add_argument("--store-rows-per-unit", type=int, default=4096, help="rows per block when mocking (4096)")
    p.add_argument("--store-rows-per-batch", type=int, default=256, help="rows per inner chunk when mocking (256)")
    p.add_argument("--store-codec", choices=["blosc-lz4", "blosc-zstd", "none"], default="blosc-lz4",
                   help="images codec when mocking (default blosc-lz4, the store's default)")
    p.add_argument("--bundle", type=Path, help="bundle directory (default: shipped, else width-32 random)")
    p.add_argument("--engines", default="onnxruntime,torch", help="engines to measure bare (default onnxruntime,torch)")
    p.add_argument("--batch", type=int, default=256, help="bare-engine batch size (default 256)")
    p.add_argument("--bare-threads", default="", help="comma list of engine threads to measure bare as well "
                   "(e.g. 1,2); the ratio uses all cores")  # fmt: skip
    p.add_argument("--bare-rows", type=int, default=4096, help="cutouts held in memory for the bare runs (4096)")
    p.add_argument("--bare-seconds", type=float, default=20.0, help="minimum timed seconds per bare engine (20)")
    p.add_argument("--pipeline-engine", help="engine for the pipeline (default: the fastest bare one)")
    p.add_argument("--workers", type=int, default=1, help="LocalCluster workers (default 1)")
    p.add_argument("--threads-per-worker", type=int, help="default: RunConfig's (cores / workers)")
    p.add_argument("--engine-threads", type=int, help="default: RunConfig's (cores / worker threads)")
    p.add_argument("--rows-per-unit", type=int, help="rows per unit of work (default: one store block)")
    p.add_argument("--max-in-flight", type=int, help="default: RunConfig's (2 per worker thread)")
    p.add_argument("--no-recheck", dest="recheck", action="store_false",
                   help="do not measure the best bare engine again after the pipeline (the reference is then "
                   "the measurement before it alone)")
    p.add_argument("--in-process", action="store_true",
                   help="RunConfig.in_process: the LocalCluster's workers as threads of this process (saves ~70 us "
                   "of CPU per cutout on 2 cores; no fault isolation)")
    p.add_argument("--no-catalog", dest="catalog", action="store_false", help="skip the (separately timed) catalog")
    p.add_argument("--no-pipeline", dest="pipeline", action="store_false", help="bare engines only")
    p.add_argument("--wait-idle", type=float, default=0.0, help="before each measurement, wait up to this many "
                   "seconds for other processes to leave the CPU idle (shared machines; default 0)")
    p.add_argument("--json", type=Path, help="also write every number to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    print(f"command: {command}", flush=True)
    cores = available_cores()
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)

    bundle_dir, bundle_note = find_bundle(args, workdir)
    store, store_note, mock_s = ensure_store(args, workdir)
    from survey_infer.store import open_cutouts

    info = open_cutouts(store)
    flops = count_flops(bundle_dir)

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    extra_threads = sorted({int(t) for t in args.bare_threads.split(",") if t.strip()} - {cores})
    inputs = bare_inputs(bundle_dir, store, args.bare_rows)
    bare: list[dict] = []
    for name in engines:
        for threads in [cores, *extra_threads]:
            wait_for_idle(args.wait_idle)
            log(f"bare {name} threads={threads} batch={args.batch}")
            bare.append(measure_bare(name, bundle_dir, inputs, args.batch, threads, args.bare_seconds))
        if cores > 1:  # one 1-thread session per core side by side: how the pipeline's worker threads run it
            wait_for_idle(args.wait_idle)
            log(f"bare {name} {cores} sessions x 1 thread, batch={args.batch}")
            bare.append(measure_bare(name, bundle_dir, inputs, args.batch, cores, args.bare_seconds, sessions=cores))
    at_all_cores = [b for b in bare if b["threads"] == cores]
    best = max(at_all_cores, key=lambda b: b["rows_per_s"])
    reference = best["rows_per_s"]

    pipe = None
    if args.pipeline:
        engine = args.pipeline_engine or best["engine"]
        wait_for_idle(args.wait_idle)
        log(f"pipeline {engine} over {info.n_rows} rows")
        pipe = run_whole_pipeline(args, store, bundle_dir, engine, workdir / "out")
        pipe["engine"] = engine
        if args.recheck:  # this machine's speed drifts by +-10% over minutes: bracket the pipeline
            wait_for_idle(args.wait_idle)
            log(f"bare {best['engine']} threads={cores} again, after the pipeline")
            again = measure_bare(best["engine"], bundle_dir, inputs, args.batch, cores, args.bare_seconds,
                                 sessions=best["sessions"])  # fmt: skip
            again["after_pipeline"] = True
            bare.append(again)
            reference = (best["rows_per_s"] + again["rows_per_s"]) / 2
    del inputs
    gc.collect()

    # ------------------------------------------------------------------ table
    rule = "-" * 78
    lines = [rule]
    lines.append(f"date        {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    lines.append(f"machine     {platform.node()} {platform.machine()} {_cpu_model()}, {cores} cores available")
    lines.append(f"bundle      {bundle_note}")
    lines.append(f"model       {flops / 1e6:.1f} MFLOP/cutout (torch FlopCounterMode, 2 FLOP per MAC)")
    lines.append(f"store       {store} ({store_note}{f', {mock_s:.0f} s' if mock_s else ''})")
    lines.append(f"            {info.n_rows} rows {info.image_shape} {info.image_dtype}, block {info.rows_per_block}, "
                 f"chunk {info.rows_per_read}, {images_codec(store)}")
    lines.append(rule)
    lines.append(f"{'bare engine (in memory, no I/O)':28s} {'threads':>7s} {'batch':>6s} {'ms/batch':>9s} "
                 f"{'rows/s':>9s} {'GFLOP/s':>8s} {'others*':>7s}")  # fmt: skip
    for b in bare:
        label = bare_label(b) + (" (after pipeline)" if b.get("after_pipeline") else "")
        lines.append(f"{label:28s} {b['threads']:7d} {args.batch:6d} {b['batch_ms_median']:9.1f} "
                     f"{b['rows_per_s']:9.0f} {b['rows_per_s'] * flops / 1e9:8.1f} {b['other_cores']:7.2f}")  # fmt: skip
    lines.append(f"best bare engine at {cores} threads: {bare_label(best)} (sessions x threads each) {best['rows_per_s']:.0f} rows/s"
                 + (f"; {reference:.0f} rows/s mean of before and after the pipeline (the reference)"
                    if reference != best["rows_per_s"] else " (the reference)"))
    if pipe is not None:
        lines.append(rule)
        lines.append(f"pipeline    engine {pipe['engine']}, workers {args.workers}, threads/worker "
                     f"{pipe['threads_per_worker']}, engine threads {pipe['engine_threads']}, max in flight "
                     f"{pipe['max_in_flight']}")  # fmt: skip
        cluster = "in process (--in-process)" if args.in_process else "worker processes (default)"
        lines.append(f"            LocalCluster via client_for: {cluster}, dask worker profiler off")
        lines.append(f"            {pipe['n_units']} units of {pipe['rows_per_unit']} rows, read "
                     f"{pipe['rows_per_read']} rows at a time; status {pipe['status']} (exit {pipe['exit_code']})")
        for failure in pipe["failures"]:
            lines.append(f"            FAILED {failure}")
        lines.append(f"{'rows':34s} {pipe['rows']:>12d}")
        lines.append(f"{'cluster start (s)':34s} {pipe['cluster_start_s']:12.1f}")
        lines.append(f"{'submission -> last unit (s)':34s} {pipe['units_s']:12.1f}")
        lines.append(f"{'wall incl. cluster start (s)':34s} {pipe['wall_s']:12.1f}")
        infer_rate = pipe["rows"] / pipe["worker_infer_s"] if pipe["worker_infer_s"] else float("nan")
        lines.append(f"{'engine time inside workers (s)':34s} {pipe['worker_infer_s']:12.1f}  "
                     f"({infer_rate:.0f} rows/s per worker thread, prepare+run)")
        lines.append(f"{'catalog build, not timed above (s)':34s} "
                     + (f"{pipe['catalog_s']:12.1f}" if "catalog_s" in pipe else f"{'skipped':>12s}"))
        lines.append(f"{'CPU used: run / others* (cores)':34s} {pipe['own_cores']:12.2f} / {pipe['other_cores']:.2f}")
        lines.append(f"{'pipeline rows/s (units)':34s} {pipe['rows_per_s']:12.0f}")
        lines.append(f"{'pipeline rows/s (wall)':34s} {pipe['wall_rows_per_s']:12.0f}")
    lines.append(rule)
    lines.append("* cores' worth of CPU that other processes on the machine used meanwhile (0 = clean measurement)")
    busy = [b["other_cores"] for b in bare] + ([pipe["other_cores"]] if pipe else [])
    if any(x > 0.1 for x in busy):
        lines.append(f"WARNING: other processes used up to {max(busy):.2f} cores during the measurements: not clean")
    if pipe is not None:
        ratio = pipe["rows_per_s"] / reference
        lines.append(f"pipeline_vs_engine {ratio:.3f}")
    print("\n".join(lines), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"command": command, "flops_per_cutout": flops, "bare": bare,
                                         "reference_rows_per_s": reference,
                                         "pipeline": pipe, "bundle": bundle_note, "store": str(store)},
                                        indent=2, default=str))  # fmt: skip
    return 0 if pipe is None or pipe["exit_code"] == 0 else 1


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


if __name__ == "__main__":
    sys.exit(main())
