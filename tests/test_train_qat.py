"""Train, quantization-aware training, ONNX targets and host checks, on digits at 8x8 (kept small for CI).

One module-scoped fixture prepares the data and trains a tiny MobileNetV2 once;
another runs QAT on it once. Tolerances are stated where they are used.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeship.config import DataParams, ModelParams, QatParams, TrainParams
from edgeship.errors import ConfigError
from edgeship.records import PreparedData, QuantizedModel, TrainedModel
from edgeship.tasks.compile import CompileInputs, get_target
from edgeship.tasks.data import export_digits, load_split, prepare
from edgeship.tasks.host_check import host_check, reference_logits
from edgeship.tasks.qat import quantization_aware_train
from edgeship.tasks.qdq_onnx import count_integer_ops
from edgeship.tasks.train import evaluate, load_model, random_shift, train

torch.set_num_threads(1)  # 2 shared cores: a second intra-op thread made epochs up to 10x slower under load

TINY_MOBILENET = ModelParams(kwargs={"width_mult": 0.35, "stages": 3, "stem_stride": 1, "dropout": 0.0})
QUICK_QAT = QatParams(epochs=1, lr=0.005, freeze_bn_after_epoch=0, freeze_observers_after_epoch=1)
# ORT's int8 kernels and torch's quantized kernels round differently: allow 2 points (5 of ~270 test images).
ORT_VS_TORCH_INT8_TOLERANCE = 0.02


def tiny_cnn(num_classes: int, in_channels: int, width: int = 8) -> nn.Module:
    """A user's own model factory, referenced by import path like any other."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


