"""Distillation, the PTQ baseline, float islands in an ONNX Runtime QDQ model, and the release's
quantization tasks wired in a Prefect flow with a real MLflow run (SQLite), on digits at 8x8.

One tiny MobileNetV2 is trained per module (it is the teacher, and the model quantized).
Tolerances are stated where they are used (~270 test images; 1 image = 0.37 points).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeship.config import DistillationParams, ModelParams, PtqParams, TrainParams, parse_params
from edgeship.registry.tracking import ReleaseRun
from edgeship.tasks.data import load_split
from edgeship.tasks.distill import agreement, distill, distillation_loss, load_teacher
from edgeship.tasks.ptq import post_training_quantize
from edgeship.tasks.qat_plan import quantizable_layers
from edgeship.tasks.qdq_onnx import float_ops_of, integer_ops_of, onnx_accuracy, optimized_op_counts, revert_layers
from edgeship.tasks.train import load_model
from tiny_quantization import TINY_MOBILENET, digits, trained  # noqa: F401  (fixtures)

torch.set_num_threads(1)  # 2 shared cores: a second intra-op thread made epochs up to 10x slower under load


def small_cnn(num_classes: int, in_channels: int, width: int = 8) -> nn.Module:
    """A student about a tenth of the teacher's size."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


STUDENT = ModelParams(factory=f"{__name__}:small_cnn", kwargs={"width": 8})


@pytest.fixture
def release_run(tmp_path):
    from edgeship.config import RegistryParams

    return ReleaseRun.start(RegistryParams(tracking_uri="sqlite:///mlflow.db", artifact_location="mlartifacts"),
                            tmp_path, run_name="release-test")


def test_distillation_loss():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    def loss(s, t, temperature, alpha) -> float:
        return float(distillation_loss(s, t, labels, temperature, alpha))

    assert loss(student, teacher, 4.0, 0.0) == pytest.approx(float(F.cross_entropy(student, labels)))
    assert loss(teacher, teacher, 4.0, 1.0) == pytest.approx(0.0, abs=1e-6)
    kl = float(F.kl_div(F.log_softmax(student / 2, 1), F.softmax(teacher / 2, 1), reduction="batchmean"))
    assert loss(student, teacher, 2.0, 1.0) == pytest.approx(4 * kl, rel=1e-5)  # T^2 keeps the gradient scale


def test_student_learns_from_the_teacher(trained, digits, tmp_path):
    log = []
    student = distill(digits, STUDENT, TrainParams(epochs=4, lr=0.1), DistillationParams(temperature=4, alpha=0.7),
                      load_model(trained), tmp_path, on_epoch=lambda epoch, metrics: log.append(epoch),
                      teacher_name="tiny mobilenet")
    assert log == [1, 2, 3, 4]
    assert student.teacher == "tiny mobilenet" and student.factory == STUDENT.factory
    assert student.test_accuracy > 0.5  # chance is 0.1; 4 epochs of a 2-conv student
    x, _ = load_split(digits, "test")
    assert agreement(load_model(student), load_model(trained), x) > 0.5


