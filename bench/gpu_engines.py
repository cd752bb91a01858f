"""Bare engine throughput on a GPU node (no I/O): PyTorch CUDA fp32 / fp16 and ONNX Runtime CUDA.

Usage: python bench/gpu_engines.py [--batch 1024] [--seconds 5]
Prints a table of cutouts/s per engine for the shipped mass_to_light bundle, and each engine's largest
absolute difference from PyTorch float32 on the CPU.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from survey_infer.bundle import default_bundle_path, load_bundle
from survey_infer.engines import EngineUnavailable, make_engine
from survey_infer.engines.torch_engine import TorchEngine
from survey_infer.tasks import get_task


def throughput(engine, inputs, seconds: float) -> float:
    engine.run(inputs)  # warm-up (cuDNN autotune, allocations)
    engine.run(inputs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    rows, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        engine.run(inputs)  # returns numpy: includes host<->device copies
        rows += len(next(iter(inputs.values())))
    return rows / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    print("command: python " + " ".join(sys.argv))
    bundle = load_bundle(default_bundle_path("mass_to_light"), task="mass_to_light")
    inputs = get_task("mass_to_light").example_inputs(bundle, args.batch, seed=1)
    reference = make_engine("torch", bundle, device="cpu").run({k: v[:256] for k, v in inputs.items()})
    candidates = {
        "torch cuda fp32": lambda: make_engine("torch", bundle, device="cuda"),
        "torch cuda fp16": lambda: TorchEngine(bundle, device="cuda", half=True),
        "onnxruntime cuda": lambda: make_engine("onnxruntime", bundle, device="cuda"),
        "onnxruntime cpu": lambda: make_engine("onnxruntime", bundle, device="cpu"),
    }
    print(f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}  "
          f"bundle: {bundle.id}  batch: {args.batch}")  # fmt: skip
    print(f"{'engine':20s}{'cutouts/s':>12s}{'max |diff| vs cpu fp32':>26s}")
    for name, build in candidates.items():
        try:
            engine = build()
        except EngineUnavailable as exc:
            print(f"{name:20s}{'n/a':>12s}   {exc}")
            continue
        got = engine.run({k: v[:256] for k, v in inputs.items()})
        diff = max(float(np.abs(got[k] - reference[k]).max()) for k in reference)
        print(f"{name:20s}{throughput(engine, inputs, args.seconds):12.0f}{diff:26.2e}")


if __name__ == "__main__":
    main()
