"""Per-layer sensitivity analysis on digits at 8x8 (a tiny MobileNetV2, trained once per module).

A copy of the trained model is made deliberately fragile: one input channel of the
projection conv `features.2.conv.2` is dead (its producer's BatchNorm pins it below
zero, so ReLU6 makes it exactly 0) and that conv's weights on the dead channel are
1000x the largest weight. The float model computes the same thing (0 x anything = 0),
but per-channel int8 weights of that conv round every real weight to zero.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edgeship.config import QatParams, SensitivityParams
from edgeship.records import SensitivityReport
from edgeship.tasks.data import load_split
from edgeship.tasks.qat_plan import quantizable_layers
from edgeship.tasks.sensitivity import (QuantSimulator, analyze_sensitivity, compare_logits, sensitivity_figure,
                                        sensitivity_rows)
from edgeship.tasks.train import evaluate, load_model
from tiny_quantization import (FRAGILE_LAYER, TINY_MOBILENET, digits, fragile, make_fragile,  # noqa: F401 (fixtures)
                               trained)

torch.set_num_threads(1)  # 2 shared cores: a second intra-op thread made epochs up to 10x slower under load


@pytest.fixture(scope="module")
def report(trained, digits, tmp_path_factory) -> SensitivityReport:
    progress = []
    result = analyze_sensitivity(trained, digits, SensitivityParams(latency_runs=10), QatParams(),
                                 tmp_path_factory.mktemp("sensitivity"),
                                 on_layer=lambda done, total, layer: progress.append((done, total)))
    assert progress[-1] == (2 * len(result.layers), 2 * len(result.layers))
    return result


@pytest.fixture(scope="module")
def fragile_report(fragile, digits, tmp_path_factory) -> SensitivityReport:
    return analyze_sensitivity(fragile, digits, SensitivityParams(latency=False), QatParams(),
                               tmp_path_factory.mktemp("fragile-sensitivity"))


def test_the_fragile_copy_computes_what_the_model_computes(trained, fragile, digits):
    x, y = load_split(digits, "val")
    # Killing one of 24 depthwise channels costs the float model little; the outlier itself costs nothing.
    assert evaluate(load_model(fragile), x, y) >= trained.val_accuracy - 0.03


def test_ranking_finds_the_fragile_layer_first(fragile_report, report):
    assert report.ranking()[0] != FRAGILE_LAYER  # in the healthy model it is an ordinary layer
    assert fragile_report.ranking()[0] == FRAGILE_LAYER
    worst = next(s for s in fragile_report.layers if s.layer == FRAGILE_LAYER)
    others = [s for s in fragile_report.layers if s.layer != FRAGILE_LAYER]
    assert worst.rank == 1 and worst.accuracy_drop > 30  # alone in int8 it wrecks the model
    assert worst.sqnr_db < min(s.sqnr_db for s in others) - 20
    assert worst.converse_accuracy_gain > 30  # keeping only it float recovers most of the all-int8 loss
    assert worst.converse_accuracy_gain == max(s.converse_accuracy_gain for s in fragile_report.layers)
    assert fragile_report.int8_val_accuracy < fragile_report.fp32_val_accuracy - 0.3


def test_layers_carry_the_names_users_see(report, trained):
    model = load_model(trained)
    modules = dict(model.named_modules())
    names = [s.layer for s in report.layers]
    assert names == [layer.name for layer in quantizable_layers(model)]  # every conv and linear, in model order
    assert all(name in modules for name in names)
    assert {"features.0", "features.1.conv.0", "features.2.conv.2", "classifier.1"} <= set(names)
    assert not any("activation_post_process" in n or "_" in n for n in names)
    kinds = {s.layer: s.kind for s in report.layers}
    assert kinds["features.1.conv.0"] == "depthwise" and kinds["classifier.1"] == "linear"
    assert sorted(s.rank for s in report.layers) == list(range(1, len(names) + 1))


def test_healthy_model_loses_little_in_int8(report):
    assert report.int8_val_accuracy >= report.fp32_val_accuracy - 0.03  # 8 of ~270 validation images
    assert report.int8_sqnr_db > 15
    for s in report.layers:
        assert s.sqnr_db > report.int8_sqnr_db - 1  # one layer alone adds less error than all of them
        assert s.kl >= 0 and math.isfinite(s.kl)


def test_costs_come_from_onnx_runtime(report):
    assert report.int8_onnx is not None and report.int8_onnx.is_file()
    assert report.int8_latency_ms > 0 and report.fp32_latency_ms > 0
    for s in report.layers:
        assert s.int8_ms is not None and s.int8_ms > 0, s.layer  # every layer's nodes were found in the profile
        assert s.float_ms is not None and s.float_ms > 0, s.layer
        assert s.revert_cost_ms is not None and math.isfinite(s.revert_cost_ms)
    # The costs are real measurements, so they differ between layers.
    assert len({round(s.revert_cost_ms, 6) for s in report.layers}) > 1


def test_table_and_chart(report, tmp_path):
    rows = sensitivity_rows(report)
    assert [r["rank"] for r in rows] == sorted(r["rank"] for r in rows)
    assert set(rows[0]) >= {"layer", "acc_drop_pts", "sqnr_db", "int8_ms", "float_ms", "revert_cost_ms"}
    figure = sensitivity_figure(report)
    figure.savefig(tmp_path / "sensitivity.png")
    assert (tmp_path / "sensitivity.png").stat().st_size > 10_000
    assert SensitivityReport.model_validate_json(report.model_dump_json()) == report


def test_simulator_switches_layers(trained, digits):
    x, y = load_split(digits, "val")
    model = load_model(trained)
    simulator = QuantSimulator(model, load_split(digits, "calibration")[0], QatParams())
    reference = load_model(trained).eval()(torch.from_numpy(x)).detach().numpy()
    none = compare_logits(reference, simulator.logits(x, []), y)
    # Nothing int8: the fake-quant graph is the float model (ReLU6 clips and BN folding still apply), so the
    # logits agree to float rounding: 59.97 dB measured on an Intel Xeon, over 60 on an AMD EPYC. One int8
    # layer alone is far below 50 dB on this model.
    assert none.sqnr_db > 50
    assert none.accuracy == compare_logits(reference, reference, y).accuracy
    everything = compare_logits(reference, simulator.logits(x, simulator.names), y)
    assert 10 < everything.sqnr_db < none.sqnr_db


def test_compare_logits():
    reference = np.array([[2.0, 0.0], [0.0, 3.0]])
    same = compare_logits(reference, reference, np.array([0, 1]))
    assert same.accuracy == 1.0 and same.sqnr_db == 100.0 and same.kl == 0.0
    noisy = compare_logits(reference, reference + 0.1, np.array([0, 0]))
    assert noisy.accuracy == 0.5 and 20 < noisy.sqnr_db < 40
    broken = compare_logits(reference, reference * np.nan, np.array([0, 1]))
    assert broken.sqnr_db == -100.0
