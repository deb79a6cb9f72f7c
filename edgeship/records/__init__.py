"""Typed records passed between stages and over the wire to devices; pydantic only, so the device side uses them.

- `wire`: what crosses the network between pipeline and device agent (requests, measurements, `/info`);
- `pipeline`: what the release's stages hand each other (data, models, artifacts, gates, summaries);
- `quantization`: the quantized model, per-layer sensitivity, the precision plan;
- `pruning`: the pruning search's candidates and its choice;
- `detection`: how a detector's outputs decode, and what a compiled detector's file outputs;
- `telemetry`: what a device publishes each window over MQTT, and the fleet side reads.

Import from here (`from edgeship.records import BenchmarkResult`); the submodules say where a record belongs.
"""

from edgeship.records.base import Record, WireRecord
from edgeship.records.pipeline import (CompiledArtifact, CompileOutcome, GateCheck, GateComparator, GateReport, HostCheck,
                                       PreparedData, ReleaseSummary, TargetSummary, TrainedModel)
from edgeship.records.detection import DetectionFormat, DetectionHead, DetectionOutputs, NmsSettings
from edgeship.records.pruning import PruningCandidate, PruningReport
from edgeship.records.quantization import (LayerSensitivity, PlanCandidate, PrecisionPlan, QuantizedModel,
                                           SensitivityReport)
from edgeship.records.wire import (BenchmarkRequest, BenchmarkResult, ChannelStats, DeviceInfo, EvaluationRequest,
                                   EvaluationResult, LatencyHistogram, LatencyStats, LatencyWindow, MIN_AGENT_PROTOCOL,
                                   PROTOCOL, RuntimeOption,
                                   SensorInfo, SensorReport, TensorRTBuild, TensorRTBuildOptions, TensorSpec,
                                   UpdateReport, UpdateStatus)

__all__ = [
    "MIN_AGENT_PROTOCOL", "PROTOCOL", "WireRecord", "DetectionFormat", "DetectionHead", "DetectionOutputs",
    "NmsSettings", "BenchmarkRequest", "BenchmarkResult", "ChannelStats", "CompileOutcome", "CompiledArtifact", "DeviceInfo",
    "EvaluationRequest", "EvaluationResult", "GateCheck", "GateComparator", "GateReport", "HostCheck",
    "LatencyHistogram", "LatencyStats", "LatencyWindow", "LayerSensitivity", "PlanCandidate", "PrecisionPlan",
    "PreparedData", "PruningCandidate", "PruningReport", "QuantizedModel", "Record", "ReleaseSummary", "RuntimeOption", "SensitivityReport",
    "SensorInfo", "SensorReport", "TargetSummary", "TensorRTBuild", "TensorRTBuildOptions", "TensorSpec",
    "TrainedModel", "UpdateReport", "UpdateStatus",
]
