"""Benchmark one compiled model on this machine, in a child process of its own.

The workflow of one job:
1. `run_benchmark_job` starts `python -m edgeship.device.benchmark` and sends it the job as JSON on stdin.
2. The child calls `measure`: load the model (timed), run it once (timed), warm up, then time each of
   `iterations` runs with the garbage collector off, on one input prepared before timing starts.
3. The child writes the measurement as JSON on stdout and exits; its peak RSS is the job's own.
4. A model that crashes the runtime, a runtime error, or a job past its timeout ends only the child;
   the parent raises DeviceJobFailed with the runtime's own words.

    >>> from edgeship.records import BenchmarkRequest
    >>> run_benchmark_job("model.onnx", "onnxruntime", BenchmarkRequest(iterations=100), timeout_s=60)
    {'runtime': 'onnxruntime', 'latency_ms': {'p50': 0.02, ...}, 'peak_rss_mb': 41.2, ...}

The measurement's keys are fields of `edgeship.records.BenchmarkResult`.
No torch, TensorFlow, MLflow or Prefect here: this runs on the device.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgeship.device.runtimes import open_session
from edgeship.errors import DeviceJobFailed, EdgeshipError
from edgeship.records import BenchmarkRequest, TensorSpec

_INPUT_SEED = 0
_STDERR_TAIL = 2000  # characters of a crashed child's stderr kept in the error message


def measure(path: str | Path, runtime: str, request: BenchmarkRequest) -> dict:
    """Load a model with `runtime` and time it in this process, as `request` asks.

    Returns a dict of BenchmarkResult fields: runtime, warmup, iterations, threads,
    latency_ms (p50/p90/p95/p99/max/mean/std), throughput_ips, load_ms,
    first_inference_ms and peak_rss_mb (of this whole process: run it in a fresh one).

    Raises:
        ModelLoadError: the runtime cannot load the file.
    """
    started = time.perf_counter_ns()
    session = open_session(runtime, path, threads=request.threads)
    load_ns = time.perf_counter_ns() - started

    batch = _random_input(session.inputs[0])
    started = time.perf_counter_ns()
    session.run(batch)
    first_ns = time.perf_counter_ns() - started

    for _ in range(request.warmup):
        session.run(batch)

    latencies_ns = np.empty(request.iterations, dtype=np.int64)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed run would be the collector's latency, not the model's
    try:
        for i in range(request.iterations):
            started = time.perf_counter_ns()
            session.run(batch)
            latencies_ns[i] = time.perf_counter_ns() - started
    finally:
        if gc_was_enabled:
            gc.enable()

    latencies_ms = latencies_ns / 1e6
    p50, p90, p95, p99 = np.percentile(latencies_ms, [50, 90, 95, 99])
    return {
        "runtime": runtime,
        "warmup": request.warmup,
        "iterations": request.iterations,
        "threads": request.threads,
        "latency_ms": {
            "p50": float(p50), "p90": float(p90), "p95": float(p95), "p99": float(p99),
            "max": float(latencies_ms.max()), "mean": float(latencies_ms.mean()),
            "std": float(latencies_ms.std()),
        },
        "throughput_ips": request.iterations / (float(latencies_ns.sum()) / 1e9),
        "load_ms": load_ns / 1e6,
        "first_inference_ms": first_ns / 1e6,
        "peak_rss_mb": peak_rss_mb(),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kibibytes, macOS bytes.
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _random_input(spec: TensorSpec) -> np.ndarray:
    """A seeded standard-normal input of the spec's shape (float32, cast when the model wants another type)."""
    values = np.random.default_rng(_INPUT_SEED).standard_normal(spec.shape, dtype=np.float32)
    return values if spec.dtype == "float32" else values.astype(spec.dtype)


def run_benchmark_job(path: str | Path, runtime: str, request: BenchmarkRequest, timeout_s: float) -> dict:
    """Measure a model in a fresh child process and return what `measure` returns.

    The child is killed (with anything it started) when it runs past `timeout_s`.

    Raises:
        DeviceJobFailed: the runtime could not load or run the model, the child crashed,
            or the job ran past its timeout.
    """
    job = json.dumps({"path": str(Path(path).resolve()), "runtime": runtime, "request": request.model_dump()})
    process = subprocess.Popen(
        [sys.executable, "-m", "edgeship.device.benchmark"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=_child_env(), start_new_session=True,  # own process group: a timeout kills all of it
    )
    try:
        stdout, stderr = process.communicate(job.encode(), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        process.communicate()
        raise DeviceJobFailed(
            f"benchmark of {Path(path).name} ran past its {timeout_s:g} s timeout and was stopped; "
            "ask for fewer iterations or raise the agent's --job-timeout-s"
        ) from None
    finally:
        if process.poll() is None:  # interrupted while waiting: leave nothing running
            _kill_group(process)
            process.wait()
    return _read_answer(process.returncode, stdout, stderr)


def _child_env() -> dict[str, str]:
    """This environment, with edgeship importable in the child even when run from a source checkout."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_answer(returncode: int, stdout: bytes, stderr: bytes) -> dict:
    """Turn the child's exit status and JSON answer into a measurement or a DeviceJobFailed."""
    try:
        answer = json.loads(stdout.decode() or "null")
    except ValueError:
        answer = None
    if isinstance(answer, dict):
        if returncode == 0 and isinstance(answer.get("result"), dict):
            return answer["result"]
        if answer.get("error"):
            raise DeviceJobFailed(str(answer["error"]))
    tail = stderr.decode(errors="replace")[-_STDERR_TAIL:].strip()
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        raise DeviceJobFailed(
            f"the benchmark process was killed by {name}: the runtime crashed on this model "
            f"(or ran out of memory); check the model with the runtime on a host first. stderr: {tail or '(empty)'}"
        )
    raise DeviceJobFailed(f"the benchmark process exited with status {returncode} without a result. "
                          f"stderr: {tail or '(empty)'}")


def _main() -> int:
    """Child side: read one job as JSON on stdin, write {"result": ...} or {"error": ...} on stdout."""
    answer_stream = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    # Whatever else writes to stdout (runtime logs, a model's custom op) goes to stderr,
    # so it cannot corrupt the answer.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    runtime = "the runtime"
    try:
        job = json.load(sys.stdin)
        runtime = job["runtime"]
        request = BenchmarkRequest.model_validate(job["request"])
        answer, status = {"result": measure(job["path"], runtime, request)}, 0
    except EdgeshipError as error:
        answer, status = {"error": str(error)}, 1
    except Exception as error:  # a runtime's own exception type while running the model
        answer, status = {"error": f"{runtime} failed on this model: {type(error).__name__}: {error}"}, 1
    with answer_stream:
        json.dump(answer, answer_stream)
    return status


if __name__ == "__main__":
    sys.exit(_main())
