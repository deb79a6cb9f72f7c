"""The `pruning` stage: prune at each candidate ratio, fine-tune, measure, keep the fastest within budget.

For every ratio in `pruning.search_ratios` (or the one `pruning.ratio`), the trained model is
pruned (edgeship.tasks.prune), fine-tuned with the training loop of the `train` stage
(`train.fit`; distilled from the unpruned model as teacher when `pruning.distill`), exported
to ONNX and timed on ONNX Runtime (1 thread, each run paired with one of the unpruned model,
so load on the machine cancels). The candidate with the lowest latency whose val accuracy is
within `pruning.max_drop_points` of the unpruned model's is chosen; when none is, the unpruned
model goes on and the report says the budget was not met. The chosen model is a TrainedModel
like any other (its checkpoint carries the pruned architecture, edgeship.models.pruned), so
sensitivity, the plan, QAT and every target start from it.

    >>> report = search_pruning(trained, data, PruningParams(search_ratios=[0.2, 0.3, 0.4]), TrainParams(),
    ...                         Path("build/pruning"))
    >>> report.chosen_ratio, report.chosen.speedup
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgeship.config import ModelParams, PruningParams, TrainParams
from edgeship.models.pruned import changed_structure
from edgeship.records import PreparedData, PruningCandidate, PruningReport, TrainedModel
from edgeship.tasks.data import load_split
from edgeship.tasks.prune import count_macs_params, prune_model
from edgeship.tasks.train import EpochCallback, fit, load_model, predict_logits, train_one_epoch

CandidateCallback = Callable[[PruningCandidate], None]


def search_pruning(trained: TrainedModel, data: PreparedData, params: PruningParams, train_params: TrainParams,
                   out_dir: Path, on_candidate: CandidateCallback | None = None,
                   on_epoch: EpochCallback | None = None) -> PruningReport:
    """Prune, fine-tune and measure each candidate ratio; return the report with the chosen model."""
    out_dir = Path(out_dir)
    original = load_model(trained)
    example = torch.zeros(1, *trained.input_shape)
    sample = load_split(data, "calibration")[0][:1].astype(np.float32)
    timer = _Timer(_export(original, trained, out_dir / "unpruned.onnx"), sample, params.latency_runs)
    baseline = _measure(original, trained, 0.0, params, out_dir / "unpruned.onnx", example, timer)
    baseline = baseline.model_copy(update={"meets_budget": True, "speedup": 1.0})
    if on_candidate:
        on_candidate(baseline)
    floor = trained.val_accuracy - params.max_drop_points / 100.0
    candidates: list[PruningCandidate] = []
    models: dict[float, TrainedModel] = {}
    for ratio in params.candidates():
        if ratio == 0:
            continue
        where = out_dir / f"ratio-{ratio:.2f}"
        pruned = prune_model(copy.deepcopy(original), example, params, ratio, taylor_batches(data, params))
        tuned = fine_tune(pruned, original, trained, data, params, train_params, where, on_epoch)
        candidate = _measure(load_model(tuned), tuned, ratio, params, where / "model_fp32.onnx", example, timer)
        speedup = baseline.latency_ms / candidate.latency_ms if baseline.latency_ms and candidate.latency_ms else None
        candidate = candidate.model_copy(update={"meets_budget": tuned.val_accuracy >= floor - 1e-9,
                                                 "speedup": speedup})
        candidates.append(candidate)
        models[ratio] = tuned
        if on_candidate:
            on_candidate(candidate)
    within = [c for c in candidates if c.meets_budget]
    chosen = min(within, key=lambda c: (c.latency_ms if c.latency_ms is not None else float("inf"), -c.ratio),
                 default=None)
    model = models[chosen.ratio] if chosen else trained
    architecture = changed_structure(load_model(model), original) if chosen else {}
    return PruningReport(importance=params.importance, scope=params.scope, allowed_drop_points=params.max_drop_points,
                         baseline=baseline, candidates=candidates, chosen_ratio=chosen.ratio if chosen else 0.0,
                         meets_budget=chosen is not None, architecture=architecture, model=model)


def fine_tune(pruned: torch.nn.Module, teacher: torch.nn.Module, trained: TrainedModel, data: PreparedData,
              params: PruningParams, train_params: TrainParams, out_dir: Path,
              on_epoch: EpochCallback | None = None) -> TrainedModel:
    """Fine-tune a pruned model with the `train` stage's loop; distilled from `teacher` when `params.distill`."""
    from edgeship.tasks.distill import train_one_epoch_distilled

    settings = train_params.model_copy(update={"epochs": params.fine_tune_epochs, "lr": params.fine_tune_lr})
    targets = None
    if params.distill:
        targets = teacher.eval() if settings.augment else torch.from_numpy(
            predict_logits(teacher, load_split(data, "train")[0]))

    def one_epoch(model, x, y, optimizer, generator, scheduler):
        if targets is None:
            return train_one_epoch(model, x, y, optimizer, settings.batch_size, generator, scheduler=scheduler,
                                   augment=settings.augment)
        return train_one_epoch_distilled(model, x, y, targets, optimizer, settings.batch_size, generator,
                                         params.distill_temperature, params.distill_alpha, scheduler=scheduler,
                                         augment=settings.augment)

    model_params = ModelParams(factory=trained.factory, kwargs=trained.factory_kwargs)
    return fit(data, model_params, settings, out_dir, one_epoch, on_epoch, model=pruned, teacher=trained.teacher)


