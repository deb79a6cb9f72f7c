"""Records of the quantization stages: the quantized model, per-layer sensitivity, the precision plan."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from edgeship.records.base import Record


class QuantizedModel(Record):
    """A quantized model exported as QDQ ONNX: quantization-aware trained (method "qat"), or the
    post-training-quantization baseline (method "ptq", ONNX Runtime's static quantization)."""

    onnx_path: Path
    val_accuracy: float  # of the converted torch model (qat), of ONNX Runtime (ptq)
    test_accuracy: float
    plan: dict[str, str] = Field(default_factory=dict)  # layer name -> precision
    float_layers: list[str] = Field(default_factory=list)
    integer_ops: dict[str, int] = Field(default_factory=dict)  # op type -> count in ONNX Runtime's optimized graph
    float_ops: dict[str, int] = Field(default_factory=dict)  # Conv/Gemm/... still computing in float there
    layer_precisions: dict[str, str] = Field(default_factory=dict)  # every quantizable layer -> int8/float, as built
    onnx_val_accuracy: float | None = None  # of the exported ONNX model on ONNX Runtime
    onnx_test_accuracy: float | None = None
    epochs_run: int | None = None  # QAT epochs before early stop
    qat_float_checkpoint: Path | None = None  # fine-tuned weights as a state dict of the float model
    method: Literal["qat", "ptq"] = "qat"


class LayerSensitivity(Record):
    """How much one layer suffers from int8, and what it costs in float."""

    layer: str  # as the user's model names it (features.3.conv.1)
    kind: str  # conv, depthwise, linear
    rank: int  # 1: the most sensitive
    accuracy_drop: float  # val accuracy points lost with only this layer int8
    sqnr_db: float  # of the logits with only this layer int8, against fp32 (higher: less error)
    kl: float  # mean KL(fp32 || quantized) of the softmax outputs, only this layer int8
    converse_accuracy_gain: float | None = None  # points recovered by keeping only this layer float
    converse_sqnr_gain_db: float | None = None
    int8_ms: float | None = None  # this layer's nodes on ONNX Runtime, all-int8 model (profiled)
    float_ms: float | None = None  # this layer's nodes on ONNX Runtime, fp32 model (profiled)
    revert_cost_ms: float | None = None  # latency added by keeping only this layer float in the int8 model


class SensitivityReport(Record):
    """The per-layer sensitivity analysis of one trained model."""

    fp32_val_accuracy: float
    int8_val_accuracy: float  # every layer int8 (fake-quant simulation, calibrated on the calibration split)
    int8_sqnr_db: float
    samples: int  # validation images each evaluation used
    layers: list[LayerSensitivity]  # in model order
    int8_latency_ms: float | None = None  # all-int8 model on ONNX Runtime (sum of per-node medians, 1 thread)
    fp32_latency_ms: float | None = None
    runtime: str = "onnxruntime"
    int8_onnx: Path | None = None  # the all-int8 QDQ model the costs were measured on (the plan measures on it too)

    def ranking(self) -> list[str]:
        """Layer names, the most sensitive first."""
        return [s.layer for s in sorted(self.layers, key=lambda s: s.rank)]


class PlanCandidate(Record):
    """One plan the search evaluated: its float layers, predicted accuracy and latency."""

    step: int
    strategy: str
    float_layers: list[str]
    reverted: str | None = None  # the layer this step turned float
    val_accuracy: float
    sqnr_db: float
    predicted_latency_ms: float | None = None
    measured_latency_ms: float | None = None
    meets_budget: bool = False


class PrecisionPlan(Record):
    """A mixed-precision plan: each layer's precision, with the accuracy and latency it is predicted to have."""

    layers: dict[str, Literal["int8", "float"]]  # every quantizable layer
    fp32_val_accuracy: float
    allowed_drop: float  # accuracy fraction (0.005: half a point)
    predicted_val_accuracy: float  # fake-quant simulation before QAT (QAT usually recovers more)
    predicted_latency_ms: float | None = None
    measured_latency_ms: float | None = None  # the plan's QDQ model on ONNX Runtime
    int8_latency_ms: float | None = None
    fp32_latency_ms: float | None = None
    meets_budget: bool
    strategy: str
    pinned: dict[str, str] = Field(default_factory=dict)
    candidates: list[PlanCandidate] = Field(default_factory=list)  # every plan evaluated, both strategies
    evaluations: int = 0  # validation passes the search took

    @property
    def float_layers(self) -> list[str]:
        return [name for name, precision in self.layers.items() if precision == "float"]

    @property
    def int8_layers(self) -> list[str]:
        return [name for name, precision in self.layers.items() if precision == "int8"]
