"""int8 where it pays: the plan keeps float a layer that runs faster in float when accuracy does not need int8
there (the costs come from the sensitivity report's ONNX Runtime profile; here they are set, so the decision
is what is tested, not this machine's timing). The gate side is in tests/test_gate.py.
"""

from __future__ import annotations

import pytest
import torch

from edgeship.config import PrecisionParams, QatParams, SensitivityParams
from edgeship.tasks.precision_plan import plan_precision
from edgeship.tasks.sensitivity import analyze_sensitivity
from tiny_quantization import digits, trained  # noqa: F401  (fixtures)

torch.set_num_threads(1)
FAST = {"compare_strategies": False, "frontier_steps": 0, "measure_candidates": False}


@pytest.fixture(scope="module")
def costed(trained, digits, tmp_path_factory):  # noqa: F811
    """A sensitivity report in which the first layer is 20% of the model faster in float, the others slower."""
    report = analyze_sensitivity(trained, digits, SensitivityParams(latency=False, converse=False), QatParams(),
                                 tmp_path_factory.mktemp("sensitivity"))
    first = report.layers[0].layer
    layers = [s.model_copy(update={"revert_cost_ms": -0.2 if s.layer == first else 0.05, "int8_ms": 0.3,
                                   "float_ms": 0.1 if s.layer == first else 0.2}) for s in report.layers]
    return report.model_copy(update={"layers": layers, "int8_latency_ms": 1.0, "fp32_latency_ms": 1.5}), first


def test_a_layer_slower_in_int8_stays_float_when_accuracy_allows(trained, digits, costed):  # noqa: F811
    report, first = costed
    loose = PrecisionParams(max_drop_points=100.0, **FAST)  # accuracy needs no layer float
    plan = plan_precision(trained, digits, report, loose, QatParams())
    assert plan.float_layers == [first]
    assert plan.predicted_latency_ms == pytest.approx(0.8)


def test_the_revert_can_be_turned_off_and_a_pin_to_int8_wins(trained, digits, costed):  # noqa: F811
    report, first = costed
    off = PrecisionParams(max_drop_points=100.0, revert_faster_in_float=False, **FAST)
    assert plan_precision(trained, digits, report, off, QatParams()).float_layers == []
    pinned = PrecisionParams(max_drop_points=100.0, pinned={first: "int8"}, **FAST)
    assert plan_precision(trained, digits, report, pinned, QatParams()).float_layers == []