def pruning_rows(report: PruningReport) -> list[dict]:
    """One row per ratio (the unpruned model first): size, MACs, accuracy, latency, verdict."""
    rows = []
    for c in [report.baseline, *report.candidates]:
        rows.append({"ratio": c.ratio, "importance": c.importance if c.ratio else "-", "params": c.params,
                     "macs": c.macs, "kB": round(c.bytes / 1e3, 1), "val_accuracy": round(c.val_accuracy, 4),
                     "drop_pts": round(100 * (report.baseline.val_accuracy - c.val_accuracy), 2),
                     "test_accuracy": round(c.test_accuracy, 4),
                     "latency_ms": None if c.latency_ms is None else round(c.latency_ms, 4),
                     "speedup": None if c.speedup is None else round(c.speedup, 3),
                     "within_budget": c.meets_budget, "chosen": c.ratio == report.chosen_ratio})
    return rows


def pruning_figure(report: PruningReport):
    """Val accuracy, ONNX Runtime latency, and MACs/size relative to the unpruned model, against the ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [report.baseline, *report.candidates]
    ratios = [c.ratio for c in points]
    figure, (accuracy, latency, cost) = plt.subplots(1, 3, figsize=(13, 3.8))
    accuracy.plot(ratios, [100 * c.val_accuracy for c in points], "o-")
    accuracy.axhline(100 * report.baseline.val_accuracy - report.allowed_drop_points, color="red", ls="--",
                     label="budget")
    accuracy.set(xlabel="channels removed", ylabel="val accuracy (%)", title="accuracy after fine-tuning")
    accuracy.legend()
    latency.plot(ratios, [c.latency_ms for c in points], "o-")
    latency.set(xlabel="channels removed", ylabel="ms (ONNX Runtime fp32, 1 thread)", title="latency")
    for label, values in (("MACs", [c.macs for c in points]), ("params", [c.params for c in points]),
                          ("bytes", [c.bytes for c in points])):
        cost.plot(ratios, [v / values[0] for v in values], "o-", label=label)
    cost.set(xlabel="channels removed", ylabel="relative to unpruned", title="size and compute")
    cost.legend()
    for axis in (accuracy, latency, cost):
        axis.axvline(report.chosen_ratio, color="green", alpha=0.3, lw=6)
    figure.suptitle(f"pruning ({report.importance}, {report.scope}): chosen ratio {report.chosen_ratio:g}"
                    + ("" if report.meets_budget else " (no candidate within budget)"))
    figure.tight_layout()
    return figure


def _measure(model: torch.nn.Module, trained: TrainedModel, ratio: float, params: PruningParams, onnx_path: Path,
             example: torch.Tensor, timer: "_Timer") -> PruningCandidate:
    macs, n_params = count_macs_params(model, example)
    path = onnx_path if onnx_path.is_file() else _export(model, trained, onnx_path)
    return PruningCandidate(ratio=ratio, importance=params.importance, params=n_params, macs=macs,
                            bytes=path.stat().st_size, val_accuracy=trained.val_accuracy,
                            test_accuracy=trained.test_accuracy, latency_ms=timer.latency(path),
                            checkpoint=trained.checkpoint)


def _export(model: torch.nn.Module, trained: TrainedModel, path: Path) -> Path:
    from edgeship.tasks.compile.onnx import export_onnx

    return export_onnx(model, trained.input_shape, path)


class _Timer:
    """ONNX Runtime latency of each candidate, every run paired with one of the unpruned model."""

    def __init__(self, baseline: Path, sample: np.ndarray, runs: int):
        from edgeship.tasks.sensitivity import LatencyProbe

        self._probe = LatencyProbe(baseline, sample, runs)

    def latency(self, path: Path) -> float:
        return self._probe.compare(path)[0]


def taylor_batches(data: PreparedData, params: PruningParams, batch_size: int = 64):
    if params.importance != "taylor":
        return []
    x, y = (torch.from_numpy(a) for a in load_split(data, "train"))
    return [(x[i:i + batch_size], y[i:i + batch_size].long())
            for i in range(0, min(len(x), batch_size * params.taylor_batches), batch_size)]
