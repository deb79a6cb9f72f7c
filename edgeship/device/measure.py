"""Time one compiled model in this process: what a benchmark job's child process does.

`measure` pins the CPUs the job names, loads the model (timed, with the resident memory it
adds), runs it once (timed), warms up (a fixed count, or until the median latency stops
moving), then times `iterations` runs, or every run for `duration_s` (sustained mode), with
the garbage collector off and one input prepared before timing starts. It returns
BenchmarkResult fields and the monotonic-clock bounds of the timed run (for the sensors).
No torch, TensorFlow, MLflow or Prefect here: this runs on the device.

    >>> measured = measure("model.onnx", "onnxruntime", BenchmarkRequest(iterations=100))
    >>> measured.fields["latency_ms"]["p99"]
"""

from __future__ import annotations

import gc
import math
import os
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeship.device.detections import open_model
from edgeship.device.runtimes import available_runtimes
from edgeship.errors import DeviceJobFailed
from edgeship.records import BenchmarkRequest, TensorSpec

_INPUT_SEED = 0
_STABLE_TOLERANCE = 0.03  # warm-up is stable when a window's median latency is within 3% of the one before
_STABLE_WINDOW_S = 0.25  # a warm-up window lasts at least this long ...
_STABLE_WINDOW_RUNS = (10, 200)  # ... and holds between this many runs
_MAX_SAMPLES = 1 << 20  # latencies kept in a sustained run; beyond, every other one is dropped (exact stats stay)


@dataclass
class Measurement:
    """What `measure` found: BenchmarkResult fields, and the timed run's bounds on the monotonic clock."""

    fields: dict
    timed_start: float
    timed_end: float


def measure(path: str | Path, runtime: str, request: BenchmarkRequest) -> Measurement:
    """Load a model with `runtime` and time it in this process, as `request` asks.

    `fields` holds BenchmarkResult fields: runtime, runtime_options (those in effect), mode, warmup,
    iterations, duration_s, threads, cpus, latency_ms (p50/p90/p95/p99/p99.9/max/min/mean/std),
    throughput_ips, load_ms, first_inference_ms, peak_rss_mb (of this whole process: run it in a fresh
    one), load_rss_delta_mb, histogram, windows, drift_ratio, started_at, finished_at and notes.

    Raises:
        ModelLoadError: the runtime cannot load the file.
        DeviceJobFailed: the CPUs the request names are not available here.
    """
    notes: list[str] = []
    cpus = pin_cpus(request.cpus)
    rss_before = _rss_bytes()
    started = time.perf_counter_ns()
    session = open_model(runtime, path, threads=request.threads, postprocess=request.postprocess,
                         **request.runtime_options)
    load_ns = time.perf_counter_ns() - started
    rss_loaded = _rss_bytes()
    options = dict(getattr(session, "options", request.runtime_options))
    if request.runtime_options.get("xnnpack") and options.get("xnnpack") is False:
        notes.append("XNNPACK was asked for but took no node of this model: LiteRT's builtin kernels ran it")

    batch = _random_input(session.inputs[0])
    run, io_conversion_ms = session.run, None
    if getattr(session, "converts_io", False):
        # The runtime's latency is its own: float <-> integer I/O conversion in numpy is timed apart, beside it.
        io_conversion_ms = _io_conversion_ms(session, batch, max(20, min(request.iterations, 200)))
        run, batch = session.invoke, session.prepare(batch)
        notes.append(f"latency is the runtime's (set input, invoke, read output); quantizing the float input and "
                     f"dequantizing the output in numpy took {io_conversion_ms:.4f} ms more per run (p50, "
                     f"io_conversion_ms)")
    started = time.perf_counter_ns()
    run(batch)
    first_ns = time.perf_counter_ns() - started

    warmup, stable, estimate_ns = _warm_up(run, batch, request, first_ns)
    if stable is False:
        notes.append(f"warm-up did not stabilise within {warmup} runs (median moved more than "
                     f"{_STABLE_TOLERANCE:.0%} between windows): the device may be busy or throttling")
    timed = _timed_runs(run, batch, request, estimate_ns)
    if timed.stride > 1:
        notes.append(f"kept every {timed.stride}th latency of {timed.count} for percentiles "
                     f"(the {_MAX_SAMPLES} sample cap); count, mean, min and max are exact")

    latencies_ms = timed.latencies_ns / 1e6
    p50, p90, p95, p99, p999 = np.percentile(latencies_ms, [50, 90, 95, 99, 99.9])
    span_ns = timed.span_ns
    windows = _windows(timed.starts_ns, timed.latencies_ns, request.windows, span_ns)
    # Drift is a sustained run's figure: over a short fixed count its windows are milliseconds apart.
    drift = (windows[-1]["p50"] / windows[0]["p50"] if request.duration_s and len(windows) > 1
             and windows[0]["p50"] > 0 else None)
    fields = {
        "runtime": runtime,
        "runtime_version": available_runtimes().get(runtime),
        "runtime_options": options,
        "mode": "duration" if request.duration_s else "iterations",
        "warmup": warmup,
        "warmup_stable": stable,
        "iterations": timed.count,
        "duration_s": span_ns / 1e9,
        "threads": request.threads,
        "cpus": cpus,
        "latency_ms": {
            "p50": float(p50), "p90": float(p90), "p95": float(p95), "p99": float(p99), "p999": float(p999),
            "max": timed.max_ns / 1e6, "min": timed.min_ns / 1e6, "mean": timed.total_ns / timed.count / 1e6,
            "std": float(latencies_ms.std()),
        },
        "throughput_ips": timed.count / (timed.total_ns / 1e9),
        "load_ms": load_ns / 1e6,
        "first_inference_ms": first_ns / 1e6,
        "peak_rss_mb": peak_rss_mb(),
        "load_rss_delta_mb": (rss_loaded - rss_before) / (1 << 20),
        "histogram": _histogram(latencies_ms, request.histogram_bins),
        "windows": windows,
        "drift_ratio": drift,
        "started_at": timed.started_at,
        "finished_at": timed.started_at + span_ns / 1e9,
        "notes": notes,
        "io_conversion_ms": io_conversion_ms,
    }
    return Measurement(fields, timed.monotonic_start, timed.monotonic_start + span_ns / 1e9)


