"""property_maps throughput: maps per second of the bare engines and of the whole pipeline (maps.zarr written),
their ratio, and the peak memory of runs of increasing N (it should stay flat).

    python bench/throughput_property_maps.py [--n 2048,8192] [--threads 2] [--bundle DIR] [--wait-idle 60]

1. Mocks property-maps stores of each N (64 px ugriz, 256 rows per unit, images uncompressed unless
   ``--image-codec`` says otherwise) in a work directory (reused).
2. Bare engines (onnxruntime, torch) on 512 prepared cutouts in memory, batch 64: one session of ``--threads``
   threads, and ``--threads`` 1-thread sessions side by side (as the pipeline runs them); the fastest counts.
3. For each engine and N, in a fresh subprocess (so that its peak RSS is its own): run_pipeline with the engine in
   its fastest bare mode on an in-process LocalCluster (1 worker; one worker thread per session, each inference call
   ``--threads`` / sessions threads), catalog building off; maps/s from the units'
   time; the process's peak RSS (ru_maxrss) at the end.
4. The fastest bare engine again after the pipelines (the shared VM drifts): the reference is their mean.
5. The CPU a row of writing maps.zarr alone (`map_write_costs`), with and without zarr's empty-chunk test.
Reported with the CPU other processes took meanwhile (``others``): on a busy machine the numbers are low.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.throughput import (  # noqa: E402
    CpuMonitor, bare_label, measure_bare, measure_bare_modes, tree_bytes, wait_for_idle,
)
from survey_infer.store import DEFAULT_IMAGE_CODEC, IMAGE_CODECS  # noqa: E402

RESULTS = REPO / "bench" / "results"
TASK = "property_maps"


def ensure_store(workdir: Path, n: int, image_codec: str = DEFAULT_IMAGE_CODEC) -> Path:
    from training.mock_property_maps import write_mock_property_maps

    suffix = "" if image_codec == DEFAULT_IMAGE_CODEC else f"-{image_codec}"
    store = workdir / f"pm_{n}{suffix}.zarr"
    if not (store / "zarr.json").exists():
        write_mock_property_maps(store, n, size=64, seed=77, rows_per_unit=256, rows_per_batch=64, overwrite=True,
                                 image_codec=image_codec)  # fmt: skip
    return store


def prepared(bundle_dir: Path, store: Path, rows: int) -> dict[str, np.ndarray]:
    import zarr

    from survey_infer.bundle import load_bundle
    from survey_infer.tasks import get_task

    bundle = load_bundle(bundle_dir)
    group = zarr.open_group(str(store), mode="r")
    images = group["images"][:rows]
    columns = {c: group[c][:rows] for c in get_task(TASK).input_columns(bundle)}
    inputs, _ = get_task(TASK).prepare(images, columns, bundle)
    return {k: np.ascontiguousarray(v) for k, v in inputs.items()}


def map_write_costs(bundle_dir: Path, inputs: dict[str, np.ndarray], workdir: Path, repeats: int = 3) -> dict[str, float]:
    """CPU ms a row of writing maps.zarr's maps and errors as a unit does (`RowArrayWriter`, one thread, chunks of
    64 rows), with every chunk written (the pipeline's setting) and with zarr's default test of each chunk against
    the fill value; the best of ``repeats``."""
    import shutil

    from survey_infer import array_outputs
    from survey_infer.bundle import load_bundle
    from survey_infer.engines import make_engine
    from survey_infer.tasks import get_task

    bundle, task = load_bundle(bundle_dir), get_task(TASK)
    outputs = make_engine("onnxruntime", bundle, threads=1, device="cpu").run(inputs)
    n = len(inputs["image"])
    flags = np.zeros(n, np.int32)
    maps = task.postprocess(outputs, {"size_kpc": np.full(n, 5.0), "distance_mpc": np.full(n, 100.0)}, flags, bundle)
    arrays = {k: maps[k] for k in ("maps", "maps_err")}
    specs = [o for o in task.array_outputs(bundle) if o.name in arrays]
    costs, kept = {}, array_outputs.WRITE_EVERY_CHUNK
    try:
        for label, empty in (("every chunk", True), ("zarr empty-chunk test", False)):
            array_outputs.WRITE_EVERY_CHUNK = {"write_empty_chunks": empty}  # read by each writer's arrays
            best = np.inf
            for _ in range(repeats):
                store = workdir / "write_cost.zarr"
                shutil.rmtree(store, ignore_errors=True)
                array_outputs.create_row_arrays(store, specs, n, ((0, n),), {}, rows_per_read=64)
                tick = time.process_time()
                writer = array_outputs.RowArrayWriter(store, 0, n)
                for start in range(0, n, 64):
                    writer.add(np.arange(start, start + 64), {k: v[start : start + 64] for k, v in arrays.items()})
                writer.close()
                best = min(best, time.process_time() - tick)
            costs[label] = 1e3 * best / n
    finally:
        array_outputs.WRITE_EVERY_CHUNK = kept
        shutil.rmtree(workdir / "write_cost.zarr", ignore_errors=True)
    return costs


def child(args: argparse.Namespace) -> None:
    """One pipeline run in this process; prints a JSON line."""
    import shutil

    from survey_infer.cluster import client_for
    from survey_infer.config import RunConfig
    from survey_infer.pipeline import plan_run, run_pipeline

    out = Path(args.child_out)
    shutil.rmtree(out, ignore_errors=True)
    config = RunConfig(task=TASK, input=Path(args.child_store), output=out, bundle=args.bundle, engine=args.engine,
                       device="cpu", workers=1, threads_per_worker=args.sessions, in_process=True,
                       engine_threads=max(1, args.threads // args.sessions),
                       build_catalog=False, progress=False)  # fmt: skip
    plan = plan_run(config)
    with client_for(config) as client:
        monitor = CpuMonitor()
        run = run_pipeline(config, client, plan)
        cpu = monitor.stop()
    record = run.record
    units_s = record["timings"]["units_seconds"]
    print(json.dumps({"n": record["rows"]["out"], "status": record["status"], "units_s": units_s,
                      "maps_per_s": record["rows"]["out"] / units_s, "units": plan.n_units,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "maps_zarr_mb": tree_bytes(out / "maps.zarr") / 2**20,
                      **cpu}))  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)


def run_child(args: argparse.Namespace, engine: str, sessions: int, store: Path, n: int) -> dict:
    """One pipeline run of ``store`` in a fresh subprocess (its own peak RSS); its JSON summary."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--bundle", str(args.bundle), "--threads", str(args.threads),
           "--engine", engine, "--sessions", str(sessions), "--child-store", str(store), "--child-out",
           str(args.workdir / f"out_{n}")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"pipeline run for N={n} ({engine}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", default="2048,8192")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/survey_infer_bench_pm"))
    p.add_argument("--engines", default="onnxruntime,torch")
    p.add_argument("--wait-idle", type=float, default=0.0)
    p.add_argument("--image-codec", default="none", choices=list(IMAGE_CODECS),
                   help="the mock stores' images codec (none: lz4 saves ~9%% of 64 px ugriz noise at ~75 us a row "
                        "of decompression, ~6%% of the pipeline's speed here)")  # fmt: skip
    p.add_argument("--min-seconds", type=float, default=8.0)
    p.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    p.add_argument("--sessions", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-store", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from survey_infer.bundle import default_bundle_path

    args.bundle = args.bundle or default_bundle_path(TASK)
    if args.child_store:
        child(args)
        return
    command = "python bench/throughput_property_maps.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.workdir.mkdir(parents=True, exist_ok=True)
    sizes = [int(x) for x in args.n.split(",")]
    stores = {n: ensure_store(args.workdir, n, args.image_codec) for n in sizes}
    waited = wait_for_idle(args.wait_idle)
    inputs = prepared(args.bundle, stores[sizes[0]], 512)
    bare = [mode for e in args.engines.split(",")
            for mode in measure_bare_modes(e, args.bundle, inputs, 64, args.threads, args.min_seconds)]  # fmt: skip
    best = max(bare, key=lambda r: r["rows_per_s"])
    runs = []  # every engine through the pipeline in its own fastest mode: the best pipeline against the best bare
    for engine in dict.fromkeys(r["engine"] for r in bare):
        mode = max((r for r in bare if r["engine"] == engine), key=lambda r: r["rows_per_s"])
        for n in sizes:
            runs.append(dict(run_child(args, engine, mode["sessions"], stores[n], n), engine=engine, mode=bare_label(mode)))
    again = measure_bare(best["engine"], args.bundle, inputs, 64, args.threads, args.min_seconds,
                         sessions=best["sessions"])  # fmt: skip
    reference = 0.5 * (best["rows_per_s"] + again["rows_per_s"])
    writes = map_write_costs(args.bundle, inputs, args.workdir)
    lines = [f"property_maps throughput, bundle {Path(args.bundle).name}, 64 px ugriz -> 6 maps + errors, "
             f"{args.threads} threads ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
             f"command: {command}",
             f"stores: images codec {args.image_codec}, {tree_bytes(stores[sizes[-1]] / 'images') / 2**20:.0f} MB of images at N={sizes[-1]}",
             f"waited {waited:.0f} s for an idle machine (--wait-idle {args.wait_idle:g})", "",
             "bare engine: sessions x threads each, side by side (the pipeline's worker threads run one 1-thread "
             "session each); the fastest is the reference",
             f"{'bare engine':26s}{'maps/s':>9s}{'batch ms':>10s}{'others':>8s}"]  # fmt: skip
    for r in bare + [dict(again, again=True)]:
        label = bare_label(r) + (" (again)" if r.get("again") else "")
        lines.append(f"{label:26s}{r['rows_per_s']:9.1f}{r['batch_ms_median']:10.1f}{r['other_cores']:8.2f}")
    lines += ["", f"{'pipeline (engine mode)':26s}{'N':>6s}{'units':>6s}{'maps/s':>9s}{'vs best bare':>13s}"
                  f"{'peak RSS MB':>13s}{'maps.zarr MB':>14s}{'others':>8s}"]  # fmt: skip
    for r in runs:
        lines.append(f"{r['mode']:26s}{r['n']:6d}{r['units']:6d}{r['maps_per_s']:9.1f}{r['maps_per_s'] / reference:13.3f}"
                     f"{r['peak_rss_mb']:13.0f}{r['maps_zarr_mb']:14.1f}{r['other_cores']:8.2f}")  # fmt: skip
    top = max((r for r in runs if r["n"] == sizes[-1]), key=lambda r: r["maps_per_s"])
    lines.append(f"pipeline_vs_engine {top['maps_per_s'] / reference:.3f} (the fastest pipeline at the largest N, "
                 f"{top['mode']}, against the mean of the two {bare_label(best)} measurements bracketing the "
                 f"pipelines, {reference:.1f} maps/s)")  # fmt: skip
    lines.append("maps.zarr writes alone (maps + errors, 64-row chunks, one thread), CPU ms a row: "
                 + ", ".join(f"{k} {v:.3f}" for k, v in writes.items()))  # fmt: skip
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "throughput_property_maps.txt").write_text(text + "\n")
    (RESULTS / "throughput_property_maps.json").write_text(json.dumps(
        {"bare": bare, "again": again, "runs": runs, "reference": reference, "writes_ms_per_row": writes,
         "command": command}, indent=1,
        default=str))  # fmt: skip


if __name__ == "__main__":
    main()
