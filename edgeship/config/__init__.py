"""params.yaml: the one config file, read by DVC (`params:`) and by the flows.

Every section is a pydantic model that forbids unknown keys, so a typo stops the
run before any work, with a message naming the key and what is allowed. The sections
live by theme (training, quantization, devices, shipping; fleet and rollout in
edgeship.fleet.policy); this module assembles them and reads the file:

    >>> from edgeship.config import load_params
    >>> params = load_params("params.yaml")
    >>> params.train.epochs
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from edgeship.config.devices import BenchmarkParams, DeviceParams, EmulationProfile, GatePolicy, TaskRunnerParams
from edgeship.config.quantization import CompileOptions, PrecisionParams, PtqParams, QatParams, SensitivityParams
from edgeship.config.section import Section
from edgeship.config.task import DetectionParams, TaskName
from edgeship.config.shipping import FallbackParams, OtaParams, RegistryParams
from edgeship.config.training import (DataParams, FieldDataParams, DistillationParams, ModelParams, ProjectParams, PruningParams,
                                      TrainParams)
from edgeship.errors import ConfigError
from edgeship.fleet.policy import FleetParams, RolloutParams
from edgeship.targets import KNOWN_TARGETS

__all__ = [
    "BenchmarkParams", "CompileOptions", "DataParams", "DetectionParams", "TaskName", "DeviceParams", "DistillationParams", "EmulationProfile",
    "FallbackParams", "GatePolicy", "ModelParams", "OtaParams", "Params", "PrecisionParams", "ProjectParams",
    "PruningParams", "PtqParams", "QatParams", "RegistryParams", "Section", "SensitivityParams", "TaskRunnerParams",
    "TrainParams", "load_params", "parse_params",
]


class Params(Section):
    """The whole of params.yaml."""

    project: ProjectParams = ProjectParams()
    task: TaskName = "classification"          # what the model predicts (edgeship.tasks.kinds)
    detection: DetectionParams = DetectionParams()  # task: detection: the outputs' layout and the NMS
    data: DataParams = DataParams()
    field_data: FieldDataParams = FieldDataParams()   # the field split (edgeship.tasks.field_data)
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    qat: QatParams = QatParams()
    sensitivity: SensitivityParams = SensitivityParams()
    precision: PrecisionParams = PrecisionParams()
    distillation: DistillationParams = DistillationParams()
    pruning: PruningParams = PruningParams()
    ptq: PtqParams = PtqParams()
    targets: list[str] = Field(default_factory=lambda: ["onnx-fp32", "onnx-int8"], min_length=1)
    benchmark: BenchmarkParams = BenchmarkParams()
    devices: list[DeviceParams] = Field(default_factory=lambda: [DeviceParams(name="local")])
    gate: dict[str, GatePolicy] = Field(default_factory=dict)
    compile: dict[str, CompileOptions] = Field(default_factory=dict)
    task_runner: TaskRunnerParams = TaskRunnerParams()
    registry: RegistryParams = RegistryParams()
    ota: OtaParams = OtaParams()
    fleet: FleetParams = FleetParams()        # telemetry broker and fleet store (edgeship/fleet/policy.py)
    rollout: RolloutParams = RolloutParams()  # per-channel rollout policy

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, targets: list[str]) -> list[str]:
        unknown = [t for t in targets if t not in KNOWN_TARGETS]
        if unknown:
            raise ValueError(f"unknown target(s) {unknown}; known targets: {sorted(KNOWN_TARGETS)}")
        if len(set(targets)) != len(targets):
            raise ValueError(f"targets are listed twice: {targets}")
        return targets

    @field_validator("devices")
    @classmethod
    def _unique_devices(cls, devices: list[DeviceParams]) -> list[DeviceParams]:
        names = [d.name for d in devices]
        if len(set(names)) != len(names):
            raise ValueError(f"device names must be unique: {names}")
        return devices

    @field_validator("gate")
    @classmethod
    def _gates_name_selected_targets(cls, gate: dict[str, GatePolicy], info: ValidationInfo
                                     ) -> dict[str, GatePolicy]:
        targets = info.data.get("targets") or []
        stray = sorted(set(gate) - set(targets))
        if stray:
            raise ValueError(f"names target(s) {stray} that are not in 'targets' {targets}")
        return gate

    @field_validator("compile")
    @classmethod
    def _compile_options_name_litert_targets(cls, options: dict[str, CompileOptions], info: ValidationInfo
                                             ) -> dict[str, CompileOptions]:
        stray = sorted(t for t in options if not t.startswith("tflite-"))
        if stray:
            raise ValueError(f"compile options are for the LiteRT targets (tflite-*) only; remove {stray}")
        bad_io = sorted(t for t, o in options.items() if o.io and (t != "tflite-int8" or o.route == "litert-torch"))
        if bad_io:
            raise ValueError(f"'io' applies to tflite-int8 on the tf (or auto) route only; remove it from {bad_io}")
        return options

    @model_validator(mode="after")
    def _fits_the_task(self) -> "Params":
        """What a task cannot take yet, and gate limits written for the other task, refused by name."""
        from edgeship.targets import DETECTION_TARGETS

        other = "max_map_drop" if self.task == "classification" else "max_accuracy_drop"
        crossed = sorted(t for t, g in self.gate.items() if other in g.model_fields_set)
        if crossed:
            metric = "top-1 accuracy (max_accuracy_drop)" if self.task == "classification" else \
                "mAP@0.5:0.95 (max_map_drop)"
            raise ValueError(f"gate {crossed} set '{other}', but task '{self.task}' gates on {metric}; rename it")
        if self.task != "detection":
            return self
        unlimited = sorted(t for t, g in self.gate.items()
                           if g.max_map_drop is None and g.p99_latency_ms is None and g.max_size_mb is None)
        if unlimited:
            raise ValueError(f"gate {unlimited} must set at least one of max_map_drop, p99_latency_ms, max_size_mb")
        not_yet = [t for t in self.targets if t not in DETECTION_TARGETS]
        if not_yet:
            raise ValueError(f"task 'detection' builds float targets only for now: {not_yet} are int8, whose "
                             f"detection QAT comes with the PT2E quantization path; list targets from "
                             f"{sorted(DETECTION_TARGETS)}")
        for section, name in ((self.distillation, "distillation"), (self.pruning, "pruning")):
            if section.enabled:
                raise ValueError(f"{name} is for classification for now; set {name}.enabled: false for task "
                                 f"'detection'")
        return self

    def gate_for(self, target: str) -> GatePolicy:
        """The gate policy of a target (the default policy when params.yaml sets none)."""
        return self.gate.get(target, GatePolicy())


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"{source} is not valid:"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  - '{key}': unknown key; remove it or fix its spelling")
        else:
            given = item.get("input")
            shown = "" if isinstance(given, dict) else f" (given: {given!r})"
            lines.append(f"  - '{key}': {item['msg']}{shown}")
    return "\n".join(lines)


def parse_params(raw: dict | None, source: str = "params") -> Params:
    """Validate a mapping as params; raise ConfigError naming each bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a mapping of sections (project, data, train, ...), got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe(error, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found; run from the project root or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    return parse_params(raw, source=str(path))
