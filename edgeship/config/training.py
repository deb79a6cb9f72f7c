"""params.yaml's sections on what to train: project, data, model, train, distillation, pruning."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from edgeship.config.section import Section


class ProjectParams(Section):
    name: str = Field(default="digits-classifier", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="registered model name in MLflow")


class DataParams(Section):
    raw_dir: Path = Path("data/raw")
    format: Literal["auto", "folders", "coco", "yolo"] = Field(
        default="auto", description="folders: <class>/<image> (classification); coco: images/ + annotations.json; "
                                    "yolo: images/ + labels/<image>.txt + classes.txt (detection); auto: by the task "
                                    "and what raw_dir holds")
    prepared_dir: Path = Path("data/prepared")
    input_size: int = Field(default=32, ge=8, le=1024)
    channels: Literal[1, 3] = 1
    val_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    test_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    calibration_size: int = Field(default=128, ge=1, description="images taken from train for calibration")
    seed: int = 0


class FieldDataParams(Section):
    """The field split: samples the devices uploaded, pulled by `edgeship data field` (edgeship.tasks.field_data)."""

    dir: Path = Field(default=Path("data/field"), description="where `edgeship data field` writes the split (DVC-tracked)")
    source: str | None = Field(default=None, description="s3://bucket/prefix to pull from; none: the upload_url of "
                               "the OTA channel's field_samples")
    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint; none: ota.s3_endpoint_url")
    test_fraction: float = Field(default=0.3, gt=0, lt=1, description="share of samples in the field test split")
    use: bool = Field(default=True, description="releases train on lab train + field train and report field test "
                      "accuracy, when the split exists")


class ModelParams(Section):
    factory: str = Field(default="edgeship.models.zoo:mobilenet_v2",
                         description="import path 'package.module:function' returning a torch.nn.Module")
    kwargs: dict = Field(default_factory=dict)

    @field_validator("factory")
    @classmethod
    def _import_path(cls, value: str) -> str:
        module, sep, attr = value.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"'{value}' is not an import path; write it as 'package.module:function'")
        return value


class TrainParams(Section):
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=0.05, gt=0)
    weight_decay: float = Field(default=4e-5, ge=0)
    augment: bool = Field(default=False, description="random shifts of up to 1/8 of the image (no flips)")
    seed: int = 0


class DistillationParams(Section):
    """Train the model from a teacher's softened logits plus the labels (an optional stage)."""

    enabled: bool = False
    teacher: ModelParams | None = Field(default=None, description="a model trained first in the same run")
    teacher_uri: str | None = Field(default=None, description="or an MLflow model URI (models:/name/1, runs:/...)")
    teacher_epochs: int | None = Field(default=None, ge=1, description="teacher training epochs; null: train.epochs")
    temperature: float = Field(default=4.0, gt=0)
    alpha: float = Field(default=0.7, ge=0, le=1, description="weight of the KL term; 1 - alpha weighs the labels")

    @model_validator(mode="after")
    def _one_teacher(self) -> "DistillationParams":
        if self.enabled and (self.teacher is None) == (self.teacher_uri is None):
            raise ValueError("distillation needs exactly one of 'teacher' (a model to train) and 'teacher_uri'")
        return self


class PruningParams(Section):
    """Structured channel pruning (Torch-Pruning) after training, before sensitivity and QAT: off by default."""

    enabled: bool = False
    importance: Literal["l1", "taylor"] = Field(default="l1", description="l1: weight magnitude; taylor: "
                                                "|weight x gradient| on a few training batches")
    ratio: float = Field(default=0.3, ge=0, lt=1, description="fraction of channels removed (per layer, or over "
                                                              "the whole model with scope: global)")
    search_ratios: list[float] = Field(default_factory=list, description="candidate ratios: each is pruned, "
                                       "fine-tuned and timed; the fastest within max_drop_points wins (empty: ratio)")
    max_drop_points: float = Field(default=1.0, ge=0, description="val accuracy budget vs the unpruned model, in "
                                                                  "points, after fine-tuning")
    scope: Literal["per_layer", "global"] = Field(default="per_layer", description="per_layer: every layer loses "
                                                  "`ratio`; global: the least important channels model-wide")
    max_layer_ratio: float = Field(default=0.8, gt=0, lt=1, description="global scope: no layer loses more")
    layer_ratios: dict[str, float] = Field(default_factory=dict, description="module name -> its own ratio")
    pinned: list[str] = Field(default_factory=list, description="modules never pruned (the classifier never is)")
    round_to: int | None = Field(default=4, ge=1, description="keep channel counts multiples of this (the "
                                 "nearest, at least one): odd counts run slower on SIMD kernels; null: any count")
    fine_tune_epochs: int = Field(default=3, ge=1)
    fine_tune_lr: float = Field(default=0.01, gt=0)
    distill: bool = Field(default=True, description="fine-tune from the unpruned model's logits as teacher")
    distill_alpha: float = Field(default=0.5, ge=0, le=1)
    distill_temperature: float = Field(default=4.0, gt=0)
    taylor_batches: int = Field(default=4, ge=1, description="training batches whose gradients Taylor uses")
    latency_runs: int = Field(default=100, ge=5, description="timed runs per candidate on ONNX Runtime (1 thread)")

    @field_validator("search_ratios")
    @classmethod
    def _ratios(cls, value: list[float]) -> list[float]:
        bad = [r for r in value if not 0 <= r < 1]
        if bad:
            raise ValueError(f"pruning ratios must be in [0, 1): {bad}")
        return sorted(set(value))

    @field_validator("layer_ratios")
    @classmethod
    def _layer_ratios(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: r for k, r in value.items() if not 0 <= r < 1}
        if bad:
            raise ValueError(f"layer ratios must be in [0, 1): {bad}")
        return value

    def candidates(self) -> list[float]:
        return self.search_ratios or [self.ratio]
