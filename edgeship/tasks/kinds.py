"""What a model predicts (params.yaml `task:`): one small class per task, one protocol, one table.

Every stage asks the task, never which task it is: the data reader, training (loss, metric), the model a
target converts, how an artifact's outputs are read and scored, how two models' answers agree, and how a
device's answers are scored. Adding a task is one module implementing `Task` and a row in KNOWN_TASKS.

| task | data | loss | outputs | metric (gates) | agreement |
| --- | --- | --- | --- | --- | --- |
| classification | class folders | cross-entropy | logits | top-1 accuracy | top-1 agreement, max logit diff |
| detection | COCO JSON, YOLO txt | task-aligned GIoU + BCE | packed detections (decode + NMS) | mAP@0.5:0.95 (pycocotools) | IoU-matched fraction, score diff |

    >>> task = get_task(params.task)
    >>> data = task.prepare(raw_dir, out_dir, params.data)
    >>> metrics = task.score(task.run(artifact, images), data, "test")     # {"accuracy": ...} or {"map": ..., "map50": ...}
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from edgeship.errors import ConfigError

if TYPE_CHECKING:
    from edgeship.config import DataParams, Params
    from edgeship.records import CompiledArtifact, EvaluationResult, PreparedData, TrainedModel

EpochCallback = Callable[[int, dict[str, float]], None]

KNOWN_TASKS: dict[str, str] = {
    "classification": "edgeship.tasks.classification:Classification",
    "detection": "edgeship.tasks.detection.task:Detection",
}


class Task(Protocol):
    """The task protocol: what every stage asks."""

    name: str
    metric: str  # the key of the metric gates compare (points below fp32): "accuracy" or "map"
    metric_label: str  # how people call it: "top-1 accuracy", "mAP@0.5:0.95"
    golden: str  # what golden vectors compare: "logits" (top-1 and values) or "detections" (IoU-matched)

    def prepare(self, raw_dir: Path, out_dir: Path, params: "DataParams") -> "PreparedData":
        """Read and validate the raw data; write the splits (the DVC `prepare` stage)."""

    def train(self, data: "PreparedData", params: "Params", out_dir: Path,
              on_epoch: EpochCallback | None = None) -> "TrainedModel":
        """Train the float model; its val/test metric in `val_accuracy`/`test_accuracy`, others in `metrics`."""

    def exportable(self, trained: "TrainedModel"):
        """The torch module a target converts (a detector with its decode; a classifier as it is)."""

    def reference(self, trained: "TrainedModel", data: "PreparedData", split: str = "test") -> np.ndarray:
        """The fp32 torch model's outputs on a split, as the artifacts give them (logits, packed detections)."""

    def run(self, artifact: "CompiledArtifact", images: np.ndarray, threads: int = 0) -> np.ndarray:
        """The artifact's outputs for `images` on its runtime here (raises what the runtime raises)."""

    def score(self, outputs: np.ndarray, data: "PreparedData", split: str = "test") -> dict[str, float]:
        """The task's metrics of outputs on a split: `metric` and the others."""

    def agreement(self, outputs: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        """How outputs agree with the reference's (host check, golden vectors, shadow)."""

    def validation_batch(self, data: "PreparedData", path: Path, limit: int | None) -> int:
        """Write the test split (at most `limit` samples) as the .npz a device evaluates; return its size."""

    def score_device(self, result: "EvaluationResult", batch) -> dict[str, float] | str:
        """A device's evaluate answer on `batch` (edgeship.tasks.benchmark.ValidationBatch) scored, or why not."""


def get_task(name: str) -> Task:
    """The task registered as `name`."""
    if name not in KNOWN_TASKS:
        raise ConfigError(f"unknown task '{name}'; known tasks: {sorted(KNOWN_TASKS)}")
    module, _, cls = KNOWN_TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


def task_of(record) -> Task:
    """The task of a PreparedData or TrainedModel (records from before tasks existed are classification)."""
    return get_task(getattr(record, "task", "classification") or "classification")
