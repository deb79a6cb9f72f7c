"""The classification task: class folders, cross-entropy, logits, top-1 accuracy (the default `task:`).

Each method is the stage code it always was (edgeship.tasks.data, .train, the host check's comparison),
behind the task protocol of edgeship.tasks.kinds.

    >>> task = Classification()
    >>> task.score(task.run(artifact, images), data, "test")["accuracy"]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeship.records import CompiledArtifact, EvaluationResult, PreparedData, TrainedModel


class Classification:
    name = "classification"
    metric = "accuracy"
    metric_label = "top-1 accuracy"
    golden = "logits"

    def prepare(self, raw_dir: Path, out_dir: Path, params) -> PreparedData:
        from edgeship.errors import DataError
        from edgeship.tasks.data import prepare

        if params.format not in ("auto", "folders"):
            raise DataError(f"data.format '{params.format}' is a detection format; classification reads class "
                            f"folders (format: folders), or set task: detection")
        return prepare(raw_dir, out_dir, params)

    def train(self, data: PreparedData, params, out_dir: Path, on_epoch=None) -> TrainedModel:
        from edgeship.tasks.train import train

        return train(data, params.model, params.train, out_dir, on_epoch=on_epoch)

    def exportable(self, trained: TrainedModel):
        from edgeship.tasks.train import load_model

        return load_model(trained)

    def reference(self, trained: TrainedModel, data: PreparedData, split: str = "test") -> np.ndarray:
        from edgeship.tasks.data import load_split
        from edgeship.tasks.train import load_model, predict_logits

        x, _ = load_split(data, split)
        return predict_logits(load_model(trained), x)

    def run(self, artifact: CompiledArtifact, images: np.ndarray, threads: int = 0) -> np.ndarray:
        from edgeship.device.runtimes import open_session
        from edgeship.tasks.host_check import run_batches

        return run_batches(open_session(artifact.runtime, artifact.path, threads=threads), images)

    def score(self, outputs: np.ndarray, data: PreparedData, split: str = "test") -> dict[str, float]:
        from edgeship.tasks.data import load_split

        _, labels = load_split(data, split)
        return {"accuracy": float((np.asarray(outputs).argmax(axis=1) == labels[:len(outputs)]).mean())}

    def agreement(self, outputs: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        return {"top1_agreement": float((outputs.argmax(axis=1) == reference.argmax(axis=1)).mean()),
                "max_abs_logit_diff": float(np.abs(outputs.astype(np.float64) - reference).max())}

    def validation_batch(self, data: PreparedData, path: Path, limit: int | None) -> int:
        """Write the test split (images and labels) as the .npz a device evaluates; return its size."""
        from edgeship.tasks.data import load_split

        images, labels = load_split(data, "test")
        np.savez(path, x=images[:limit].astype(np.float32, copy=False), y=labels[:limit].astype(np.int64, copy=False))
        return len(labels[:limit])

    def score_device(self, result: EvaluationResult, batch) -> dict[str, float] | str:
        """Top-1 accuracy of a device's predictions against the batch's labels (or why it cannot be scored)."""
        with np.load(batch.path) as arrays:
            labels = arrays["y"]
        predictions = np.asarray(result.predictions)
        if predictions.shape != labels.shape:
            return f"on-device evaluation returned {predictions.shape[0]} predictions for {labels.shape[0]} samples"
        return {"accuracy": float(np.mean(predictions == labels))}