def test_distillation_task_logs_a_nested_run(digits, tmp_path, release_run):
    from edgeship.flows.quantization_tasks import distill_model

    params = parse_params({"model": STUDENT.model_dump(), "train": {"epochs": 2, "lr": 0.1},
                           "distillation": {"enabled": True, "teacher": TINY_MOBILENET.model_dump(),
                                            "teacher_epochs": 2}})
    student = distill_model.fn(params, digits, tmp_path / "out", release_run)
    client = release_run.client
    children = client.search_runs([client.get_run(release_run.run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{release_run.run_id}'")
    assert len(children) == 1
    child = children[0]
    assert child.info.run_name == "distillation" and child.info.status == "FINISHED"
    assert {"teacher/best_val_accuracy", "teacher/test_accuracy", "student/test_accuracy",
            "student/teacher_agreement"} <= set(child.data.metrics)
    assert [m.step for m in client.get_metric_history(child.info.run_id, "student/val_accuracy")] == [1, 2]
    assert student.model_uri and student.mlflow_run_id == release_run.run_id
    assert student.teacher == TINY_MOBILENET.factory
    # The logged model can be the next run's teacher (distillation.teacher_uri).
    teacher = load_teacher(student.model_uri, release_run.tracking_uri)
    assert isinstance(teacher, nn.Module)
    assert agreement(teacher, load_model(student), load_split(digits, "test")[0]) == 1.0


def test_ptq_baseline_runs_int8_on_onnx_runtime(trained, digits, tmp_path):
    baseline = post_training_quantize(trained, digits, PtqParams(), tmp_path)
    assert baseline.method == "ptq" and baseline.onnx_path.is_file()
    convs = [layer for layer in quantizable_layers(load_model(trained)) if layer.kind != "linear"]
    assert baseline.integer_ops["QLinearConv"] == len(convs) and baseline.float_ops == {}
    # Calibrated on 32 images, no training: allow 3 points (8 of ~270 test images).
    assert baseline.onnx_test_accuracy >= trained.test_accuracy - 0.03
    assert baseline.test_accuracy == baseline.onnx_test_accuracy


def test_reverting_a_layer_in_a_qdq_model_keeps_it_float(trained, digits, tmp_path):
    baseline = post_training_quantize(trained, digits, PtqParams(), tmp_path)
    members = {m: layer.name for layer in quantizable_layers(load_model(trained)) for m in layer.members}
    reverted = revert_layers(baseline.onnx_path, ["features.2.conv.2", "features.3.conv.1"], members,
                             tmp_path / "mixed.onnx")
    ops = optimized_op_counts(reverted)
    # Between int8 layers, ONNX Runtime would re-quantize them per tensor unless protected (keep_float_islands).
    assert sum(float_ops_of(ops).values()) == 2
    assert integer_ops_of(ops)["QLinearConv"] == baseline.integer_ops["QLinearConv"] - 2
    x, y = load_split(digits, "test")
    assert abs(onnx_accuracy(reverted, x, y) - baseline.onnx_test_accuracy) <= 0.02


def test_release_quantization_tasks_in_a_flow(trained, digits, tmp_path, release_run):
    """sensitivity -> plan -> QAT on the plan -> PTQ baseline -> comparison, as the release wires them."""
    from prefect import flow

    from edgeship.flows import quantization_tasks as q

    params = parse_params({"qat": {"epochs": 1, "freeze_bn_after_epoch": 1, "freeze_observers_after_epoch": 1},
                           "sensitivity": {"max_samples": 64, "latency_runs": 5},
                           "precision": {"max_drop_points": 2.0, "frontier_steps": 1, "compare_strategies": False}})

    @flow
    def quantization(out_dir):
        report = q.analyze_sensitivity(params, trained, digits, out_dir, release_run)
        plan = q.plan_precision(params, trained, digits, report, release_run)
        quantized = q.quantize_on_plan(params, trained, digits, plan, out_dir, release_run)
        baseline = q.ptq_baseline(params, trained, digits, out_dir, release_run)
        return plan, quantized, q.compare_quantization(trained, baseline, quantized, release_run)

    plan, quantized, rows = quantization(tmp_path / "out")
    assert plan.meets_budget and quantized.layer_precisions == plan.layers
    assert [r["model"] for r in rows] == ["fp32 (PyTorch)", "PTQ (ONNX Runtime static)", "QAT on the plan"]
    client = release_run.client
    logged = {f.path for f in client.list_artifacts(release_run.run_id, "quantization")}
    assert {"quantization/sensitivity.json", "quantization/sensitivity.png", "quantization/precision_plan.json",
            "quantization/pareto.png", "quantization/comparison.json", "quantization/qat_ops.json"} <= logged
    metrics = client.get_run(release_run.run_id).data.metrics
    assert {"qat/onnx_test_accuracy", "qat/integer_ops", "ptq/test_accuracy", "plan/float_layers",
            "sensitivity/int8_val_accuracy"} <= set(metrics)
    assert metrics["qat/integer_ops"] > 0
    plan_json = release_run.download("quantization/precision_plan.json", tmp_path / "dl")
    assert set(json.loads(plan_json.read_text())["layers"]) == set(plan.layers)
    assert np.isfinite(metrics["qat/onnx_test_accuracy"])