def _io_conversion_ms(session, batch: np.ndarray, runs: int) -> float:
    """Median time (ms) of an integer-I/O session's numpy quantize of the input plus dequantize of the output."""
    output = session.invoke(session.prepare(batch))
    clock, times = time.perf_counter_ns, []
    for _ in range(runs):
        started = clock()
        session.prepare(batch)
        session.finish(output)
        times.append(clock() - started)
    return float(np.median(times)) / 1e6


def pin_cpus(cpus: Sequence[int] | None) -> list[int] | None:
    """Pin this process (and the threads it starts) to `cpus`; return the CPUs it may run on (None: OS cannot say)."""
    if not hasattr(os, "sched_setaffinity"):
        if cpus:
            raise DeviceJobFailed(f"the job asks for CPUs {list(cpus)}, but {sys.platform} cannot pin a process "
                                  "to CPUs; leave `cpus` unset for this device")
        return None
    if cpus:
        allowed = os.sched_getaffinity(0)
        missing = sorted(set(cpus) - allowed)
        if missing:
            raise DeviceJobFailed(f"the job asks for CPU(s) {missing}, which this agent may not use; it may use "
                                  f"{sorted(allowed)}")
        os.sched_setaffinity(0, set(cpus))
    return sorted(os.sched_getaffinity(0))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kibibytes, macOS bytes.
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _random_input(spec: TensorSpec) -> np.ndarray:
    """A seeded standard-normal input of the spec's shape (float32, cast when the model wants another type)."""
    values = np.random.default_rng(_INPUT_SEED).standard_normal(spec.shape, dtype=np.float32)
    return values if spec.dtype == "float32" else values.astype(spec.dtype)


def _warm_up(run, batch, request: BenchmarkRequest, first_ns: int) -> tuple[int, bool | None, int]:
    """Warm up; return (runs done, stable or None for a fixed count, a median latency estimate in ns)."""
    clock = time.perf_counter_ns
    recent = [first_ns]
    for _ in range(request.warmup):
        started = clock()
        run(batch)
        recent.append(clock() - started)
    recent = recent[-50:]
    if not request.warmup_until_stable:
        return request.warmup, None, int(np.median(recent))

    done, deadline = request.warmup, time.monotonic() + request.warmup_max_s
    previous = None
    while True:
        estimate = int(np.median(recent))
        size = min(max(math.ceil(_STABLE_WINDOW_S * 1e9 / max(estimate, 1)), _STABLE_WINDOW_RUNS[0]),
                   _STABLE_WINDOW_RUNS[1])
        if done + size > max(request.warmup_max, request.warmup) or time.monotonic() > deadline:
            return done, False, estimate
        window = np.empty(size, dtype=np.int64)
        for i in range(size):
            started = clock()
            run(batch)
            window[i] = clock() - started
        done += size
        median = int(np.median(window))
        recent = [median]
        if previous is not None and abs(median - previous) <= _STABLE_TOLERANCE * previous:
            return done, True, median
        previous = median


