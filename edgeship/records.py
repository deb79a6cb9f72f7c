"""Typed records passed between stages.

Stages hand each other small records and file paths, never large blobs: a record
names where an artifact lives and what it is (hash, size, precision, input spec).
This module imports pydantic only, so the device side can use it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Record(BaseModel):
    """Base for records: immutable, and strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class TensorSpec(Record):
    """Name, shape and dtype of one model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


class PreparedData(Record):
    """The train/val/test/calibration splits written by the `prepare` stage."""

    directory: Path
    classes: list[str]
    input_shape: tuple[int, int, int]  # (channels, height, width)
    counts: dict[str, int]
    dvc_hash: str | None = None  # md5 of the prepared directory from dvc.lock (lineage)

    def split_path(self, split: str) -> Path:
        return self.directory / f"{split}.npz"


class TrainedModel(Record):
    """A trained float model: its state dict and how to rebuild the module."""

    checkpoint: Path
    factory: str
    factory_kwargs: dict = Field(default_factory=dict)
    num_classes: int
    input_shape: tuple[int, int, int]
    val_accuracy: float
    test_accuracy: float
    mlflow_run_id: str | None = None
    model_uri: str | None = None  # the logged fp32 model in MLflow (models:/...)


class QuantizedModel(Record):
    """A quantization-aware-trained model, converted and exported as QDQ ONNX."""

    onnx_path: Path
    val_accuracy: float  # of the converted torch model
    test_accuracy: float
    plan: dict[str, str] = Field(default_factory=dict)  # layer name -> precision
    float_layers: list[str] = Field(default_factory=list)
    integer_ops: dict[str, int] = Field(default_factory=dict)  # op type -> count in ONNX Runtime's optimized graph


class CompiledArtifact(Record):
    """One compiled model for one target."""

    target: str
    path: Path
    sha256: str
    bytes: int
    precision: str  # fp32, fp16, int8, mixed
    runtime: str  # onnxruntime, litert, coreml, tensorrt
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    converter: dict[str, str] = Field(default_factory=dict)  # tool -> version


class HostCheck(Record):
    """A compiled artifact loaded on its own runtime on this host and evaluated."""

    target: str
    accuracy: float | None
    top1_agreement: float | None = None  # vs the fp32 torch model
    max_abs_logit_diff: float | None = None
    runtime: str
    error: str | None = None


class LatencyStats(Record):
    """Latency percentiles in milliseconds."""

    p50: float
    p90: float
    p95: float
    p99: float
    max: float
    mean: float
    std: float = 0.0


class BenchmarkRequest(Record):
    """What a benchmark job asks a device to do."""

    runtime: str = "onnxruntime"
    warmup: int = Field(default=20, ge=0)
    iterations: int = Field(default=200, ge=1)
    threads: int = Field(default=1, ge=0)  # 0: the runtime's default


class BenchmarkResult(Record):
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
    emulated: bool = False


GateComparator = Literal["<=", ">="]


class GateCheck(Record):
    """One check of a gate: measured value against its limit."""

    name: str
    measured: float | None
    limit: float
    comparator: GateComparator
    unit: str = ""
    passed: bool
    reason: str = ""


class GateReport(Record):
    """All checks of one target's gate."""

    target: str
    required: bool
    checks: list[GateCheck]

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)


class CompileOutcome(Record):
    """A target's compile step: the artifact, or the converter's error (one target failing stops no other)."""

    target: str
    artifact: CompiledArtifact | None = None
    error: str | None = None


class TargetSummary(Record):
    """Everything a release knows about one target."""

    target: str
    artifact: CompiledArtifact | None
    host_check: HostCheck | None
    benchmarks: list[BenchmarkResult]
    gate: GateReport
    error: str | None = None


class ReleaseSummary(Record):
    """The machine-readable result of one release run (`edgeship run --summary`)."""

    model_name: str
    model_version: str | None
    run_id: str | None
    fp32_test_accuracy: float
    data_hash: str | None
    targets: list[TargetSummary]
    passed: bool
    aliases: list[str] = Field(default_factory=list)


class DeviceInfo(Record):
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


UpdateStatus = Literal["updated", "up_to_date", "refused", "not_in_cohort", "error"]


class UpdateReport(Record):
    """What one OTA check on a device did (`edgeship-device update` prints it as JSON)."""

    status: UpdateStatus
    installed_version: str | None = None  # running after this check
    previous_version: str | None = None  # the last-known-good kept for rollback
    model_path: Path | None = None
    reason: str = ""
    channel: str | None = None
    target: str | None = None
    offered_version: str | None = None  # what the channel's signed descriptor offers this device
