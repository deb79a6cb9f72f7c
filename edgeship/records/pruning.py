"""The pruning stage's records: each candidate ratio as measured, and the search that chose one."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from edgeship.records.base import Record
from edgeship.records.pipeline import TrainedModel


class PruningCandidate(Record):
    """One pruning ratio, pruned and fine-tuned: its size, cost, accuracy and ONNX Runtime latency."""

    ratio: float
    importance: str
    params: int
    macs: int
    bytes: int  # its fp32 ONNX file
    val_accuracy: float
    test_accuracy: float
    latency_ms: float | None = None  # fp32 ONNX on ONNX Runtime, 1 thread, median
    speedup: float | None = None  # the unpruned model's latency over this one's
    meets_budget: bool = False
    checkpoint: Path | None = None


class PruningReport(Record):
    """The pruning search: every candidate, the chosen one and the pruned architecture."""

    importance: str
    scope: str
    allowed_drop_points: float
    baseline: PruningCandidate  # ratio 0: the model as trained
    candidates: list[PruningCandidate]
    chosen_ratio: float  # 0.0: no candidate kept the budget, the unpruned model goes on
    meets_budget: bool
    architecture: dict[str, dict] = Field(default_factory=dict)  # module -> its pruned shape attributes
    model: TrainedModel  # what the next stage starts from

    @property
    def chosen(self) -> PruningCandidate:
        return next((c for c in self.candidates if c.ratio == self.chosen_ratio), self.baseline)