class BrightnessGate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so QAT must keep it float."""

    def forward(self, x):
        if x.mean() > 10.0:
            return x * 0.5
        return x


class GatedCnn(nn.Module):
    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.gate = BrightnessGate()
        self.head = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(16, num_classes))

    def forward(self, x):
        return self.head(self.gate(self.stem(x)))


def gated_cnn(num_classes: int, in_channels: int) -> nn.Module:
    return GatedCnn(num_classes, in_channels)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> PreparedData:
    root = tmp_path_factory.mktemp("digits")
    export_digits(root / "raw")
    return prepare(root / "raw", root / "prepared", DataParams(input_size=8, calibration_size=32))


@pytest.fixture(scope="module")
def training(digits, tmp_path_factory) -> tuple[TrainedModel, list[tuple[int, dict]]]:
    log: list[tuple[int, dict]] = []
    trained = train(digits, TINY_MOBILENET, TrainParams(epochs=5, lr=0.05, batch_size=64),
                    tmp_path_factory.mktemp("fp32"), on_epoch=lambda epoch, metrics: log.append((epoch, metrics)))
    return trained, log


@pytest.fixture(scope="module")
def trained(training) -> TrainedModel:
    return training[0]


@pytest.fixture(scope="module")
def quantized(trained, digits, tmp_path_factory) -> QuantizedModel:
    return quantization_aware_train(trained, digits, QUICK_QAT, tmp_path_factory.mktemp("int8"))


def test_training_beats_chance_and_keeps_the_best_epoch(training, digits):
    trained, log = training
    assert [epoch for epoch, _ in log] == [1, 2, 3, 4, 5]
    assert set(log[0][1]) == {"train_loss", "train_accuracy", "val_accuracy", "lr"}
    assert trained.val_accuracy == max(metrics["val_accuracy"] for _, metrics in log)
    assert trained.test_accuracy > 0.6  # chance is 0.1
    model = load_model(trained)
    assert not model.training
    assert evaluate(model, *load_split(digits, "val")) == pytest.approx(trained.val_accuracy)


def test_random_shift_moves_digits_without_resizing_them():
    images = torch.zeros(16, 1, 8, 8)
    images[:, :, 3:5, 3:5] = 1.0
    shifted = random_shift(images, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    assert torch.all(shifted.sum(dim=(1, 2, 3)) == 4)  # a shift of at most 1 pixel keeps the centre blob whole
    assert not torch.equal(shifted, images)


def test_onnx_fp32_agrees_with_torch_on_onnxruntime(trained, digits, tmp_path):
    artifact = get_target("onnx-fp32").compile(CompileInputs(trained=trained, data=digits, output_dir=tmp_path))
    assert artifact.precision == "fp32" and artifact.runtime == "onnxruntime"
    assert [(s.name, s.shape) for s in artifact.inputs] == [("input", (1, 1, 8, 8))]
    assert [(s.name, s.shape) for s in artifact.outputs] == [("logits", (1, 10))]
    assert artifact.bytes == artifact.path.stat().st_size and len(artifact.sha256) == 64

    check = host_check(artifact, digits, reference_logits(trained, digits))
    assert check.error is None
    assert check.top1_agreement == 1.0
    assert check.max_abs_logit_diff < 1e-3  # same float math, different kernels
    assert check.accuracy == pytest.approx(trained.test_accuracy, abs=1e-9)
    assert count_integer_ops(artifact.path) == {}


def test_host_check_reports_an_artifact_that_does_not_load(trained, digits, tmp_path):
    artifact = get_target("onnx-fp32").compile(CompileInputs(trained=trained, data=digits, output_dir=tmp_path))
    artifact.path.write_bytes(b"not a model")
    check = host_check(artifact, digits)
    assert check.accuracy is None and "cannot load model_fp32.onnx" in check.error


def test_qat_int8_onnx_runs_integer_kernels_and_keeps_accuracy(quantized, trained, digits, tmp_path):
    assert quantized.integer_ops.get("QLinearConv", 0) > 0
    assert quantized.float_layers == []
    assert quantized.test_accuracy > 0.6

    artifact = get_target("onnx-int8").compile(CompileInputs(trained=trained, data=digits, output_dir=tmp_path,
                                                             quantized=quantized))
    assert artifact.precision == "int8" and artifact.path.name == "model_int8.onnx"
    assert [(s.name, s.shape) for s in artifact.inputs] == [("input", (1, 1, 8, 8))]
    check = host_check(artifact, digits, reference_logits(trained, digits))
    assert check.error is None
    assert abs(check.accuracy - quantized.test_accuracy) <= ORT_VS_TORCH_INT8_TOLERANCE


def test_plan_keeps_a_layer_float(quantized, trained, digits, tmp_path):
    mixed = quantization_aware_train(trained, digits, QUICK_QAT, tmp_path, plan={"features.0": "float"})
    assert mixed.float_layers == ["features.0"]
    assert mixed.integer_ops["QLinearConv"] == quantized.integer_ops["QLinearConv"] - 1
    artifact = get_target("onnx-int8").compile(CompileInputs(trained=trained, data=digits, output_dir=tmp_path,
                                                             quantized=mixed))
    assert artifact.precision == "mixed"


def test_plan_naming_an_unknown_module_is_rejected(trained, digits, tmp_path):
    with pytest.raises(ConfigError, match="features.99"):
        quantization_aware_train(trained, digits, QUICK_QAT, tmp_path, plan={"features.99": "float"})
    with pytest.raises(ConfigError, match="int4"):
        quantization_aware_train(trained, digits, QUICK_QAT, tmp_path, plan={"features.0": "int4"})


def test_users_own_factory_trains_and_quantizes(digits, tmp_path):
    model = ModelParams(factory=f"{__name__}:tiny_cnn", kwargs={"width": 8})
    trained = train(digits, model, TrainParams(epochs=3, lr=0.1), tmp_path / "fp32")
    assert trained.factory == f"{__name__}:tiny_cnn" and trained.test_accuracy > 0.3
    quantized = quantization_aware_train(trained, digits, QUICK_QAT, tmp_path / "int8")
    assert quantized.integer_ops.get("QLinearConv", 0) == 2


def test_untraceable_module_stays_float_with_a_warning(digits, tmp_path):
    trained = train(digits, ModelParams(factory=f"{__name__}:gated_cnn"), TrainParams(epochs=1), tmp_path / "fp32")
    with pytest.warns(UserWarning, match="module 'gate'"):
        quantized = quantization_aware_train(trained, digits, QUICK_QAT, tmp_path / "int8")
    assert quantized.float_layers == ["gate"]
    assert sum(quantized.integer_ops.values()) > 0
