"""The device wire protocol: what the pipeline and a device agent send each other over HTTP.

A benchmark or evaluate job's request, what the device measured (latency, sensors,
TensorRT builds), and what the agent says about itself (`GET /info`). Both sides of the
wire import these, the device side included, so this module imports pydantic only.

Version skew: every record here ignores fields it does not know and defaults the optional
ones it is not sent (`WireRecord`), so a field added on one side breaks no older peer. A
change an older peer cannot read bumps `PROTOCOL`; `/info` states the agent's
(`DeviceInfo.protocol`), and the pipeline's client refuses an agent outside
[`MIN_AGENT_PROTOCOL`, `PROTOCOL`] with AgentProtocolMismatch, naming the side to upgrade.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from edgeship.records.base import Record, WireRecord
from edgeship.records.detection import DetectionOutputs

PROTOCOL = 1  # the wire protocol this release speaks (agent and pipeline alike)
MIN_AGENT_PROTOCOL = 1  # the oldest agent protocol this pipeline can use


class TensorSpec(WireRecord):
    """Name, shape and dtype of one model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


class LatencyStats(WireRecord):
    """Latency percentiles in milliseconds."""

    p50: float
    p90: float
    p95: float
    p99: float
    max: float
    mean: float
    std: float = 0.0
    p999: float | None = None  # p99.9: with fewer than 1,000 samples it is close to the max
    min: float | None = None


class LatencyHistogram(WireRecord):
    """Every timed latency, binned on the device (log-spaced bins), so the pipeline can draw it."""

    edges_ms: list[float]  # len(counts) + 1 edges, ascending
    counts: list[int]


class LatencyWindow(WireRecord):
    """One slice of a timed run, in order: how latency moved over the run (thermal drift)."""

    start_s: float  # since the timed run began
    end_s: float
    iterations: int
    p50: float  # ms
    p99: float  # ms


class SensorInfo(WireRecord):
    """One sensor plug-in on a device: what it reads, or why it is absent."""

    name: str  # thermal, cpufreq, rapl, ina3221, rpi-pmic, rpi-throttle, tegrastats, ...
    kind: Literal["temperature", "clock", "throttle", "power"]
    available: bool
    detail: str = ""  # where it reads from, or why it is absent or unreadable
    channels: list[str] = Field(default_factory=list)  # "<sensor>/<channel>" keys it reports


class ChannelStats(WireRecord):
    """One sensor channel over a timed run."""

    unit: str  # C, MHz, W, flag, count, state
    min: float
    mean: float
    max: float
    first: float
    last: float


class SensorReport(WireRecord):
    """What the device's sensors saw while a benchmark ran."""

    interval_s: float
    samples: int  # readings taken during the whole job (load and warm-up included)
    sensors: list[SensorInfo] = Field(default_factory=list)  # available and absent alike
    channels: dict[str, ChannelStats] = Field(default_factory=dict)  # over the timed run only
    timeline_s: list[float] = Field(default_factory=list)  # sample times, seconds since the timed run began
    timeline: dict[str, list[float | None]] = Field(default_factory=dict)  # channel -> value at each time
    power_source: str | None = None  # the channel the power figures come from
    power_w: float | None = None  # mean over the timed run
    energy_j: float | None = None  # over the timed run
    energy_per_inference_mj: float | None = None
    throttled: bool | None = None  # None: this device exposes no throttling sensor
    throttle_detail: str = ""
    problems: list[str] = Field(default_factory=list)  # sensors that failed while sampling (and were dropped)


RuntimeOption = bool | int | float | str  # one value of a runtime adapter's keyword option


class TensorRTBuildOptions(Record):
    """How a device builds a TensorRT engine from an ONNX file (the `options` of `POST /jobs/tensorrt-build`).

    Strict on purpose, unlike the other wire records: the options are the engine's cache key, and a
    misspelled option silently ignored would build (and cache) a different engine than was asked for.
    """

    precision: Literal["fp16", "int8", "fp32"] = "fp16"  # int8: explicit, from the ONNX's Q/DQ nodes (FP16 too)
    workspace_mb: int = Field(default=1024, ge=16, le=1 << 20)  # the builder's scratch memory limit
    optimization_level: int | None = Field(default=None, ge=0, le=5)  # TensorRT's builder level; None: its default (3)
    sparse_weights: bool = False  # let the builder pick 2:4 structured-sparse kernels (Ampere and later)
    timing_cache: bool = True  # reuse and extend this device's kernel timing cache


