"""Does the agent measure what a plain timing loop measures? Its p50 against an in-process loop's.

For each model, a loopback agent job and a timing loop in this process (the same runtime adapter and
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


def in_process_p50(path: Path, warmup: int, iterations: int) -> float:
    """A plain timing loop on a session opened here with the agent's adapter and options (ms)."""
    session = open_session("onnxruntime", path, threads=1)
    spec = session.inputs[0]
    batch = np.random.default_rng(0).standard_normal(spec.shape, dtype=np.float32)
    for _ in range(warmup):
        session.run(batch)
    latencies = np.empty(iterations, dtype=np.int64)
    gc.collect()
    gc.disable()
    try:
        for i in range(iterations):
            started = time.perf_counter_ns()
            session.run(batch)
            latencies[i] = time.perf_counter_ns() - started
    finally:
        gc.enable()
    return float(np.median(latencies)) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=21, help="pairs of agent job and in-process loop")
    parser.add_argument("--cpu", type=int, default=0, help="the CPU both are pinned to")
    parser.add_argument("--seconds", type=float, default=0.3, help="roughly how long each timed run lasts")
    args = parser.parse_args(argv)

    os.sched_setaffinity(0, {args.cpu})
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as scratch, local_agent(name="fidelity", job_timeout_s=300) as agent, \
            agent.client(timeout_s=300) as client:
        for build in (tiny_linear, small_cnn, wide_mlp):
            path = Path(scratch) / f"{build.__name__}.onnx"
            onnx.save(build(rng), str(path))
            probe = in_process_p50(path, warmup=20, iterations=50)
            iterations = max(200, min(50_000, int(args.seconds * 1e3 / probe)))
            warmup = max(50, iterations // 10)
            request = BenchmarkRequest(warmup=warmup, iterations=iterations, threads=1, cpus=[args.cpu],
                                       sensors=False)
            loop, job = [], []
            for round_ in range(args.rounds):
                if round_ % 2:
                    job.append(client.benchmark(path, build.__name__, request).latency_ms.p50)
                    loop.append(in_process_p50(path, warmup, iterations))
                else:
                    loop.append(in_process_p50(path, warmup, iterations))
                    job.append(client.benchmark(path, build.__name__, request).latency_ms.p50)
            ratios = [a / b for a, b in zip(job, loop)]
            ratio = statistics.median(ratios)
            rows.append({"model": build.__name__, "iterations": iterations, "warmup": warmup,
                         "in_process_p50_ms": statistics.median(loop), "agent_p50_ms": statistics.median(job),
                         "ratio": ratio, "ratio_of_medians": statistics.median(job) / statistics.median(loop),
                         "ratio_of_minimums": min(job) / min(loop), "within_5_percent": abs(ratio - 1) <= TOLERANCE,
                         "round_ratios": ratios, "in_process_rounds_ms": loop, "agent_rounds_ms": job})

    print(f"{'model':<12} {'iterations':>10} {'in-process p50':>15} {'agent p50':>11} {'agent/loop':>11} "
          f"{'(of mins)':>10}  verdict")
    for row in rows:
        print(f"{row['model']:<12} {row['iterations']:>10} {row['in_process_p50_ms']:>12.4f} ms "
              f"{row['agent_p50_ms']:>8.4f} ms {row['ratio']:>11.3f} {row['ratio_of_minimums']:>10.3f}  "
              f"{'within 5%' if row['within_5_percent'] else 'OUTSIDE 5%'}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "agent_fidelity.json"
    out.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": platform.platform(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "pinned_cpu": args.cpu,
        "load_average": os.getloadavg(), "rounds": args.rounds, "tolerance": TOLERANCE,
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "models": rows}, indent=2))
    print(f"wrote {out}")
    return 0 if all(row["within_5_percent"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
