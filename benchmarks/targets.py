"""Every compile target on this machine, side by side: size, accuracy on its own runtime, p50/p99 latency.

Part 1, the reference model (params.yaml's model on the digits at 32x32): trains it,
runs QAT, compiles every registered target, checks each on its own runtime here (or
says why not: a Core ML proxy, "not measured" for TensorRT without a GPU), and times
every artifact whose runtime runs here in a fresh benchmark process, one after another
(same machine, same run). Part 2: MobileNetV2-1.0 at 224x224 (random weights; latency
and size only) for the ONNX and LiteRT targets.

    $ .venv/bin/python benchmarks/targets.py                 # writes benchmarks/results/targets.json
    $ .venv/bin/python benchmarks/targets.py --no-mobilenet --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeship.config import DataParams, QatParams, TrainParams, load_params  # noqa: E402
from edgeship.device.jobs import run_benchmark_job  # noqa: E402
from edgeship.device.runtimes import available_runtimes, open_session, unavailable_reason  # noqa: E402
from edgeship.records import BenchmarkRequest, PreparedData, TrainedModel  # noqa: E402
from edgeship.targets import KNOWN_TARGETS  # noqa: E402
from edgeship.tasks.compile import CompileInputs, get_target  # noqa: E402

REFERENCE_TARGETS = list(KNOWN_TARGETS)
MOBILENET_TARGETS = ["onnx-fp32", "tflite-fp32", "tflite-fp16", "tflite-int8"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=6, help="training epochs of the reference model")
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-mobilenet", action="store_true", help="skip MobileNetV2-1.0 at 224x224")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "targets.json")
    args = parser.parse_args()
    request = BenchmarkRequest(warmup=args.warmup, iterations=args.iterations, threads=args.threads, sensors=False)
    work = Path(tempfile.mkdtemp(prefix="edgeship-bench-"))
    results = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                           "runtimes": available_runtimes()},
               "request": request.model_dump(include={"warmup", "iterations", "threads"}), "models": {}}
    started = time.perf_counter()
    results["models"]["reference"] = reference_model(work / "reference", args, request)
    if not args.no_mobilenet:
        results["models"]["mobilenet_v2_224"] = mobilenet(work / "mobilenet", request)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    for name, model in results["models"].items():
        print(f"\n## {name}: {model['description']}\n")
        print(table(model["targets"]))
    print(f"\nwritten to {args.out} ({results['wall_s']} s)")
    return 0


def reference_model(work: Path, args, request: BenchmarkRequest) -> dict:
    """params.yaml's model on digits at 32x32: every target, measured where it runs."""
    from edgeship.tasks.data import export_digits, prepare
    from edgeship.tasks.host_check import reference_logits
    from edgeship.tasks.qat import quantization_aware_train
    from edgeship.tasks.train import train

    params = load_params(ROOT / "params.yaml")
    export_digits(work / "raw")
    data = prepare(work / "raw", work / "prepared", DataParams(**params.data.model_dump(
        exclude={"raw_dir", "prepared_dir"})))
    trained = train(data, params.model, TrainParams(**{**params.train.model_dump(), "epochs": args.epochs}),
                    work / "model")
    quantized = quantization_aware_train(trained, data, QatParams(**{**params.qat.model_dump(),
                                                                     "epochs": args.qat_epochs}), work / "qat")
    reference = reference_logits(trained, data)
    rows = compile_all(REFERENCE_TARGETS, trained, data, quantized, work)
    for row in rows:
        row.update(check(row.pop("artifact_record"), data, reference))
    measure_latency(rows, request)
    return {"description": f"{params.model.factory} {params.model.kwargs} on digits {data.input_shape}, "
                           f"{args.epochs} epochs; QAT {args.qat_epochs} epochs",
            "fp32_torch_test_accuracy": trained.test_accuracy, "qat_torch_test_accuracy": quantized.test_accuracy,
            "targets": rows}


def mobilenet(work: Path, request: BenchmarkRequest) -> dict:
    """MobileNetV2-1.0 at 224x224x3, 1000 classes, random weights: size and latency of the CPU targets."""
    import torch

    from edgeship.models.zoo import mobilenet_v2

    work.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(mobilenet_v2(1000, 3).state_dict(), work / "model.pt")
    trained = TrainedModel(checkpoint=work / "model.pt", factory="edgeship.models.zoo:mobilenet_v2",
                           num_classes=1000, input_shape=(3, 224, 224), val_accuracy=float("nan"),
                           test_accuracy=float("nan"))
    rng = np.random.default_rng(0)
    images = rng.random((16, 3, 224, 224), dtype=np.float32)
    for split in ("calibration", "test"):
        np.savez(work / f"{split}.npz", x=images, y=np.zeros(16, dtype=np.int64))
    data = PreparedData(directory=work, classes=[str(i) for i in range(1000)], input_shape=(3, 224, 224),
                        counts={"calibration": 16, "test": 16})
    rows = compile_all(MOBILENET_TARGETS, trained, data, None, work)
    for row in rows:
        record = row.pop("artifact_record")
        if record is not None:
            row["accuracy"] = "n/a (random weights)"
            row["runtime_here"] = unavailable_reason(record.runtime) is None
    measure_latency(rows, request)
    return {"description": "edgeship.models.zoo:mobilenet_v2 width 1.0, 3x224x224, 1000 classes, random weights "
                           "(int8 calibrated on 16 random images)", "targets": rows}


