"""Records the release pipeline's stages hand each other: data, models, artifacts, checks, gates, summaries.

Stages hand each other small records and file paths, never large blobs: a record
names where an artifact lives and what it is (hash, size, precision, input spec).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from edgeship.records.base import Record
from edgeship.records.detection import DetectionHead, DetectionOutputs
from edgeship.records.wire import BenchmarkResult, TensorSpec


class PreparedData(Record):
    """The train/val/test/calibration splits written by the `prepare` stage."""

    directory: Path
    classes: list[str]
    input_shape: tuple[int, int, int]  # (channels, height, width)
    counts: dict[str, int]
    dvc_hash: str | None = None  # md5 of the prepared directory from dvc.lock (lineage)
    task: str = "classification"  # what the labels are: class indices, or boxes (edgeship.tasks.kinds)
    annotations_sha256: str | None = None  # detection: the source annotations' hash (lineage)

    def split_path(self, split: str) -> Path:
        return self.directory / f"{split}.npz"


class TrainedModel(Record):
    """A trained float model: its state dict and how to rebuild the module."""

    checkpoint: Path
    factory: str
    factory_kwargs: dict = Field(default_factory=dict)
    num_classes: int
    input_shape: tuple[int, int, int]
    val_accuracy: float  # the task's metric: top-1 accuracy, or mAP@0.5:0.95 for detection (a fraction)
    test_accuracy: float
    task: str = "classification"
    detection: DetectionHead | None = None  # task: detection: how its outputs decode
    metrics: dict[str, float] = Field(default_factory=dict)  # the task's other test metrics (map50, ...)
    mlflow_run_id: str | None = None
    model_uri: str | None = None  # the logged fp32 model in MLflow (models:/...)
    teacher: str | None = None  # what it was distilled from (a factory or an MLflow URI), when it was


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
    # What the target's converter did and checked: route, which weights, op census, a proxy's metrics, ...
    notes: dict = Field(default_factory=dict)
    postprocess: DetectionOutputs | None = None  # a detector: its outputs and the NMS after them, where not in it


class HostCheck(Record):
    """A compiled artifact loaded on its own runtime on this host and evaluated."""

    target: str
    accuracy: float | None  # the task's metric (detection: mAP@0.5:0.95)
    top1_agreement: float | None = None  # vs the fp32 torch model
    max_abs_logit_diff: float | None = None
    metrics: dict[str, float | None] = Field(default_factory=dict)  # the task's others (detection: map50,
    #                                                                  matched_fraction, score_diff)
    runtime: str
    error: str | None = None
    proxy: bool = False  # measured on a stand-in (e.g. torch fake-quant) because the runtime does not run here
    note: str = ""  # what the proxy is, or why the target was not measured here


GateComparator = Literal["<=", ">="]


class GateCheck(Record):
    """One check of a gate: measured value against its limit.

    `passed` says only whether the measurement met the limit (a missing one did not). An `advisory` check
    (int8 against its float sibling, unless params.yaml makes it fail) is reported but never fails the gate:
    it can read `passed: false, advisory: true` in a gate that passed.
    """

    name: str
    measured: float | None
    limit: float
    comparator: GateComparator
    unit: str = ""
    passed: bool
    advisory: bool = False
    reason: str = ""

    @model_validator(mode="before")
    @classmethod
    def _read_before_advisory(cls, data: Any) -> Any:
        """A record written before `advisory` existed said `passed: true` for an advisory check over its limit:
        read it as what it was, a failed advisory check."""
        if not isinstance(data, dict) or "advisory" in data or not data.get("passed"):
            return data
        measured, limit = data.get("measured"), data.get("limit")
        if measured is None or limit is None:
            return data
        met = measured <= limit if data.get("comparator", "<=") == "<=" else measured >= limit
        return data if met else {**data, "passed": False, "advisory": True}

    @property
    def fails_gate(self) -> bool:
        """Whether this check fails its gate: it did not pass and it is not advisory."""
        return not self.passed and not self.advisory


class GateReport(Record):
    """All checks of one target's gate."""

    target: str
    required: bool
    checks: list[GateCheck]

    @property
    def passed(self) -> bool:
        """Every check that can fail the gate passed (advisory ones are reported only); no checks: failed."""
        return bool(self.checks) and not any(c.fails_gate for c in self.checks)


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
    fp32_test_accuracy: float  # the task's metric (detection: mAP@0.5:0.95)
    data_hash: str | None
    targets: list[TargetSummary]
    passed: bool
    aliases: list[str] = Field(default_factory=list)
    task: str = "classification"
    fp32_metrics: dict[str, float] = Field(default_factory=dict)  # the task's other test metrics (map50, ...)
    fp32_field_test_accuracy: float | None = None  # on the field test split (edgeship.tasks.field_data), if any