@dataclass
class _Timed:
    latencies_ns: np.ndarray  # kept samples (every `stride`th run)
    starts_ns: np.ndarray  # each kept run's start, since the timed run began
    count: int  # runs timed (all of them)
    total_ns: int
    min_ns: int
    max_ns: int
    stride: int
    span_ns: int  # from the first run's start to the last one's end
    started_at: float  # unix time
    monotonic_start: float


def _timed_runs(run, batch, request: BenchmarkRequest, estimate_ns: int) -> _Timed:
    """Time `iterations` runs, or every run for `duration_s`, each on its own, with the collector off."""
    duration_ns = int(request.duration_s * 1e9) if request.duration_s else 0
    capacity = (min(_MAX_SAMPLES, duration_ns // max(estimate_ns, 1) * 3 // 2 + 1024) // 2 * 2 if duration_ns
                else request.iterations)
    # np.empty does not touch its pages: only the samples written count towards resident memory.
    latencies = np.empty(capacity, dtype=np.int64)
    starts = np.empty(capacity, dtype=np.int64)
    clock = time.perf_counter_ns
    count = kept = total = 0
    low, high, stride = 1 << 62, 0, 1
    limit = request.iterations

    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed run would be the collector's latency, not the model's
    try:
        started_at, monotonic_start = time.time(), time.monotonic()
        begin = clock()
        deadline = begin + duration_ns
        while True:
            started = clock()
            run(batch)
            ended = clock()
            elapsed = ended - started
            total += elapsed
            low, high = min(low, elapsed), max(high, elapsed)
            if count % stride == 0:
                if kept == capacity:  # only in sustained mode: halve what is kept, keep going
                    half = capacity // 2
                    latencies[:half] = latencies[0:capacity:2]
                    starts[:half] = starts[0:capacity:2]
                    kept, stride = half, stride * 2
                if count % stride == 0:
                    latencies[kept] = elapsed
                    starts[kept] = started - begin
                    kept += 1
            count += 1
            if (ended >= deadline) if duration_ns else (count >= limit):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return _Timed(latencies[:kept].copy(), starts[:kept].copy(), count, total, low, high, stride, ended - begin,
                  started_at, monotonic_start)


def _windows(starts_ns: np.ndarray, latencies_ns: np.ndarray, count: int, span_ns: int) -> list[dict]:
    """The timed run cut into `count` slices of equal time: p50 and p99 of each (LatencyWindow fields)."""
    if len(starts_ns) == 0:
        return []
    span = max(span_ns, 1)
    count = max(1, min(count, len(starts_ns)))
    edges = [span * k // count for k in range(count + 1)]
    index = np.minimum(starts_ns * count // span, count - 1)
    windows = []
    for k in range(count):
        chosen = latencies_ns[index == k] / 1e6
        if len(chosen) == 0:
            continue
        p50, p99 = np.percentile(chosen, [50, 99])
        windows.append({"start_s": edges[k] / 1e9, "end_s": edges[k + 1] / 1e9, "iterations": int(len(chosen)),
                        "p50": float(p50), "p99": float(p99)})
    return windows


def _histogram(latencies_ms: np.ndarray, bins: int) -> dict:
    """Counts over log-spaced bins from the fastest to the slowest run (LatencyHistogram fields)."""
    low, high = float(latencies_ms.min()), float(latencies_ms.max())
    if high <= low * 1.0001:
        return {"edges_ms": [low, high if high > low else low * 1.0001], "counts": [int(len(latencies_ms))]}
    edges = np.geomspace(low, high, bins + 1)
    counts, _ = np.histogram(latencies_ms, bins=edges)
    return {"edges_ms": [float(e) for e in edges], "counts": [int(c) for c in counts]}
