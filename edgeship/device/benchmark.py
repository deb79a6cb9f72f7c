"""Benchmark or evaluate one compiled model on this machine, in a child process of its own.

The workflow of one benchmark job:
1. `run_benchmark_job` starts a child process for the job (forked by the warm fork server when one
   runs, else `python -m edgeship.device.benchmark` with the job as JSON on stdin) and, given
   sensors, samples them from this process while the child runs.
2. The child calls `measure`: pin the CPUs the job names, load the model (timed, with the resident
   memory it adds), run it once (timed), warm up (a fixed count, or until the median latency stops
   moving), then time `iterations` runs, or every run for `duration_s` (sustained mode), with the
   garbage collector off and one input prepared before timing starts.
3. The child writes the measurement and the monotonic-clock bounds of its timed run as JSON on
   stdout and exits; its peak RSS is the job's own. The parent adds what the sensors saw in those bounds.
4. A model that crashes the runtime, a runtime error, or a job past its timeout ends only the child;
   the parent raises DeviceJobFailed with the runtime's own words.

    >>> from edgeship.records import BenchmarkRequest
    >>> run_benchmark_job("model.onnx", "onnxruntime", BenchmarkRequest(iterations=100), timeout_s=60)
    {'runtime': 'onnxruntime', 'latency_ms': {'p50': 0.02, ...}, 'peak_rss_mb': 41.2, ...}

`run_evaluation_job` runs a validation batch (an .npz of x and, optionally, y) through the model the
same way and returns its predictions; `run_tensorrt_build_job` builds a TensorRT engine from an ONNX
file (`edgeship.device.tensorrt_build`) the same way, so a builder that crashes ends only its child.
The returned dicts' keys are fields of `edgeship.records.BenchmarkResult`, `EvaluationResult`, and
for a build, `build_engine`'s answer. Every job's `runtime_options` go to the runtime's adapter.
No torch, TensorFlow, MLflow or Prefect here: this runs on the device.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import math
import os
import queue
import resource
import signal
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeship.device.runtimes import available_runtimes, open_session, predict_classes
from edgeship.errors import DeviceJobFailed, EdgeshipError
from edgeship.records import BenchmarkRequest, EvaluationRequest, TensorRTBuildOptions, TensorSpec

_INPUT_SEED = 0
_STDERR_TAIL = 2000  # characters of a crashed child's stderr kept in the error message
_TIMEOUT_HINT = "ask for fewer iterations or a shorter duration, or raise the agent's --job-timeout-s"
_STABLE_TOLERANCE = 0.03  # warm-up is stable when a window's median latency is within 3% of the one before
_STABLE_WINDOW_S = 0.25  # a warm-up window lasts at least this long ...
_STABLE_WINDOW_RUNS = (10, 200)  # ... and holds between this many runs
_MAX_SAMPLES = 1 << 20  # latencies kept in a sustained run; beyond, every other one is dropped (exact stats stay)
_RUNNING: set[subprocess.Popen] = set()  # job processes alive now, so a stopping agent can end them
_RUNNING_LOCK = threading.Lock()


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
    session = open_session(runtime, path, threads=request.threads, **request.runtime_options)
    load_ns = time.perf_counter_ns() - started
    rss_loaded = _rss_bytes()
    options = dict(getattr(session, "options", request.runtime_options))
    if request.runtime_options.get("xnnpack") and options.get("xnnpack") is False:
        notes.append("XNNPACK was asked for but took no node of this model: LiteRT's builtin kernels ran it")

    batch = _random_input(session.inputs[0])
    run = session.run
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
    }
    return Measurement(fields, timed.monotonic_start, timed.monotonic_start + span_ns / 1e9)


def evaluate(path: str | Path, batch_path: str | Path, request: EvaluationRequest, max_batch_bytes: int) -> dict:
    """Run a validation batch through the model; return EvaluationResult fields (predictions, accuracy, ...).

    Raises:
        ModelLoadError: the runtime cannot load the file.
        DeviceJobFailed: the batch is not an .npz of numbers shaped for the model's input.
    """
    pin_cpus(request.cpus)
    images, labels = load_batch(batch_path, max_batch_bytes)
    started = time.perf_counter_ns()
    session = open_session(request.runtime, path, threads=request.threads, **request.runtime_options)
    load_ns = time.perf_counter_ns() - started
    expected = session.inputs[0].shape
    if images.ndim != len(expected) or tuple(images.shape[1:]) != tuple(expected[1:]):
        raise DeviceJobFailed(f"the validation batch's x has shape {images.shape}, the model wants "
                              f"[N, {', '.join(map(str, expected[1:]))}]; send a batch of the model's input shape")
    if not session.dynamic_batch and len(images) % expected[0]:
        raise DeviceJobFailed(f"the model takes batches of exactly {expected[0]}; send a multiple of that "
                              f"many samples (got {len(images)})")
    predictions = predict_classes(session, images, batch_size=request.batch_size)
    accuracy = float(np.mean(predictions == labels)) if labels is not None and len(labels) else None
    return {"runtime": request.runtime, "samples": len(images), "predictions": [int(p) for p in predictions],
            "accuracy": accuracy, "load_ms": load_ns / 1e6}


def load_batch(path: str | Path, max_bytes: int) -> tuple[np.ndarray, np.ndarray | None]:
    """x (and y, when present) of a validation .npz, refusing pickles and archives that inflate past `max_bytes`."""
    try:
        with zipfile.ZipFile(path) as archive:
            inflated = sum(member.file_size for member in archive.infolist())
    except (zipfile.BadZipFile, OSError) as error:
        raise DeviceJobFailed(f"the validation batch is not an .npz archive ({error}); send numpy.savez output "
                              "with arrays x and y") from None
    if inflated > max_bytes:
        raise DeviceJobFailed(f"the validation batch inflates to {inflated} bytes, more than this agent accepts "
                              f"({max_bytes}); send fewer samples")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if "x" not in arrays.files:
                raise DeviceJobFailed(f"the validation batch has no array 'x' (it has {arrays.files})")
            images = arrays["x"]
            labels = arrays["y"] if "y" in arrays.files else None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        raise DeviceJobFailed(f"the validation batch cannot be read as plain arrays: {error}") from None
    if images.dtype.kind not in "fiu" or images.ndim < 2 or len(images) == 0:
        raise DeviceJobFailed(f"the validation batch's x must be a non-empty numeric array of samples, got "
                              f"{images.dtype} {images.shape}")
    if labels is not None and (labels.dtype.kind not in "iu" or labels.shape != (len(images),)):
        raise DeviceJobFailed(f"the validation batch's y must be one integer label per sample, got "
                              f"{labels.dtype} {labels.shape}")
    return images, labels


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


# --- the parent side ---------------------------------------------------------------------------------


def run_benchmark_job(path: str | Path, runtime: str, request: BenchmarkRequest, timeout_s: float,
                      sensors: Sequence | None = None) -> dict:
    """Measure a model in a fresh child process and return BenchmarkResult fields.

    Given `sensors` (from `edgeship.device.sensors.discover_sensors`) and a request that wants
    them, they are sampled from this process while the child runs and summarised over its timed run.
    The child is killed (with anything it started) when it runs past `timeout_s`.

    Raises:
        DeviceJobFailed: the runtime could not load or run the model, the child crashed,
            or the job ran past its timeout.
    """
    job = {"kind": "benchmark", "path": str(Path(path).resolve()), "runtime": runtime,
           "request": request.model_dump()}
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
                       max_batch_bytes: int) -> dict:
    """Run a validation batch through a model in a fresh child process; return EvaluationResult fields.

    Raises:
        DeviceJobFailed: the batch or the model is unusable, the child crashed, or it ran past `timeout_s`.
    """
    job = {"kind": "evaluate", "path": str(Path(path).resolve()), "batch": str(Path(batch_path).resolve()),
           "request": request.model_dump(), "max_batch_bytes": max_batch_bytes}
    return _run_child(job, timeout_s, f"evaluation of {Path(path).name}")["result"]


def run_tensorrt_build_job(onnx_path: str | Path, engine_path: str | Path, options: TensorRTBuildOptions,
                           timeout_s: float) -> dict:
    """Build a TensorRT engine from an ONNX file in a fresh child process; return `build_engine`'s answer.

    Raises:
        DeviceJobFailed: TensorRT is missing, rejects the model or fails to build (its own words),
            the builder crashed, or it ran past `timeout_s`.
    """
    job = {"kind": "tensorrt-build", "path": str(Path(onnx_path).resolve()),
           "engine": str(Path(engine_path).resolve()), "options": options.model_dump()}
    return _run_child(job, timeout_s, f"TensorRT engine build of {Path(onnx_path).name}",
                      hint="raise the agent's --job-timeout-s (a first build on a Jetson takes minutes)")["result"]


def _run_child(job: dict, timeout_s: float, what: str, hint: str = _TIMEOUT_HINT) -> dict:
    server = _fork_server
    if server is not None:
        try:
            return server.run(job, timeout_s, what, hint)
        except _ForkServerUnavailable:
            pass  # busy with another caller's job, or gone: a fresh process instead
    process = subprocess.Popen(
        [sys.executable, "-m", "edgeship.device.benchmark"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=_child_env(), start_new_session=True,  # own process group: a timeout kills all of it
    )
    with _RUNNING_LOCK:
        _RUNNING.add(process)
    try:
        stdout, stderr = process.communicate(json.dumps(job).encode(), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        process.communicate()
        raise DeviceJobFailed(f"{what} ran past its {timeout_s:g} s timeout and was stopped; {hint}") from None
    finally:
        if process.poll() is None:  # interrupted while waiting: leave nothing running
            _kill_group(process)
            process.wait()
        with _RUNNING_LOCK:
            _RUNNING.discard(process)
    return _read_answer(process.returncode, stdout, stderr)


def stop_running_jobs() -> int:
    """Kill every job process still running (an agent that is shutting down); return how many."""
    with _RUNNING_LOCK:
        running = [p for p in _RUNNING if p.poll() is None]
    for process in running:
        _kill_group(process)
    server = _fork_server
    return len(running) + (server.kill_current() if server is not None else 0)


# --- the fork server ---------------------------------------------------------------------------------


class _ForkServerUnavailable(Exception):
    pass


class ForkServer:
    """A warm helper process that has imported numpy and the runtimes and forks one fresh child per job.

    Starting Python and importing numpy and a runtime takes about 0.5 s on an x86 host and seconds on a
    Raspberry Pi; a forked child starts in milliseconds, each time from the same pristine state (the
    helper never loads a model, so no runtime thread pool exists when it forks). Each child runs in a
    session of its own, like a spawned one, so a timeout kills it and anything it started.
    One job at a time: a second caller gets a fresh process instead. Linux only.
    """

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._messages: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._current: int | None = None

    def start(self) -> None:
        """Start the helper (and have it import what children need)."""
        self._messages = queue.Queue()
        self._process = subprocess.Popen([sys.executable, "-m", "edgeship.device.benchmark", "--fork-server"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         env=_child_env(), text=True, bufsize=1)
        threading.Thread(target=self._read, args=(self._process, self._messages), daemon=True,
                         name="edgeship-fork-server").start()

    def stop(self) -> None:
        """End the helper: closing its stdin ends its loop."""
        process, self._process = self._process, None
        if process is None:
            return
        self.kill_current()
        with contextlib.suppress(OSError):
            process.stdin.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill_current(self) -> int:
        """Kill the job being run now, if any; return how many were killed."""
        pid = self._current
        if pid is None:
            return 0
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        return 1

    def run(self, job: dict, timeout_s: float, what: str, hint: str = _TIMEOUT_HINT) -> dict:
        """Run one job in a forked child; what `_run_child` returns or raises.

        Raises:
            DeviceJobFailed: as for a spawned child.
            _ForkServerUnavailable: busy, or the helper is gone (it is restarted for the next job).
        """
        if not self._lock.acquire(blocking=False):
            raise _ForkServerUnavailable
        try:
            if self._process is None or self._process.poll() is not None:
                self.start()
            scratch = Path(tempfile.mkdtemp(prefix="edgeship-fork-"))  # mode 0700
            try:
                return self._run(job, timeout_s, what, scratch, hint)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        finally:
            self._current = None
            self._lock.release()

    def _run(self, job: dict, timeout_s: float, what: str, scratch: Path, hint: str) -> dict:
        answer, stderr = scratch / "answer.json", scratch / "stderr.txt"
        try:
            self._process.stdin.write(json.dumps({"job": job, "answer": str(answer), "stderr": str(stderr)}) + "\n")
            self._process.stdin.flush()
        except OSError:
            self._abandon()
            raise _ForkServerUnavailable from None
        try:
            started = self._next(lambda m: "returncode" not in m, 10.0)
        except queue.Empty:
            started = None
        if not started:
            self._abandon()
            raise _ForkServerUnavailable
        pid = self._current = started["pid"]
        is_exit = lambda m: m.get("pid") == pid and "returncode" in m  # noqa: E731
        try:
            finished = self._next(is_exit, timeout_s)
        except queue.Empty:
            self.kill_current()
            with contextlib.suppress(queue.Empty):
                self._next(is_exit, 10.0)
            raise DeviceJobFailed(f"{what} ran past its {timeout_s:g} s timeout and was stopped; {hint}") from None
        if not finished:  # the helper died under the job
            self.kill_current()
            self._abandon()
            raise DeviceJobFailed(f"{what} lost its fork server mid-job; send the job again")
        return _read_answer(finished["returncode"], answer.read_bytes() if answer.exists() else b"",
                            stderr.read_bytes() if stderr.exists() else b"")

    def _next(self, wanted, timeout_s: float) -> dict | None:
        """The next message `wanted` accepts (stale ones from a timed-out job are skipped); None: the helper died."""
        deadline = time.monotonic() + timeout_s
        while True:
            message = self._messages.get(timeout=max(0.0, deadline - time.monotonic()))
            if message is None or wanted(message):
                return message

    def _abandon(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    @staticmethod
    def _read(process: subprocess.Popen, messages: queue.Queue) -> None:
        for line in process.stdout:
            with contextlib.suppress(ValueError):
                messages.put(json.loads(line))
        messages.put(None)


_fork_server: ForkServer | None = None


def start_fork_server() -> bool:
    """Run later jobs of this process in children forked from a warm helper (Linux); False where it cannot."""
    global _fork_server
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return False  # macOS: forking after importing system frameworks is unsafe
    if _fork_server is None:
        server = ForkServer()
        server.start()
        _fork_server = server
    return True


def stop_fork_server() -> None:
    """Stop the helper; later jobs spawn fresh processes."""
    global _fork_server
    server, _fork_server = _fork_server, None
    if server is not None:
        server.stop()


def _serve_forks() -> int:
    """Helper side: import what a job needs, then fork one child per job line on stdin until EOF."""
    for name in ("onnxruntime", "psutil"):  # what every job imports; never create a session here
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    reply = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.setsid()  # a session of its own: a timeout kills it with all it started
                with open(request["stderr"], "wb") as log, open(os.devnull, "rb") as nothing:
                    os.dup2(nothing.fileno(), 0)
                    os.dup2(log.fileno(), 1)  # never the protocol pipe
                    os.dup2(log.fileno(), 2)
                answer, status = _answer(request["job"])
                with open(request["answer"], "w") as out:
                    json.dump(answer, out)
            finally:
                os._exit(status)
        reply.write(json.dumps({"pid": pid}) + "\n")
        reply.flush()
        _, raw = os.waitpid(pid, 0)
        code = -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)
        reply.write(json.dumps({"pid": pid, "returncode": code}) + "\n")
        reply.flush()
    return 0


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
    """Turn the child's exit status and JSON answer into its answer or a DeviceJobFailed."""
    try:
        answer = json.loads(stdout.decode() or "null")
    except ValueError:
        answer = None
    if isinstance(answer, dict):
        if returncode == 0 and isinstance(answer.get("result"), dict):
            return answer
        if answer.get("error"):
            raise DeviceJobFailed(str(answer["error"]))
    tail = stderr.decode(errors="replace")[-_STDERR_TAIL:].strip()
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        raise DeviceJobFailed(
            f"the job's process was killed by {name}: the runtime (or builder) crashed on this model "
            f"(or ran out of memory); check the model with the runtime on a host first. stderr: {tail or '(empty)'}"
        )
    raise DeviceJobFailed(f"the job's process exited with status {returncode} without a result. "
                          f"stderr: {tail or '(empty)'}")


