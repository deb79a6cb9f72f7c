"""Benchmark, evaluate, or build an engine for one compiled model on this machine, in a child process of its own.

The workflow of one benchmark job:
1. `run_benchmark_job` starts a child process for the job (forked by the warm fork server when one
   runs, `edgeship.device.fork_server`, else `python -m edgeship.device.job_process` with the job as
   JSON on stdin) and, given sensors, samples them from this process while the child runs.
2. The child calls `edgeship.device.measure.measure`: pin the CPUs the job names, load the model
   (timed, with the resident memory it adds), run it once (timed), warm up (a fixed count, or until the
   median latency stops moving), then time `iterations` runs, or every run for `duration_s` (sustained
   mode), with the garbage collector off and one input prepared before timing starts.
3. The child writes the measurement and the monotonic-clock bounds of its timed run as JSON on
   stdout and exits; its peak RSS is the job's own. The parent adds what the sensors saw in those bounds.
4. A model that crashes the runtime, a runtime error, or a job past its timeout ends only the child;
   the parent raises DeviceJobFailed with the runtime's own words.

    >>> from edgeship.records import BenchmarkRequest
    >>> run_benchmark_job("model.onnx", "onnxruntime", BenchmarkRequest(iterations=100), timeout_s=60)
    {'runtime': 'onnxruntime', 'latency_ms': {'p50': 0.02, ...}, 'peak_rss_mb': 41.2, ...}

`run_evaluation_job` runs a validation batch (an .npz of x and, optionally, y) through the model the
same way and returns its predictions (`edgeship.device.evaluate`); `run_tensorrt_build_job` builds a
TensorRT engine from an ONNX file (`edgeship.device.tensorrt_build`) the same way, so a builder that
crashes ends only its child. The returned dicts' keys are fields of `edgeship.records.BenchmarkResult`,
`EvaluationResult`, and for a build, `build_engine`'s answer. Every job's `runtime_options` go to the
runtime's adapter. No torch, TensorFlow, MLflow or Prefect here: this runs on the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

from edgeship.device import fork_server
from edgeship.device.job_process import TIMEOUT_HINT, spawn_job, stop_spawned_jobs
from edgeship.records import BenchmarkRequest, EvaluationRequest, TensorRTBuildOptions


def run_benchmark_job(path: str | Path, runtime: str, request: BenchmarkRequest, timeout_s: float,
                      sensors: Sequence | None = None, memory_mb: int | None = None) -> dict:
    """Measure a model in a fresh child process and return BenchmarkResult fields.

    Given `sensors` (from `edgeship.device.sensors.discover_sensors`) and a request that wants
    them, they are sampled from this process while the child runs and summarised over its timed run.
    The child is killed (with anything it started) when it runs past `timeout_s`; given `memory_mb`, it runs
    under that address-space limit (RLIMIT_AS), so a model that allocates more fails its job, not the device.

    Raises:
        DeviceJobFailed: the runtime could not load or run the model, the child crashed,
            or the job ran past its timeout.
    """
    job = {"kind": "benchmark", "path": str(Path(path).resolve()), "runtime": runtime,
           "request": request.model_dump(), "memory_mb": memory_mb}
    sampler = None
    if sensors and request.sensors:
        from edgeship.device.sensors import SensorSampler

        sampler = SensorSampler(sensors, request.sensor_interval_s)
    with sampler if sampler is not None else contextlib.nullcontext():
        answer = _run_child(job, timeout_s, f"benchmark of {Path(path).name}")
    fields = answer["result"]
    if sampler is not None:
        start, end = answer["window"]
        report = sampler.report(start, end, fields["iterations"])
        fields["sensors"] = report.model_dump(mode="json")
        if report.throttled:
            fields["notes"].append(f"the device throttled during the timed run ({report.throttle_detail})")
    return fields


def run_evaluation_job(path: str | Path, batch_path: str | Path, request: EvaluationRequest, timeout_s: float,
                       max_batch_bytes: int, memory_mb: int | None = None) -> dict:
    """Run a validation batch through a model in a fresh child process; return EvaluationResult fields.

    Raises:
        DeviceJobFailed: the batch or the model is unusable, the child crashed, or it ran past `timeout_s`.
    """
    job = {"kind": "evaluate", "path": str(Path(path).resolve()), "batch": str(Path(batch_path).resolve()),
           "request": request.model_dump(), "max_batch_bytes": max_batch_bytes, "memory_mb": memory_mb}
    return _run_child(job, timeout_s, f"evaluation of {Path(path).name}")["result"]


def run_tensorrt_build_job(onnx_path: str | Path, engine_path: str | Path, options: TensorRTBuildOptions,
                           timeout_s: float, memory_mb: int | None = None) -> dict:
    """Build a TensorRT engine from an ONNX file in a fresh child process; return `build_engine`'s answer.

    Raises:
        DeviceJobFailed: TensorRT is missing, rejects the model or fails to build (its own words),
            the builder crashed, or it ran past `timeout_s`.
    """
    job = {"kind": "tensorrt-build", "path": str(Path(onnx_path).resolve()),
           "engine": str(Path(engine_path).resolve()), "options": options.model_dump(), "memory_mb": memory_mb}
    return _run_child(job, timeout_s, f"TensorRT engine build of {Path(onnx_path).name}",
                      hint="raise the agent's --job-timeout-s (a first build on a Jetson takes minutes)")["result"]


def _run_child(job: dict, timeout_s: float, what: str, hint: str = TIMEOUT_HINT) -> dict:
    server = fork_server.running_server()
    if server is not None:
        try:
            return server.run(job, timeout_s, what, hint)
        except fork_server.ForkServerUnavailable:
            pass  # busy with another caller's job, or gone: a fresh process instead
    return spawn_job(job, timeout_s, what, hint)


def stop_running_jobs() -> int:
    """Kill every job process still running (an agent that is shutting down); return how many."""
    server = fork_server.running_server()
    return stop_spawned_jobs() + (server.kill_current() if server is not None else 0)
