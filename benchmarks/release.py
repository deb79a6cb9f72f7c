"""Accuracy, size and latency of the reference release: PyTorch eager fp32, ONNX fp32, ONNX int8.

Runs the stages on digits with the repository's params.yaml (no MLflow, no Prefect),
then measures side by side in one run on this machine:
- ONNX fp32 and int8: p50/p99 measured by a device agent on 127.0.0.1 (the same job the
  release flow sends), accuracy from the host check on ONNX Runtime;
- PyTorch eager fp32: the same timing loop run in-process (the agent has no torch), labelled so.

    .venv/bin/python benchmarks/release.py [--iterations 1000] [--threads 1]

Prints a table and writes benchmarks/results/release.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgeship.config import load_params
from edgeship.device.client import local_agent
from edgeship.records import BenchmarkRequest
from edgeship.tasks.compile import CompileInputs, get_target
from edgeship.tasks.data import export_digits, load_split, prepare
from edgeship.tasks.host_check import host_check, reference_logits
from edgeship.tasks.qat import quantization_aware_train
from edgeship.tasks.train import evaluate, load_model, train

REPO = Path(__file__).resolve().parents[1]


def torch_eager_latency(model: torch.nn.Module, shape: tuple[int, ...], warmup: int, iterations: int) -> dict:
    """The agent's method in-process: one preallocated input, gc off, warm-up, then timed single runs."""
    batch = torch.from_numpy(np.random.default_rng(0).random(shape, dtype=np.float32))
    with torch.inference_mode():
        for _ in range(warmup):
            model(batch)
        gc.disable()
        try:
            samples = np.empty(iterations)
            for i in range(iterations):
                start = time.perf_counter_ns()
                model(batch)
                samples[i] = (time.perf_counter_ns() - start) / 1e6
        finally:
            gc.enable()
    return {"p50": float(np.percentile(samples, 50)), "p99": float(np.percentile(samples, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "release.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(REPO / "params.yaml")

    with tempfile.TemporaryDirectory(prefix="edgeship-bench-") as tmp:
        work = Path(tmp)
        export_digits(work / "raw")
        data = prepare(work / "raw", work / "prepared", params.data)
        trained = train(data, params.model, params.train, work)
        quantized = quantization_aware_train(trained, data, params.qat, work)
        artifacts = [get_target(name).compile(CompileInputs(trained=trained, data=data, output_dir=work / name,
                                                            quantized=quantized))
                     for name in ("onnx-fp32", "onnx-int8")]
        reference = reference_logits(trained, data)
        model = load_model(trained)
        x_test, y_test = load_split(data, "test")
        shape = (1, *data.input_shape)
        rows = [{"model": "pytorch-eager-fp32", "measured_by": "in-process loop (agent method)",
                 "accuracy": evaluate(model, x_test, y_test), "bytes": trained.checkpoint.stat().st_size,
                 **torch_eager_latency(model, shape, args.warmup, args.iterations)}]
        request = BenchmarkRequest(warmup=args.warmup, iterations=args.iterations, threads=args.threads)
        with local_agent(name="bench-host") as agent, agent.client(timeout_s=600) as client:
            for artifact in artifacts:
                measured = client.benchmark(artifact.path, artifact.target, request)
                check = host_check(artifact, data, reference, threads=args.threads)
                rows.append({"model": artifact.target, "measured_by": "device agent on 127.0.0.1",
                             "accuracy": check.accuracy, "bytes": artifact.bytes,
                             "p50": measured.latency_ms.p50, "p99": measured.latency_ms.p99})

    fp32 = next(r for r in rows if r["model"] == "onnx-fp32")
    print(f"{'model':<20} {'accuracy':>8} {'size kB':>8} {'p50 ms':>8} {'p99 ms':>8} {'p50 vs onnx-fp32':>17}  measured by")
    for row in rows:
        row["p50_speedup_vs_onnx_fp32"] = fp32["p50"] / row["p50"]
        print(f"{row['model']:<20} {row['accuracy']:>8.4f} {row['bytes'] / 1e3:>8.0f} {row['p50']:>8.3f} "
              f"{row['p99']:>8.3f} {row['p50_speedup_vs_onnx_fp32']:>16.2f}x  {row['measured_by']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "iterations": args.iterations,
                                    "test_images": int(len(y_test)), "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