def _main() -> int:
    """Child side: read one job as JSON on stdin, write {"result": ...} or {"error": ...} on stdout."""
    if sys.argv[1:] == ["--fork-server"]:
        return _serve_forks()
    answer_stream = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    # Whatever else writes to stdout (runtime logs, a model's custom op) goes to stderr,
    # so it cannot corrupt the answer.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        job = json.load(sys.stdin)
    except ValueError as error:
        answer, status = {"error": f"the job is not JSON: {error}"}, 1
    else:
        answer, status = _answer(job)
    with answer_stream:
        json.dump(answer, answer_stream)
    return status


def _answer(job: dict) -> tuple[dict, int]:
    """Run one job; return ({"result": ...} or {"error": ...}, exit status)."""
    runtime = "the runtime"
    try:
        if job.get("kind") == "evaluate":
            request = EvaluationRequest.model_validate(job["request"])
            runtime = request.runtime
            answer = {"result": evaluate(job["path"], job["batch"], request, int(job["max_batch_bytes"]))}
        elif job.get("kind") == "tensorrt-build":
            from edgeship.device.tensorrt_build import build_engine

            runtime = "the TensorRT builder"
            options = TensorRTBuildOptions.model_validate(job["options"])
            answer = {"result": build_engine(job["path"], job["engine"], options.precision,
                                             workspace_mb=options.workspace_mb,
                                             optimization_level=options.optimization_level,
                                             sparse_weights=options.sparse_weights,
                                             use_timing_cache=options.timing_cache)}
        else:
            runtime = job["runtime"]
            measured = measure(job["path"], runtime, BenchmarkRequest.model_validate(job["request"]))
            answer = {"result": measured.fields, "window": [measured.timed_start, measured.timed_end]}
        return answer, 0
    except EdgeshipError as error:
        return {"error": str(error)}, 1
    except Exception as error:  # a runtime's own exception type while running the model
        return {"error": f"{runtime} failed on this model: {type(error).__name__}: {error}"}, 1


if __name__ == "__main__":
    sys.exit(_main())
