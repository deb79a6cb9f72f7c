"""Does the agent measure what a plain timing loop measures? Its p50 against an in-process loop's.

For each model (three ONNX models on ONNX Runtime; a LiteRT fp32 and an integer-I/O int8 model, where
litert-torch's environment exists), a loopback agent job and a timing loop in this process (the same runtime adapter and
session options, the same input, warm-up and iteration count, one thread, pinned to the same CPU) run
back to back, in alternating order, for several rounds. Each round gives a ratio agent p50 / loop p50;
the verdict takes the median ratio over the rounds (a pair shares the machine's state, which on a shared
host changes from second to second, so pairs cancel most of it). The agent passes within 5%.

    .venv/bin/python benchmarks/agent_fidelity.py                  # prints a table, writes the JSON
    .venv/bin/python benchmarks/agent_fidelity.py --rounds 41 --cpu 1

Writes benchmarks/results/agent_fidelity.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeship.device.client import local_agent
from edgeship.device.runtimes import open_session
from edgeship.records import BenchmarkRequest

RESULTS = Path(__file__).resolve().parent / "results"
TOLERANCE = 0.05


def _model(name: str, nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgeship-bench")
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def tiny_linear(rng) -> onnx.ModelProto:
    """[1,1,8,8] -> Flatten -> Gemm -> [1,10]: about 10 us, the harness's own overhead shows."""
    weight = numpy_helper.from_array(rng.standard_normal((10, 64)).astype(np.float32), "w")
    bias = numpy_helper.from_array(np.zeros(10, np.float32), "b")
    return _model("tiny_linear", [helper.make_node("Flatten", ["x"], ["f"]),
                                  helper.make_node("Gemm", ["f", "w", "b"], ["y"], transB=1)],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], [weight, bias])


def small_cnn(rng) -> onnx.ModelProto:
    """[1,3,64,64] -> 3 x (Conv 3x3 + Relu) -> GlobalAveragePool -> Gemm: a sub-millisecond vision model."""
    nodes, inits, channels, previous = [], [], 3, "x"
    for i, width in enumerate((16, 32, 64)):
        inits.append(numpy_helper.from_array(
            (rng.standard_normal((width, channels, 3, 3)) * 0.1).astype(np.float32), f"k{i}"))
        nodes += [helper.make_node("Conv", [previous, f"k{i}"], [f"c{i}"], pads=[1, 1, 1, 1], strides=[2, 2]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        channels, previous = width, f"r{i}"
    inits += [numpy_helper.from_array(rng.standard_normal((10, 64)).astype(np.float32), "w"),
              numpy_helper.from_array(np.zeros(10, np.float32), "b")]
    nodes += [helper.make_node("GlobalAveragePool", [previous], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
              helper.make_node("Gemm", ["f", "w", "b"], ["y"], transB=1)]
    return _model("small_cnn", nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64, 64])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)


def wide_mlp(rng) -> onnx.ModelProto:
    """[1,1,32,32] -> Flatten -> 3 x Gemm(1024) + Relu -> Gemm: a few milliseconds, memory-bound."""
    nodes, inits, previous, width = [helper.make_node("Flatten", ["x"], ["h"])], [], "h", 1024
    for i in range(3):
        inits += [numpy_helper.from_array((rng.standard_normal((1024, width)) * 0.03).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(np.zeros(1024, np.float32), f"b{i}")]
        nodes += [helper.make_node("Gemm", [previous, f"w{i}", f"b{i}"], [f"g{i}"], transB=1),
                  helper.make_node("Relu", [f"g{i}"], [f"h{i}"])]
        previous = f"h{i}"
    inits += [numpy_helper.from_array(rng.standard_normal((10, 1024)).astype(np.float32), "wo"),
              numpy_helper.from_array(np.zeros(10, np.float32), "bo")]
    nodes.append(helper.make_node("Gemm", [previous, "wo", "bo"], ["y"], transB=1))
    return _model("wide_mlp", nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 32, 32])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)


def litert_models(scratch: Path) -> list[tuple[str, Path]]:
    """tflite-fp32 and tflite-int8 (integer I/O) of an untrained small ResNet on 16x16 digits, by edgeship's own
    LiteRT targets; none when the converter's environment is missing (the table says so)."""
    import torch

    from edgeship.config import DataParams
    from edgeship.errors import CompileError
    from edgeship.models.zoo import small_resnet
    from edgeship.records import TrainedModel
    from edgeship.tasks.compile import CompileInputs, get_target
    from edgeship.tasks.data import export_digits, prepare

    export_digits(scratch / "raw")
    data = prepare(scratch / "raw", scratch / "prepared", DataParams(input_size=16, calibration_size=16))
    torch.manual_seed(0)
    torch.save(small_resnet(10, 1).state_dict(), scratch / "resnet.pt")
    trained = TrainedModel(checkpoint=scratch / "resnet.pt", factory="edgeship.models.zoo:small_resnet",
                           num_classes=10, input_shape=data.input_shape, val_accuracy=0.0, test_accuracy=0.0)
    models = []
    for target in ("tflite-fp32", "tflite-int8"):
        try:
            artifact = get_target(target).compile(CompileInputs(trained=trained, data=data,
                                                                output_dir=scratch / target))
        except CompileError as error:
            print(f"{target}: not measured: {str(error)[:200]}")
            continue
        models.append((f"resnet_{target}", artifact.path))
    return models