class TensorRTBuild(WireRecord):
    """An engine a device built (or had built before) from an ONNX file: what `POST /jobs/tensorrt-build` answers.

    The engine stays in the agent's engine cache: a benchmark or evaluate job names it by
    `engine_sha256`, and `GET /engines/{engine_sha256}` returns its bytes to store as an artifact.
    """

    target: str
    device: str
    onnx_sha256: str  # the ONNX it was built from
    engine_sha256: str
    engine_bytes: int
    precision: str
    tensorrt_version: str
    gpu: str  # the GPU (nvidia-smi) or Jetson model it was built on and is tied to
    build_s: float  # the builder's time (of the original build, for a cached engine)
    options: TensorRTBuildOptions
    cached: bool = False  # found in the agent's engine cache, not built by this request
    log_tail: list[str] = Field(default_factory=list)  # the builder's last log lines ("[W] ...")
    emulated: bool = False


class BenchmarkRequest(WireRecord):
    """What a benchmark job asks a device to do."""

    runtime: str = "onnxruntime"
    warmup: int = Field(default=20, ge=0)  # warm-up runs; with warmup_until_stable, the fewest
    warmup_until_stable: bool = False  # go on warming up until the median latency stops moving
    warmup_max: int = Field(default=1000, ge=0)  # most warm-up runs when warming up until stable
    warmup_max_s: float = Field(default=30, gt=0)  # most warm-up time when warming up until stable
    iterations: int = Field(default=200, ge=1)  # timed runs (when duration_s is not set)
    duration_s: float | None = Field(default=None, gt=0)  # sustained mode: time for this long instead
    windows: int = Field(default=10, ge=1, le=1000)  # slices of the timed run for drift and the timeline
    threads: int = Field(default=1, ge=0)  # 0: the runtime's default
    cpus: list[int] | None = None  # CPU affinity of the benchmark process; None: as the agent runs
    sensors: bool = True  # sample the device's sensors during the job
    sensor_interval_s: float = Field(default=1.0, ge=0.05, le=60)
    histogram_bins: int = Field(default=40, ge=1, le=1000)
    # Keyword options of the runtime's adapter (litert: xnnpack; coreml: compute_units); the agent
    # refuses one the adapter does not take (edgeship.device.runtimes.RUNTIME_OPTIONS).
    runtime_options: dict[str, RuntimeOption] = Field(default_factory=dict)
    postprocess: DetectionOutputs | None = None  # a detector: its NMS, where not in the graph, is timed with it


class EvaluationRequest(WireRecord):
    """What an evaluate job asks: the runtime and how to run the validation batch through it."""

    runtime: str = "onnxruntime"
    threads: int = Field(default=0, ge=0)
    cpus: list[int] | None = None
    batch_size: int = Field(default=64, ge=1)
    runtime_options: dict[str, RuntimeOption] = Field(default_factory=dict)  # as BenchmarkRequest's
    postprocess: DetectionOutputs | None = None  # a detector: answer detections (edgeship.device.detections)


class EvaluationResult(WireRecord):
    """A device's predictions on a validation batch the pipeline sent (`POST /jobs/evaluate`)."""

    target: str
    device: str
    runtime: str
    sha256: str
    batch_sha256: str
    samples: int
    predictions: list[int] = Field(default_factory=list)  # top-1 class per sample, in the batch's order
    # A detector: per sample its rows [x1, y1, x2, y2, score, class] in input pixels (the pipeline scores them)
    detections: list[list[list[float]]] | None = None
    accuracy: float | None = None  # against the batch's labels, when it carried them
    load_ms: float | None = None
    emulated: bool = False


