"""The mixed-precision plan on digits at 8x8 (a tiny MobileNetV2 trained once per module).

Budgets are checked the way the plan claims them: a fresh simulator, set to the plan,
scored on the validation split. The fragile copy (see tests/test_sensitivity.py) has one
layer that int8 wrecks; the plan must revert it and nothing else is needed.
"""

from __future__ import annotations

import pytest
import torch

from edgeship.config import Params, PrecisionParams, QatParams, SensitivityParams, parse_params
from edgeship.errors import ConfigError
from edgeship.records import PrecisionPlan, PreparedData, TrainedModel
from edgeship.tasks.data import load_split
from edgeship.tasks.precision_plan import pareto_figure, pareto_front, plan_precision, plan_rows
from edgeship.tasks.sensitivity import QuantSimulator, analyze_sensitivity, compare_logits
from edgeship.tasks.train import load_model, predict_logits
from tiny_quantization import TINY_MOBILENET, make_fragile, digits, trained  # noqa: F401  (fixtures)

torch.set_num_threads(1)  # 2 shared cores: a second intra-op thread made epochs up to 10x slower under load

FAST = {"compare_strategies": False, "frontier_steps": 0, "measure_candidates": False}


@pytest.fixture(scope="module")
def report(trained, digits, tmp_path_factory):
    return analyze_sensitivity(trained, digits, SensitivityParams(latency_runs=10), QatParams(),
                               tmp_path_factory.mktemp("sensitivity"))


def simulated_accuracy(trained: TrainedModel, digits: PreparedData, plan: PrecisionPlan) -> float:
    """Val accuracy of the plan, from a simulator built afresh (not the one the search used)."""
    x, y = load_split(digits, "val")
    model = load_model(trained)
    simulator = QuantSimulator(model, load_split(digits, "calibration")[0], QatParams())
    logits = simulator.logits(x, plan.int8_layers)
    return compare_logits(predict_logits(model, x), logits, y).accuracy


def test_plans_meet_their_budget_and_tighter_budgets_keep_fewer_int8_layers(trained, digits, report):
    budgets = [5.0, 1.0, 0.5, 0.0]  # points, loosest first
    plans = [plan_precision(trained, digits, report, PrecisionParams(max_drop_points=b, **FAST), QatParams())
             for b in budgets]
    for budget, plan in zip(budgets, plans):
        assert plan.meets_budget, budget
        assert plan.allowed_drop == pytest.approx(budget / 100)
        assert set(plan.layers) == {s.layer for s in report.layers}
        achieved = simulated_accuracy(trained, digits, plan)
        assert achieved == pytest.approx(plan.predicted_val_accuracy)
        assert achieved >= plan.fp32_val_accuracy - budget / 100 - 1e-9
    counts = [len(plan.int8_layers) for plan in plans]
    assert counts == sorted(counts, reverse=True), counts
    # A tighter budget walks further down the same chain of reverts.
    for looser, tighter in zip(plans, plans[1:]):
        assert set(looser.float_layers) <= set(tighter.float_layers)


def test_plan_reverts_the_fragile_layer(trained, digits, tmp_path):
    fragile = make_fragile(trained, tmp_path / "fragile.pt")
    report = analyze_sensitivity(fragile, digits, SensitivityParams(latency=False), QatParams(), tmp_path / "s")
    plan = plan_precision(fragile, digits, report, PrecisionParams(max_drop_points=1.0, **FAST), QatParams())
    assert plan.meets_budget
    assert plan.float_layers == ["features.2.conv.2"]
    assert [c.reverted for c in plan.candidates] == [None, "features.2.conv.2"]
    assert plan.candidates[0].val_accuracy < 0.5 and not plan.candidates[0].meets_budget

    # Pinning the fragile layer to int8 leaves no plan within the budget: said, not hidden.
    with pytest.warns(UserWarning, match="no plan meets the budget"):
        pinned = plan_precision(fragile, digits, report,
                                PrecisionParams(max_drop_points=1.0, pinned={"features.2.conv.2": "int8"}, **FAST),
                                QatParams())
    assert not pinned.meets_budget and pinned.layers["features.2.conv.2"] == "int8"


def test_pinned_layers_and_relative_budget(trained, digits, report):
    params = PrecisionParams(max_drop_relative=0.5, pinned={"features.1": "float", "classifier.1": "float"}, **FAST)
    plan = plan_precision(trained, digits, report, params, QatParams())
    assert plan.allowed_drop == pytest.approx(0.5 * plan.fp32_val_accuracy)
    assert plan.meets_budget
    # A block pins every layer inside it.
    assert {"features.1.conv.0", "features.1.conv.1", "classifier.1"} <= set(plan.float_layers)
    with pytest.raises(ConfigError, match="features.99"):
        plan_precision(trained, digits, report, PrecisionParams(pinned={"features.99": "float"}), QatParams())


def test_candidates_latency_and_pareto_plot(trained, digits, report, tmp_path):
    params = PrecisionParams(max_drop_points=0.0, frontier_steps=3, compare_strategies=True, measure_candidates=True)
    plan = plan_precision(trained, digits, report, params, QatParams(), latency_runs=10)
    assert {c.strategy for c in plan.candidates} == {"latency_aware", "accuracy_only"}
    for candidate in plan.candidates:
        assert candidate.predicted_latency_ms is not None and candidate.measured_latency_ms is not None
        assert candidate.measured_latency_ms > 0
    chosen = next(c for c in plan.candidates if c.strategy == "latency_aware" and c.meets_budget)
    assert plan.float_layers == chosen.float_layers  # the first plan of the chain within the budget
    assert plan.measured_latency_ms == chosen.measured_latency_ms
    assert len(plan_rows(plan)) == len(plan.candidates)
    pareto_figure(plan).savefig(tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").stat().st_size > 10_000
    assert PrecisionPlan.model_validate_json(plan.model_dump_json()) == plan


def test_pareto_front():
    points = [(1.0, 0.90), (2.0, 0.95), (1.5, 0.89), (3.0, 0.95), (0.5, 0.80)]
    assert pareto_front(points) == [(0.5, 0.80), (1.0, 0.90), (2.0, 0.95)]


def test_config_sections_have_defaults_and_say_what_is_wrong():
    params = parse_params({})
    assert isinstance(params, Params)
    assert params.precision.allowed_drop(0.98) == pytest.approx(0.005)  # half a point by default
    assert params.sensitivity.enabled and params.ptq.enabled and not params.distillation.enabled
    with pytest.raises(ConfigError, match="precision"):
        parse_params({"precision": {"max_drop_points": 1, "max_drop_relative": 0.01}})
    with pytest.raises(ConfigError, match="teacher"):
        parse_params({"distillation": {"enabled": True}})
    with pytest.raises(ConfigError, match="unknown key"):
        parse_params({"sensitivity": {"max_sample": 10}})
    with pytest.raises(ConfigError, match="pinned"):
        parse_params({"precision": {"pinned": {"features.0": "int4"}}})
