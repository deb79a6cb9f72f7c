"""The `precision plan` stage: which layers stay float so the int8 model keeps its accuracy budget.

Input: the sensitivity report, and the budget from params.yaml (`precision`: the
largest validation accuracy drop against fp32, in points or relative, and layers the
user pins to a precision). Output: a PrecisionPlan naming every layer's precision
("float" where int8 costs too much accuracy: ONNX Runtime has no int16 kernels to
fall back to), with its predicted validation accuracy and latency.

The search starts from every layer int8 (less the pinned-float ones, and the ones
that run faster in float than in int8 on the runtime), evaluates on the validation
split, and while the budget is not met reverts one layer to float and evaluates
again. Which layer (`strategy`):

- accuracy_only: the one whose revert reduces the output error most (largest SQNR gain
  of the logits), as OpenVINO NNCF's accuracy-aware quantization does;
- latency_aware (default): the one that buys the most SQNR per millisecond its float
  island costs on ONNX Runtime (`revert_cost_ms`, measured), among those that help.

Gains are re-ranked on the current plan when `rerank_after` reverts in a row did not
raise accuracy (`max_evaluations` caps the validation passes for large models). Every plan evaluated is a candidate; the accuracy/latency Pareto
frontier of the candidates (of both strategies) is plotted. The reverts form a chain
that does not depend on the budget, so a tighter budget always walks further down
the same chain: it never yields more int8 layers than a looser one.

    >>> plan = plan_precision(trained, data, report, PrecisionParams(max_drop_points=0.5), QatParams())
    >>> plan.float_layers, plan.predicted_val_accuracy, plan.meets_budget
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from edgeship.config import PrecisionParams, QatParams
from edgeship.errors import ConfigError
from edgeship.records import PlanCandidate, PrecisionPlan, PreparedData, SensitivityReport, TrainedModel
from edgeship.tasks.data import load_split
from edgeship.tasks.qat_plan import find_untraceable_modules, resolve_plan
from edgeship.tasks.sensitivity import (LatencyProbe, QuantSimulator, compare_logits, plan_latency,
                                        validation_subset)
from edgeship.tasks.train import load_model, predict_logits

StepCallback = Callable[[PlanCandidate], None]
_EPS = 1e-9


class _Search:
    """The state one search walks: the simulator, the validation images, and the measured costs."""

    def __init__(self, simulator: QuantSimulator, x: np.ndarray, y: np.ndarray, reference: np.ndarray,
                 costs: dict[str, float], probe: LatencyProbe | None, int8_onnx: Path | None,
                 members: dict[str, str], int8_latency: float | None):
        self.simulator, self.x, self.y, self.reference = simulator, x, y, reference
        self.costs, self.probe, self.int8_onnx, self.members = costs, probe, int8_onnx, members
        self.int8_latency = int8_latency
        self.evaluations = 0
        self.max_evaluations: int | None = None
        self._cache: dict[frozenset, tuple[float, float]] = {}

    def evaluate(self, floats: frozenset) -> tuple[float, float]:
        """(val accuracy, logits SQNR dB) with the layers in `floats` float and the others int8."""
        if floats not in self._cache:
            int8 = [n for n in self.simulator.names if n not in floats]
            result = compare_logits(self.reference, self.simulator.logits(self.x, int8), self.y)
            self._cache[floats] = (result.accuracy, result.sqnr_db)
            self.evaluations += 1
        return self._cache[floats]

    def out_of_evaluations(self, needed: int) -> bool:
        return self.max_evaluations is not None and self.evaluations + needed > self.max_evaluations

    def predicted_latency(self, floats: frozenset) -> float | None:
        if self.int8_latency is None or any(n not in self.costs for n in floats):
            return None
        return self.int8_latency + sum(self.costs[n] for n in floats)

    def measured_latency(self, floats: frozenset) -> float | None:
        if self.probe is None or self.int8_onnx is None:
            return None
        own, delta = plan_latency(self.probe, self.int8_onnx, floats, self.members)
        return self.int8_latency + delta if self.int8_latency is not None else own


def plan_precision(trained: TrainedModel, data: PreparedData, report: SensitivityReport, params: PrecisionParams,
                   qat_params: QatParams, max_samples: int | None = None, latency_runs: int = 40,
                   on_step: StepCallback | None = None) -> PrecisionPlan:
    """Search the mixed-precision plan that meets `params`' budget with the lowest latency.

    Raises:
        ConfigError: a pinned name is not a module of the model.
    """
    model = load_model(trained)
    modules = dict(model.named_modules())
    unknown = sorted(name for name in params.pinned if name not in modules or not name)
    if unknown:
        raise ConfigError(f"precision.pinned names module(s) {unknown} that the model does not have; use names "
                          f"from the sensitivity report, e.g. {[s.layer for s in report.layers[:3]]}")
    x, y = validation_subset(data, max_samples)
    calibration, _ = load_split(data, "calibration")
    reference = predict_logits(model, x)
    fp32_accuracy = compare_logits(reference, reference, y).accuracy
    allowed = params.allowed_drop(fp32_accuracy)
    simulator = QuantSimulator(model, calibration, qat_params)
    members = simulator.members
    pinned = resolve_plan(model, params.pinned, find_untraceable_modules(model), default=None)
    pinned_float = {n for n, p in pinned.items() if p == "float"} | set(simulator.float_only)
    pinned_int8 = {n for n, p in pinned.items() if p == "int8"} - set(simulator.float_only)

    costs = {s.layer: s.revert_cost_ms for s in report.layers if s.revert_cost_ms is not None}
    int8_onnx = report.int8_onnx if report.int8_onnx and Path(report.int8_onnx).is_file() else None
    probe = None
    if params.measure_candidates and int8_onnx is not None:
        probe = LatencyProbe(int8_onnx, calibration[:1].astype(np.float32), latency_runs)
    search = _Search(simulator, x, y, reference, costs, probe, int8_onnx, members, report.int8_latency_ms)
    search.max_evaluations = params.max_evaluations
    if 0 < allowed < 1.0 / len(y):
        warnings.warn(f"the budget ({100 * allowed:.2f} points) is finer than one of the {len(y)} validation images "
                      f"({100 / len(y):.2f} points): only plans that lose no image meet it, and reverts chase "
                      f"single-image noise; evaluate on more images (sensitivity.max_samples) or widen the budget",
                      stacklevel=2)

    start = set(pinned_float) & set(simulator.names)
    if params.revert_faster_in_float and report.int8_latency_ms:
        # Reverting these lowers latency by itself (beyond 2% of the model, to clear timing noise).
        threshold = -0.02 * report.int8_latency_ms
        start |= {n for n, cost in costs.items() if cost < threshold and n not in pinned_int8}
    movable = [n for n in simulator.names if n not in start and n not in pinned_int8]
    target = fp32_accuracy - allowed

    strategies = [params.strategy]
    if params.compare_strategies and costs:
        strategies.append("accuracy_only" if params.strategy == "latency_aware" else "latency_aware")
    chains, ends = {}, {}
    for strategy in strategies:
        ends[strategy], chains[strategy] = _walk(search, frozenset(start), movable, target, strategy,
                                                 params.rerank_after, params.frontier_steps,
                                                 on_step if strategy == params.strategy else None)
    chosen = ends[params.strategy]
    candidates = [c for strategy in strategies for c in chains[strategy]]
    if params.max_evaluations is not None and search.evaluations >= params.max_evaluations:
        warnings.warn(f"the plan search stopped at precision.max_evaluations={params.max_evaluations}", stacklevel=2)
    if not chosen.meets_budget:
        warnings.warn(f"no plan meets the budget of {100 * allowed:.2f} points: with {len(chosen.float_layers)} "
                      f"float layers the simulated val accuracy is {100 * chosen.val_accuracy:.2f}% against fp32 "
                      f"{100 * fp32_accuracy:.2f}%; QAT may still recover it (check the host check)", stacklevel=2)
    layers = {layer.name: "float" for layer in simulator.layers if layer.name in chosen.float_layers}
    layers.update({name: "float" for name in simulator.float_only})
    plan_layers = {name: layers.get(name, "int8") for name in _all_layers(simulator)}
    return PrecisionPlan(layers=plan_layers, fp32_val_accuracy=fp32_accuracy, allowed_drop=allowed,
                         predicted_val_accuracy=chosen.val_accuracy,
                         predicted_latency_ms=chosen.predicted_latency_ms,
                         measured_latency_ms=chosen.measured_latency_ms, int8_latency_ms=report.int8_latency_ms,
                         fp32_latency_ms=report.fp32_latency_ms, meets_budget=chosen.meets_budget,
                         strategy=params.strategy, pinned=dict(params.pinned), candidates=candidates,
                         evaluations=search.evaluations)


def _walk(search: _Search, start: frozenset, movable: list[str], target: float, strategy: str, rerank_after: int,
          extra_steps: int, on_step: StepCallback | None) -> tuple[PlanCandidate, list[PlanCandidate]]:
    """The chain of plans from `start`, reverting one layer at a time: (the first that reaches `target`, the chain).

    The chain goes `extra_steps` past that plan, for the accuracy/latency frontier only.
    """
    floats = start
    chain = [_candidate(search, floats, 0, strategy, target)]
    if on_step:
        on_step(chain[-1])
    chosen = chain[-1] if chain[-1].meets_budget else None
    gains, stalled, extra = None, 0, 0
    while chosen is None or extra < extra_steps:
        left = [n for n in movable if n not in floats]
        if not left or search.out_of_evaluations(1):
            break
        if gains is None or stalled >= rerank_after:
            if search.out_of_evaluations(len(left) + 1):
                if gains is None:
                    break
            else:
                gains, stalled = _gains(search, floats, left), 0
        layer = _pick(search, left, gains, strategy)
        floats = floats | {layer}
        chain.append(_candidate(search, floats, len(chain), strategy, target, layer))
        if on_step:
            on_step(chain[-1])
        stalled = stalled + 1 if chain[-1].val_accuracy <= chain[-2].val_accuracy + _EPS else 0
        if chosen is None and chain[-1].meets_budget:
            chosen = chain[-1]
        elif chosen is not None:
            extra += 1
    return (chosen or chain[-1]), chain


def _gains(search: _Search, floats: frozenset, left: list[str]) -> dict[str, tuple[float, float]]:
    """For each layer in `left`: (SQNR gain in dB, accuracy gain) of reverting it on top of `floats`."""
    accuracy, sqnr = search.evaluate(floats)
    gains = {}
    for name in left:
        reverted_accuracy, reverted_sqnr = search.evaluate(floats | {name})
        gains[name] = (reverted_sqnr - sqnr, reverted_accuracy - accuracy)
    return gains


def _pick(search: _Search, left: list[str], gains: Mapping[str, tuple[float, float]], strategy: str) -> str:
    """The next layer to revert: the largest output-error reduction (SQNR gain), per ms of float cost when
    latency-aware. Ties fall to model order, so the chain is deterministic."""
    def gain(name: str) -> float:
        return gains.get(name, (0.0, 0.0))[0]

    if strategy == "latency_aware" and all(n in search.costs for n in left):
        helping = [n for n in left if gain(n) > 0]
        if helping:
            # Costs under 1% of the model's latency are noise: they count as that 1%.
            floor = max(1e-4, 0.01 * (search.int8_latency or 0.0))
            return max(helping, key=lambda n: gain(n) / max(search.costs[n], floor))
    return max(left, key=gain)


def _candidate(search: _Search, floats: frozenset, step: int, strategy: str, target: float,
               reverted: str | None = None) -> PlanCandidate:
    accuracy, sqnr = search.evaluate(floats)
    ordered = [n for n in search.simulator.names if n in floats]
    return PlanCandidate(step=step, strategy=strategy, float_layers=ordered, reverted=reverted,
                         val_accuracy=accuracy, sqnr_db=sqnr,
                         predicted_latency_ms=search.predicted_latency(floats),
                         measured_latency_ms=search.measured_latency(floats),
                         meets_budget=accuracy >= target - _EPS)


def _all_layers(simulator: QuantSimulator) -> list[str]:
    seen = []
    for layer in simulator.members.values():
        if layer not in seen:
            seen.append(layer)
    return seen


def plan_rows(plan: PrecisionPlan) -> list[dict]:
    """One row per candidate plan (for a Prefect table artifact)."""
    return [{"strategy": c.strategy, "step": c.step, "float_layers": len(c.float_layers),
             "val_accuracy": round(c.val_accuracy, 4), "sqnr_db": round(c.sqnr_db, 2),
             "predicted_ms": None if c.predicted_latency_ms is None else round(c.predicted_latency_ms, 4),
             "measured_ms": None if c.measured_latency_ms is None else round(c.measured_latency_ms, 4),
             "meets_budget": c.meets_budget, "reverted": c.reverted or ""}
            for c in plan.candidates]


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (latency, accuracy) points no other point beats on both (lower latency, higher accuracy)."""
    front, best = [], -np.inf
    for latency, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if accuracy > best + _EPS:
            front.append((latency, accuracy))
            best = accuracy
    return front


