"""QAT on a mixed-precision plan, exported as QDQ ONNX with float islands, on digits at 8x8.

The model is a tiny MobileNetV2 trained once per module, and a fragile copy of it (one
layer that int8 wrecks; see tests/test_sensitivity.py). Epochs are tiny, so tolerances
are stated where they are used, in test images (~270 per split; 1 image = 0.37 points).
"""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from edgeship.config import ModelParams, PrecisionParams, QatParams, SensitivityParams, TrainParams
from edgeship.tasks.data import load_split
from edgeship.tasks.precision_plan import plan_precision
from edgeship.tasks.qat import quantization_aware_train
from edgeship.tasks.qat_plan import quantizable_layers
from edgeship.tasks.qdq_onnx import optimized_op_counts
from edgeship.tasks.sensitivity import analyze_sensitivity
from edgeship.tasks.train import evaluate, load_model, train
from tiny_quantization import TINY_MOBILENET, make_fragile, digits, trained, fragile  # noqa: F401  (fixtures)

torch.set_num_threads(1)  # 2 shared cores: a second intra-op thread made epochs up to 10x slower under load

QUICK_QAT = QatParams(epochs=1, freeze_bn_after_epoch=1, freeze_observers_after_epoch=1)
BUDGET_POINTS = 1.0
# The plan's budget holds on validation for the simulated (pre-QAT) model. On the test split, after one QAT
# epoch and ONNX Runtime's own rounding, allow the budget plus 7 test images (2.6 points). Measured: 0.37
# points below fp32 on an AMD EPYC, 2.23 on an Intel Xeon (one epoch's trajectory follows the CPU's float
# rounding). Without the plan the same QAT lands below 50% (asserted below), so the margin still separates them.
TEST_TOLERANCE = BUDGET_POINTS / 100 + 7 / 269


class ScaledConv(nn.Conv2d):
    """A user's own conv subclass: the quantizer matches module types exactly, so it has no int8 pattern for it."""

    def forward(self, x):
        return super().forward(x) * 0.5


def net_with_scaled_conv(num_classes: int, in_channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), ScaledConv(8, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


def test_qat_on_the_plan_keeps_the_budget_on_onnx_runtime(fragile, digits, tmp_path):
    report = analyze_sensitivity(fragile, digits, SensitivityParams(latency=False), QatParams(), tmp_path / "s")
    plan = plan_precision(fragile, digits, report, PrecisionParams(max_drop_points=BUDGET_POINTS,
                                                                   compare_strategies=False, frontier_steps=0),
                          QatParams())
    assert plan.meets_budget and plan.float_layers == ["features.2.conv.2"]

    mixed = quantization_aware_train(fragile, digits, QUICK_QAT, tmp_path / "mixed", plan=plan.layers)
    fp32_test = evaluate(load_model(fragile), *load_split(digits, "test"))
    assert mixed.onnx_test_accuracy >= fp32_test - TEST_TOLERANCE, (mixed.onnx_test_accuracy, fp32_test)
    assert mixed.layer_precisions == plan.layers
    assert mixed.float_ops == {"Conv": 1}  # the float island runs in float on ONNX Runtime ...
    assert mixed.integer_ops["QLinearConv"] == len(plan.int8_layers) - 1  # ... every other conv in int8 (+ QGemm)
    assert mixed.integer_ops["QGemm"] == 1

    # Without the plan, the same QAT cannot save the fragile layer.
    with pytest.warns(UserWarning):
        uniform = quantization_aware_train(fragile, digits, QUICK_QAT, tmp_path / "uniform")
    assert uniform.onnx_test_accuracy < 0.5


def test_float_islands_stay_float_on_onnx_runtime(trained, digits, tmp_path):
    # A projection conv between int8 layers: ONNX Runtime (WeightBiasQuantization) would quantize its weights
    # per tensor behind the plan's back unless the export protects it.
    mixed = quantization_aware_train(trained, digits, QUICK_QAT, tmp_path, plan={"features.3.conv.2": "float"})
    assert mixed.float_layers == ["features.3.conv.2"]
    assert mixed.float_ops == {"Conv": 1}
    convs = [layer for layer in quantizable_layers(load_model(trained)) if layer.kind != "linear"]
    assert mixed.integer_ops["QLinearConv"] == len(convs) - 1
    graph = onnx.load(str(mixed.onnx_path)).graph
    float_weights = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 4}
    assert any(n.op_type == "Conv" and n.input[1] in float_weights for n in graph.node)
    assert mixed.onnx_test_accuracy >= trained.test_accuracy - 0.03