class BenchmarkResult(WireRecord):
    """What a device measured for one artifact (or why it could not)."""

    target: str
    device: str
    runtime: str
    sha256: str
    status: Literal["ok", "failed", "not_measured"] = "ok"
    error: str | None = None
    warmup: int = 0
    iterations: int = 0
    threads: int = 0
    latency_ms: LatencyStats | None = None
    throughput_ips: float | None = None  # inferences per second
    load_ms: float | None = None
    first_inference_ms: float | None = None
    peak_rss_mb: float | None = None
    accuracy: float | None = None  # on the device's own runtime, when the flow sent a validation batch
    metrics: dict[str, float] = Field(default_factory=dict)  # the task's other metrics there (detection: map50)
    emulated: bool = False
    mode: Literal["iterations", "duration"] = "iterations"  # duration: a sustained run of duration_s
    duration_s: float | None = None  # how long the timed run took
    cpus: list[int] | None = None  # the CPU affinity the job ran with (None: the OS cannot say)
    warmup_stable: bool | None = None  # warm-up reached a stable latency (None: a fixed count was asked)
    load_rss_delta_mb: float | None = None  # resident memory the model added by loading
    histogram: LatencyHistogram | None = None
    windows: list[LatencyWindow] = Field(default_factory=list)
    drift_ratio: float | None = None  # sustained runs: last window's p50 over the first's (> 1: slowed down)
    sensors: SensorReport | None = None
    accuracy_samples: int | None = None  # size of the validation batch behind `accuracy`
    runtime_version: str | None = None
    started_at: float | None = None  # unix time the timed run began
    finished_at: float | None = None
    attempts: int = 1  # requests it took, retries included
    substitute_for: str | None = None  # measured here in place of this lost device (same tags)
    notes: list[str] = Field(default_factory=list)  # what a reader should know (warm-up not stable, ...)
    runtime_options: dict[str, RuntimeOption] = Field(default_factory=dict)  # the adapter's options in effect
    io_conversion_ms: float | None = None  # integer-I/O models: numpy quantize/dequantize per run, not in latency_ms
    engine_sha256: str | None = None  # tensorrt: the engine the device built from `sha256` (the ONNX) and measured
    build: TensorRTBuild | None = None  # tensorrt: the device's build record (flags, versions, log tail)
    engine_path: str | None = None  # tensorrt: where the pipeline stored the engine it fetched from the device


class DeviceInfo(WireRecord):
    """What a device agent reports about itself (`GET /info`)."""

    name: str  # the agent's --name: how the inventory in params.yaml calls this device
    hostname: str
    os: str  # platform.system(): Linux, Darwin, Windows
    platform: str  # platform.platform(): kernel and libc in one line
    machine: str  # CPU architecture: x86_64, aarch64, arm64
    cpu_model: str
    cpu_count: int
    memory_total_mb: float
    runtimes: dict[str, str] = Field(default_factory=dict)  # runtime name -> version
    python_version: str
    agent_version: str
    max_upload_mb: int | None = None  # largest artifact the agent accepts
    emulated: bool = False  # the agent stands in for the device (QEMU, container, host)
    cpus: list[int] | None = None  # CPUs the agent's jobs may run on (an emulated profile pins them)
    threads: int | None = None  # thread count the agent imposes on every job (an emulated profile)
    sensors: list[SensorInfo] = Field(default_factory=list)  # available and absent sensor plug-ins
    tls: bool = False  # the agent serves HTTPS
    protocol: int = 1  # the wire protocol the agent speaks (absent: an agent from before it said, protocol 1)


UpdateStatus = Literal["updated", "up_to_date", "refused", "not_in_cohort", "rolled_back", "stale", "error"]


class UpdateReport(WireRecord):
    """What one OTA check on a device did (`edgeship-device update` prints it as JSON)."""

    status: UpdateStatus
    installed_version: str | None = None  # running after this check
    previous_version: str | None = None  # the last-known-good kept for rollback
    model_path: Path | None = None
    reason: str = ""
    channel: str | None = None
    target: str | None = None
    offered_version: str | None = None  # what the channel's signed descriptor offers this device
    fallback_version: str | None = None  # the fallback model kept installed
    on_probation: bool = False  # the installed model still has to be confirmed (edgeship.device.probation)
    device_id: str | None = None