def compile_all(names, trained, data, quantized, work: Path) -> list[dict]:
    """Compile the targets three at a time (as the flow's parallel tasks do); a failure is a row, not a crash."""
    def one(name):
        started = time.perf_counter()
        try:
            artifact = get_target(name).compile(CompileInputs(trained=trained, data=data, quantized=quantized,
                                                              output_dir=work / "build" / name))
        except Exception as error:  # noqa: BLE001  (the row records it)
            return {"target": name, "artifact_record": None, "error": f"{type(error).__name__}: {error}"[:500],
                    "compile_s": round(time.perf_counter() - started, 1)}
        return {"target": name, "artifact_record": artifact, "path": str(artifact.path), "runtime": artifact.runtime,
                "precision": artifact.precision, "bytes": artifact.bytes, "sha256": artifact.sha256,
                "compile_s": round(time.perf_counter() - started, 1), "converter": artifact.converter,
                "notes": {k: v for k, v in artifact.notes.items() if k in ("weights", "route", "method",
                          "xnnpack_partitions", "measured_here", "qdq_nodes", "onnxrt_vs_torch")}}

    with ThreadPoolExecutor(3) as pool:
        return list(pool.map(one, names))


def check(artifact, data, reference) -> dict:
    """Accuracy on the target's own runtime here; a labelled proxy for Core ML; 'not measured' with the reason."""
    from edgeship.tasks.host_check import host_check, proxy_or_not_measured

    if artifact is None:
        return {"accuracy": "compile failed"}
    reason = unavailable_reason(artifact.runtime)
    if reason is None:
        result = host_check(artifact, data, reference)
        return {"accuracy": result.accuracy, "top1_agreement": result.top1_agreement,
                "max_abs_logit_diff": result.max_abs_logit_diff, "check": "own runtime", "error": result.error,
                "runtime_here": True}
    proxy = proxy_or_not_measured(artifact, reason)
    if proxy.proxy:
        return {"accuracy": proxy.accuracy, "top1_agreement": proxy.top1_agreement,
                "max_abs_logit_diff": proxy.max_abs_logit_diff, "check": proxy.note, "runtime_here": False}
    return {"accuracy": "not measured", "check": f"not measured: {reason}", "runtime_here": False}


def measure_latency(rows: list[dict], request: BenchmarkRequest) -> None:
    """Time every artifact whose runtime runs here, each in a fresh process, one after another."""
    for row in rows:
        if not row.get("runtime_here") or "path" not in row:
            row["latency"] = "not measured" if "path" in row else "compile failed"
            continue
        row["latency"] = _timed(row["path"], row["runtime"], request)
        if row["runtime"] == "litert":  # the same file with XNNPACK off: did XNNPACK take the graph?
            os.environ["EDGESHIP_LITERT_XNNPACK"] = "0"
            try:
                row["latency_without_xnnpack"] = _timed(row["path"], row["runtime"], request)
            finally:
                os.environ.pop("EDGESHIP_LITERT_XNNPACK")
            row["xnnpack"] = open_session("litert", row["path"], threads=request.threads).xnnpack


def _timed(path: str, runtime: str, request: BenchmarkRequest) -> dict:
    try:
        fields = run_benchmark_job(path, runtime, request.model_copy(update={"runtime": runtime}), timeout_s=600)
    except Exception as error:  # noqa: BLE001
        return {"error": str(error)[:300]}
    latency = fields["latency_ms"]
    return {"p50_ms": round(latency["p50"], 4), "p99_ms": round(latency["p99"], 4),
            "load_ms": round(fields["load_ms"], 1), "peak_rss_mb": round(fields["peak_rss_mb"], 1)}


def table(rows: list[dict]) -> str:
    """Markdown: target, size, accuracy (and how it was measured), p50/p99."""
    lines = ["| target | size | accuracy here | how | p50 ms | p99 ms | note |", "| --- | ---: | --- | --- | ---: | ---: | --- |"]
    for row in rows:
        accuracy = row.get("accuracy")
        shown = f"{accuracy:.4f}" if isinstance(accuracy, float) else str(accuracy)
        latency = row.get("latency")
        p50 = p99 = latency if isinstance(latency, str) else "-"
        if isinstance(latency, dict) and "p50_ms" in latency:
            p50, p99 = f"{latency['p50_ms']:.3f}", f"{latency['p99_ms']:.3f}"
        note = ""
        if "latency_without_xnnpack" in row and "p50_ms" in row["latency_without_xnnpack"]:
            note = f"XNNPACK {'on' if row.get('xnnpack') else 'off'}; without: p50 {row['latency_without_xnnpack']['p50_ms']:.3f}"
        if row.get("error"):
            note = f"error: {row['error'][:120]}"
        size = f"{row['bytes'] / 1024:.1f} KiB" if "bytes" in row else "-"
        how = row.get("check", "own runtime" if row.get("runtime_here") else "-")
        lines.append(f"| {row['target']} | {size} | {shown} | {how[:90]} | {p50} | {p99} | {note} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