def test_relu6_folds_into_the_int8_conv(trained, digits, tmp_path):
    quantized = quantization_aware_train(trained, digits, QUICK_QAT, tmp_path)
    ops = optimized_op_counts(quantized.onnx_path)
    # Every Conv-BN-ReLU6 is one QLinearConv: no float Clip between a DequantizeLinear and a QuantizeLinear.
    assert "Clip" not in ops and "Relu" not in ops
    convs = [layer for layer in quantizable_layers(load_model(trained)) if layer.kind != "linear"]
    assert ops["QLinearConv"] == len(convs)
    # Quantize/Dequantize are left only at the model's input and output and around the tiny Flatten before the head.
    assert ops.get("QuantizeLinear", 0) <= 2 and ops.get("DequantizeLinear", 0) <= 2
    assert quantized.float_ops == {}
    # ORT's int8 kernels and torch's round differently: 2 points (5 of ~270 test images).
    assert abs(quantized.onnx_test_accuracy - quantized.test_accuracy) <= 0.02
    assert quantized.onnx_test_accuracy >= trained.test_accuracy - 0.02


def test_schedule_early_stop_and_frozen_batchnorm(trained, digits, tmp_path):
    seen = []
    params = QatParams(epochs=4, lr=1e-9, lr_schedule="step", early_stop_patience=1, freeze_bn_after_epoch=0,
                       freeze_observers_after_epoch=0)
    quantized = quantization_aware_train(trained, digits, params, tmp_path,
                                         on_epoch=lambda epoch, metrics: seen.append((epoch, metrics["lr"])))
    # lr 1e-9 changes nothing, so validation never improves on the calibrated start: patience 1 stops after 1 epoch.
    assert quantized.epochs_run == 1 and [epoch for epoch, _ in seen] == [1]

    seen.clear()
    quantization_aware_train(trained, digits, params.model_copy(update={"early_stop_patience": None}),
                             tmp_path / "all", on_epoch=lambda epoch, metrics: seen.append((epoch, metrics["lr"])))
    assert [lr for _, lr in seen] == pytest.approx([1e-9, 1e-9, 1e-10, 1e-10])  # step: x0.1 at half way

    # BatchNorm frozen from the first epoch: the fine-tuned float weights keep the trained statistics.
    state = torch.load(quantized.qat_float_checkpoint, weights_only=True)
    original = load_model(trained).state_dict()
    assert set(state) == set(original)
    for key in ("features.0.1.running_mean", "features.2.conv.3.running_var"):
        assert torch.equal(state[key], original[key]), key
    model = load_model(trained)
    model.load_state_dict(state)  # loads into the user's model as it is


def test_cosine_schedule_and_self_distillation(trained, digits, tmp_path):
    seen = []
    params = QatParams(epochs=2, lr=0.004, distill_alpha=0.5, freeze_bn_after_epoch=1, freeze_observers_after_epoch=1)
    quantized = quantization_aware_train(trained, digits, params, tmp_path,
                                         on_epoch=lambda epoch, metrics: seen.append(metrics["lr"]))
    assert seen == pytest.approx([0.004, 0.002])
    assert quantized.onnx_test_accuracy >= trained.test_accuracy - 0.02


def test_layer_without_an_int8_pattern_stays_float_with_a_warning(digits, tmp_path):
    trained = train(digits, ModelParams(factory=f"{__name__}:net_with_scaled_conv"), TrainParams(epochs=2, lr=0.1),
                    tmp_path / "fp32")
    with pytest.warns(UserWarning, match="layer '2' \\(ScaledConv\\) has no int8 pattern"):
        quantized = quantization_aware_train(trained, digits, QUICK_QAT, tmp_path / "int8")
    assert quantized.float_layers == ["2"]
    assert quantized.layer_precisions == {"0": "int8", "2": "float", "6": "int8"}
    assert quantized.integer_ops.get("QLinearConv") == 1