def pareto_figure(plan: PrecisionPlan):
    """Accuracy against latency of every candidate plan, the Pareto frontier, the budget and the chosen plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=120)

    def latency(c: PlanCandidate) -> float | None:
        return c.measured_latency_ms if c.measured_latency_ms is not None else c.predicted_latency_ms

    markers = {"latency_aware": ("o", "tab:blue"), "accuracy_only": ("s", "tab:orange")}
    points = []
    for strategy, (marker, colour) in markers.items():
        chosen = [(latency(c), 100 * c.val_accuracy, len(c.float_layers)) for c in plan.candidates
                  if c.strategy == strategy and latency(c) is not None]
        if chosen:
            axis.plot([p[0] for p in chosen], [p[1] for p in chosen], marker=marker, color=colour, alpha=0.7,
                      linestyle="none", label=f"{strategy.replace('_', '-')} candidates")
            points += [(p[0], p[1]) for p in chosen]
    front = pareto_front(points)
    if front:
        axis.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", linewidth=1.2,
                  label="Pareto frontier")
    axis.axhline(100 * (plan.fp32_val_accuracy - plan.allowed_drop), color="tab:red", linestyle="--",
                 linewidth=1, label=f"budget (-{100 * plan.allowed_drop:.2f} pts)")
    axis.axhline(100 * plan.fp32_val_accuracy, color="grey", linestyle=":", linewidth=1, label="fp32")
    if plan.fp32_latency_ms is not None:
        axis.axvline(plan.fp32_latency_ms, color="grey", linestyle=":", linewidth=1)
    final = plan.measured_latency_ms if plan.measured_latency_ms is not None else plan.predicted_latency_ms
    if final is not None:
        axis.scatter([final], [100 * plan.predicted_val_accuracy], s=160, facecolors="none", edgecolors="tab:green",
                     linewidths=2, label=f"chosen ({len(plan.float_layers)} float)", zorder=5)
    axis.set_xlabel("latency on ONNX Runtime, 1 thread (ms; dotted: fp32)")
    axis.set_ylabel("val accuracy, simulated int8 (%)")
    axis.set_title("Mixed-precision candidates: accuracy vs latency")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    return figure