def in_process_p50(path: Path, warmup: int, iterations: int, runtime: str = "onnxruntime") -> float:
    """A plain timing loop on a session opened here with the agent's adapter and options (ms): the runtime's
    own call (for an integer-I/O LiteRT model, invoke on a quantized input, as the agent now reports it)."""
    session = open_session(runtime, path, threads=1)
    spec = session.inputs[0]
    batch = np.random.default_rng(0).standard_normal(spec.shape, dtype=np.float32)
    run = session.run
    if getattr(session, "converts_io", False):
        run, batch = session.invoke, session.prepare(batch)
    for _ in range(warmup):
        run(batch)
    latencies = np.empty(iterations, dtype=np.int64)
    gc.collect()
    gc.disable()
    try:
        for i in range(iterations):
            started = time.perf_counter_ns()
            run(batch)
            latencies[i] = time.perf_counter_ns() - started
    finally:
        gc.enable()
    return float(np.median(latencies)) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=21, help="pairs of agent job and in-process loop")
    parser.add_argument("--cpu", type=int, default=0, help="the CPU both are pinned to")
    parser.add_argument("--seconds", type=float, default=0.3, help="roughly how long each timed run lasts")
    parser.add_argument("--runtimes", default="onnxruntime,litert",
                        help="comma-separated runtimes to check (litert needs .venv/litert-converter)")
    args = parser.parse_args(argv)
    args.runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]

    os.sched_setaffinity(0, {args.cpu})
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as scratch, local_agent(name="fidelity", job_timeout_s=300) as agent, \
            agent.client(timeout_s=300) as client:
        models = []
        for build in (tiny_linear, small_cnn, wide_mlp):
            path = Path(scratch) / f"{build.__name__}.onnx"
            onnx.save(build(rng), str(path))
            models.append((build.__name__, "onnxruntime", path))
        if "litert" in args.runtimes:
            models += [(name, "litert", path) for name, path in litert_models(Path(scratch) / "litert")]
        models = [m for m in models if m[1] in args.runtimes]
        for name, runtime, path in models:
            probe = in_process_p50(path, warmup=20, iterations=50, runtime=runtime)
            iterations = max(200, min(50_000, int(args.seconds * 1e3 / probe)))
            warmup = max(50, iterations // 10)
            request = BenchmarkRequest(runtime=runtime, warmup=warmup, iterations=iterations, threads=1,
                                       cpus=[args.cpu], sensors=False)
            loop, job, io = [], [], []
            for round_ in range(args.rounds):
                if round_ % 2:
                    result = client.benchmark(path, name, request)
                    loop.append(in_process_p50(path, warmup, iterations, runtime))
                else:
                    loop.append(in_process_p50(path, warmup, iterations, runtime))
                    result = client.benchmark(path, name, request)
                job.append(result.latency_ms.p50)
                io.append(result.io_conversion_ms)
            ratios = [a / b for a, b in zip(job, loop)]
            ratio = statistics.median(ratios)
            rows.append({"model": name, "runtime": runtime, "iterations": iterations, "warmup": warmup,
                         "io_conversion_ms": statistics.median(io) if None not in io else None,
                         "in_process_p50_ms": statistics.median(loop), "agent_p50_ms": statistics.median(job),
                         "ratio": ratio, "ratio_of_medians": statistics.median(job) / statistics.median(loop),
                         "ratio_of_minimums": min(job) / min(loop), "within_5_percent": abs(ratio - 1) <= TOLERANCE,
                         "round_ratios": ratios, "in_process_rounds_ms": loop, "agent_rounds_ms": job})

    print(f"{'model':<22} {'runtime':<11} {'iterations':>10} {'in-process p50':>15} {'agent p50':>11} "
          f"{'io conv':>9} {'agent/loop':>11} {'(of mins)':>10}  verdict")
    for row in rows:
        io = f"{row['io_conversion_ms']:.4f}" if row["io_conversion_ms"] is not None else "-"
        print(f"{row['model']:<22} {row['runtime']:<11} {row['iterations']:>10} {row['in_process_p50_ms']:>12.4f} ms "
              f"{row['agent_p50_ms']:>8.4f} ms {io:>9} {row['ratio']:>11.3f} {row['ratio_of_minimums']:>10.3f}  "
              f"{'within 5%' if row['within_5_percent'] else 'OUTSIDE 5%'}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "agent_fidelity.json"
    out.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": platform.platform(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "pinned_cpu": args.cpu,
        "load_average": os.getloadavg(), "rounds": args.rounds, "tolerance": TOLERANCE, "runtimes": args.runtimes,
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "models": rows,
        "targets": {f"agent_p50_within_5_percent_{runtime}": {
            "limit": TOLERANCE, "measured": max(abs(r["ratio"] - 1) for r in rows if r["runtime"] == runtime),
            "met": all(r["within_5_percent"] for r in rows if r["runtime"] == runtime)}
            for runtime in dict.fromkeys(r["runtime"] for r in rows)}}, indent=2))
    print(f"wrote {out}")
    return 0 if all(row["within_5_percent"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
