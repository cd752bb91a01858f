"""GPU throughput: each engine bare (in memory) at several batch sizes, then the whole pipeline with it.

    python bench/gpu_throughput.py                                   # on a GPU node (H100 goal: >= 50k/s, ratio >= 0.8)
    python bench/gpu_throughput.py --device cpu --n 2000 --seconds 1  # a smoke check of the script on a CPU

1. Store and bundle as bench/throughput.py finds them (the shipped mass_to_light bundle; a mock store, reused
   when it exists with the same n, size and chunking). The store's inner chunk (--store-rows-per-batch) is the
   batch the pipeline reads and runs.
2. Bare: for each ENGINE[:PRECISION] of --engines and each --batches size, rows/s of engine.run on prepared
   float32 rows held in memory (host -> device -> host copies included: a run pays them too).
3. Pipeline: for each engine, `run_pipeline` on a fresh output with that engine on --device: a LocalCluster of
   --workers worker processes with --threads-per-worker threads each (threads read and prepare Zarr chunks
   while the GPU runs others), or --cluster cuda (dask-cuda, one worker per GPU). rows/s from the first
   submission to the last unit done (run.json units_seconds); catalog building off.
4. Prints one table and ends with `pipeline_vs_engine <ratio>`: the fastest engine's pipeline rows/s over its
   own bare rows/s at the pipeline's batch size.

Not yet run on a GPU (bench/README.md): the numbers in README.md's GPU row come from bench/gpu_engines.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for path in (str(REPO), str(BENCH)):
    if path not in sys.path:
        sys.path.insert(0, path)

import throughput  # noqa: E402  (bench/throughput.py: store, bundle, bare timing helpers)

from survey_infer.bundle import load_bundle  # noqa: E402
from survey_infer.engines import EngineUnavailable, make_engine  # noqa: E402

GPU_ENGINES = "tensorrt:fp16,tensorrt:fp32,torch:fp16,torch:fp32,onnxruntime:fp32"
CPU_ENGINES = "onnxruntime:fp32,torch:fp32"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cuda (default) or cpu (smoke check)")
    p.add_argument("--engines", help=f"ENGINE[:PRECISION],... (default {GPU_ENGINES}; on cpu {CPU_ENGINES})")
    p.add_argument("--batches", default="", help="bare batch sizes (default 256,1024,4096; on cpu 64,256)")
    p.add_argument("--seconds", type=float, default=5.0, help="minimum timed seconds per bare measurement (5)")
    p.add_argument("--bare-rows", type=int, default=16384, help="prepared rows held in memory (16384)")
    p.add_argument("--n", type=int, default=200_000, help="cutouts in the pipeline's store (200000)")
    p.add_argument("--size", type=int, default=69)
    p.add_argument("--store", type=Path, help="store to use (reused if it has --n rows, else mocked there)")
    p.add_argument("--store-rows-per-unit", type=int, default=16384, help="rows per unit of work when mocking")
    p.add_argument("--store-rows-per-batch", type=int, default=1024, help="rows per chunk = the pipeline's batch")
    p.add_argument("--store-codec", choices=["blosc-lz4", "blosc-zstd", "none"], default="blosc-lz4")
    p.add_argument("--bundle", type=Path, help="bundle directory (default: the shipped mass_to_light one)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "survey-infer-gpu-bench")
    p.add_argument("--cluster", choices=["local", "cuda"], default="local")
    p.add_argument("--workers", type=int, default=1, help="LocalCluster workers (default 1)")
    p.add_argument("--threads-per-worker", type=int, default=8, help="reader threads per worker (default 8)")
    p.add_argument("--max-in-flight", type=int, help="default: RunConfig's (2 per worker thread)")
    p.add_argument("--no-pipeline", dest="pipeline", action="store_false", help="bare engines only")
    p.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = p.parse_args(argv)
    args.engines = args.engines or (GPU_ENGINES if args.device == "cuda" else CPU_ENGINES)
    args.batches = [int(b) for b in (args.batches or ("256,1024,4096" if args.device == "cuda" else "64,256")).split(",")]
    return args


def build(spec: str, bundle, device: str):
    name, _, precision = spec.partition(":")
    return make_engine(name, bundle, device=device, precision=precision or "fp32")


def run_pipeline_with(args, store: Path, bundle_dir: Path, spec: str, out_dir: Path) -> dict:
    from survey_infer.cluster import client_for
    from survey_infer.config import RunConfig
    from survey_infer.pipeline import plan_run, run_pipeline

    name, _, precision = spec.partition(":")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    config = RunConfig(task="mass_to_light", input=store, output=out_dir, bundle=bundle_dir, engine=name,
                       device=args.device, precision=precision or "fp32", workers=args.workers,
                       threads_per_worker=args.threads_per_worker, max_in_flight=args.max_in_flight,
                       build_catalog=False, progress=False, cluster=args.cluster)  # fmt: skip
    plan = plan_run(config)
    with client_for(config) as client:
        client.wait_for_workers(1)
        run = run_pipeline(config, client, plan)
    record = run.record
    seconds = record["timings"]["units_seconds"]
    return {"exit_code": run.exit_code, "rows": record["rows"]["out"], "units_s": seconds,
            "rows_per_s": record["rows"]["out"] / seconds, "rows_per_read": plan.spec.rows_per_read,
            "engine": record.get("engine"), "failures": record["failures"][:3]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print("command: python " + " ".join(sys.argv))
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible to torch: use --device cpu for a smoke check", file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    bundle_dir, bundle_source = throughput.find_bundle(argparse.Namespace(bundle=args.bundle), args.workdir)
    store, store_source, _ = throughput.ensure_store(args, args.workdir)
    bundle = load_bundle(bundle_dir)
    inputs = throughput.bare_inputs(bundle_dir, store, args.bare_rows)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    print(f"device: {args.device} ({device_name})  bundle: {bundle.id} ({bundle_source})  store: {store} "
          f"({store_source}, {args.n} rows, batch {args.store_rows_per_batch})")  # fmt: skip

    results: dict = {"bare": {}, "pipeline": {}}
    print(f"{'engine':22s}" + "".join(f"{'bare b=' + str(b):>14s}" for b in args.batches))
    for spec in args.engines.split(","):
        try:
            engine = build(spec, bundle, args.device)
        except EngineUnavailable as exc:
            print(f"{spec:22s}n/a: {exc}")
            continue
        row = {}
        for batch in args.batches:
            row[batch] = throughput.time_engine(engine, inputs, batch, args.seconds)["rows_per_s"]
        results["bare"][spec] = {"rows_per_s": row, "describe": engine.describe()}
        print(f"{spec:22s}" + "".join(f"{row[b]:14.0f}" for b in args.batches))
        del engine
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if not results["bare"]:
        print("no engine ran", file=sys.stderr)
        return 1

    if args.pipeline:
        pipeline_batch = args.store_rows_per_batch
        print(f"\npipeline ({args.cluster}, {args.workers} worker(s) x {args.threads_per_worker} threads, batch "
              f"{pipeline_batch}, {args.n} rows)")  # fmt: skip
        print(f"{'engine':22s}{'pipeline/s':>14s}{'bare/s':>14s}{'ratio':>10s}")
        for spec in results["bare"]:
            result = run_pipeline_with(args, store, bundle_dir, spec, args.workdir / "out")
            engine = build(spec, bundle, args.device)  # bare at the pipeline's batch, measured right after
            result["bare_rows_per_s"] = throughput.time_engine(engine, inputs, pipeline_batch, args.seconds)["rows_per_s"]
            del engine
            result["ratio"] = result["rows_per_s"] / result["bare_rows_per_s"]
            results["pipeline"][spec] = result
            print(f"{spec:22s}{result['rows_per_s']:14.0f}{result['bare_rows_per_s']:14.0f}{result['ratio']:10.3f}"
                  + ("" if result["exit_code"] == 0 else f"  FAILED {result['failures']}"))  # fmt: skip
        fastest = max(results["pipeline"], key=lambda s: results["pipeline"][s]["rows_per_s"])
        results["fastest"] = fastest
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))
        print(f"fastest end to end: {fastest} {results['pipeline'][fastest]['rows_per_s']:.0f} cutouts/s")
        print(f"pipeline_vs_engine {results['pipeline'][fastest]['ratio']:.3f}")
    elif args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
