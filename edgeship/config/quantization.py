"""params.yaml's sections on quantizing and converting: sensitivity, precision, qat, ptq, compile."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from edgeship.config.section import Section


class QatParams(Section):
    epochs: int = Field(default=3, ge=1)
    lr: float = Field(default=0.005, gt=0)
    batch_size: int = Field(default=64, ge=2)
    backend: Literal["x86", "qnnpack", "fbgemm"] = "x86"
    freeze_bn_after_epoch: int = Field(default=1, ge=0, description="BatchNorm statistics freeze from this epoch "
                                                                     "(0-based); the folded BN then uses them")
    freeze_observers_after_epoch: int = Field(default=2, ge=0, description="quantizer ranges freeze from this epoch")
    lr_schedule: Literal["cosine", "step", "constant"] = Field(
        default="cosine", description="per epoch: cosine to zero, step (x0.1 at half way), or constant")
    early_stop_patience: int | None = Field(default=None, ge=1,
                                            description="stop after this many epochs without a better val accuracy")
    calibrate: bool = Field(default=True, description="set quantizer ranges on the calibration split before "
                                                      "the first epoch")
    reduce_range: bool = Field(default=False, description="7-bit activations: only for x86 CPUs without VNNI, "
                                                          "where u8*s8 products can saturate")
    fold_relu6: bool = Field(default=True, description="fold a ReLU6 after an int8 conv into its output quantizer "
                                                       "(one QLinearConv in ONNX Runtime instead of a float Clip)")
    distill_alpha: float = Field(default=0.0, ge=0, le=1, description="weight of distillation from the float "
                                                                      "model's logits during QAT; 0: off")
    distill_temperature: float = Field(default=4.0, gt=0)


class SensitivityParams(Section):
    """Per-layer sensitivity analysis: each layer quantized alone, and everything but it."""

    enabled: bool = Field(default=True, description="run the analysis and plan a mixed precision before QAT")
    max_samples: int | None = Field(default=None, ge=1, description="validation images per evaluation; "
                                                                    "null: the whole split")
    converse: bool = Field(default=True, description="also measure all layers int8 except one")
    latency: bool = Field(default=True, description="measure each layer's int8 and float cost on ONNX Runtime")
    latency_runs: int = Field(default=40, ge=5, description="profiled runs per model when measuring costs")


class PrecisionParams(Section):
    """The accuracy budget of the mixed-precision plan, and layers the user fixes."""

    max_drop_points: float | None = Field(default=None, ge=0, description="largest val accuracy drop vs fp32, in "
                                                                          "percentage points (0.5 when neither "
                                                                          "budget is set)")
    max_drop_relative: float | None = Field(default=None, ge=0, le=1, description="or the largest drop as a "
                                                                                  "fraction of the fp32 accuracy")
    pinned: dict[str, Literal["int8", "float"]] = Field(default_factory=dict,
                                                        description="module name -> precision the plan must keep")
    strategy: Literal["latency_aware", "accuracy_only"] = Field(
        default="latency_aware", description="latency_aware: revert the layer that buys the most accuracy per ms; "
                                             "accuracy_only: the most harmful layer first (as NNCF does)")
    rerank_after: int = Field(default=2, ge=1, description="re-rank after this many reverts that did not help")
    revert_faster_in_float: bool = Field(default=True, description="keep float the layers that run faster in "
                                                                   "float than in int8 on the runtime")
    measure_candidates: bool = Field(default=True, description="measure every candidate plan's latency on ONNX "
                                                               "Runtime, not only predict it")
    compare_strategies: bool = Field(default=True, description="also walk the other strategy, for the frontier plot "
                                                               "and the comparison (does not change the plan)")
    frontier_steps: int = Field(default=6, ge=0, description="reverts past the chosen plan, to draw the "
                                                             "accuracy/latency frontier (does not change the plan)")
    max_evaluations: int | None = Field(default=None, ge=1, description="stop the search after this many "
                                                                        "validation passes (large models); null: none")

    @model_validator(mode="after")
    def _one_budget(self) -> "PrecisionParams":
        if self.max_drop_points is not None and self.max_drop_relative is not None:
            raise ValueError("set one of max_drop_points and max_drop_relative, not both")
        return self

    def allowed_drop(self, fp32_accuracy: float) -> float:
        """The budget as an accuracy fraction (0.005 for half a point)."""
        if self.max_drop_relative is not None:
            return self.max_drop_relative * fp32_accuracy
        return (0.5 if self.max_drop_points is None else self.max_drop_points) / 100.0


class PtqParams(Section):
    """The post-training-quantization baseline: ONNX Runtime static QDQ quantization of the fp32 model."""

    enabled: bool = True
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True


class CompileOptions(Section):
    """One target's converter choices (`compile: {tflite-int8: {route: tf, io: uint8}}`)."""

    route: Literal["auto", "litert-torch", "tf"] = Field(
        default="auto", description="LiteRT targets: litert-torch; tf: ONNX -> onnx2tf -> TFLiteConverter "
                                    "(.venv/tf-converter); auto: litert-torch, TensorFlow's converter when it fails")
    io: Literal["int8", "uint8", "float32"] | None = Field(
        default=None, description="tflite-int8 input/output type on the tf route (uint8 for the Coral Edge TPU); "
                                  "null: int8")
