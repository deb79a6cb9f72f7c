"""The detection task: COCO/YOLO data, the detection loss, decode + NMS, mAP@0.5:0.95, IoU-matched agreement.

Outputs are packed detections everywhere (edgeship.device.detections): the fp32 reference is the torch model,
`Decode` and the one numpy NMS; an artifact answers through its runtime adapter and its DetectionOutputs
(NMS in the graph where the runtime has it). mAP comes from pycocotools against the prepared boxes.

    >>> task = Detection()
    >>> scores = task.score(task.run(artifact, images), data, "test")      # {"map": ..., "map50": ...}
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeship.records import CompiledArtifact, EvaluationResult, PreparedData, TrainedModel


class Detection:
    name = "detection"
    metric = "map"
    metric_label = "mAP@0.5:0.95"
    golden = "detections"

    def prepare(self, raw_dir: Path, out_dir: Path, params) -> PreparedData:
        from edgeship.errors import DataError
        from edgeship.tasks.detection.data import prepare_detection

        if params.format == "folders":
            raise DataError("data.format 'folders' is class folders, for classification; a detector reads COCO "
                            "(format: coco) or YOLO (format: yolo) annotations, or set task: classification")
        return prepare_detection(raw_dir, out_dir, params)

    def train(self, data: PreparedData, params, out_dir: Path, on_epoch=None) -> TrainedModel:
        from edgeship.tasks.detection.train import train_detector

        return train_detector(data, params, out_dir, on_epoch=on_epoch)

    def exportable(self, trained: TrainedModel):
        from edgeship.tasks.detection.decode import DecodedDetector
        from edgeship.tasks.train import load_model

        return DecodedDetector(load_model(trained), _head(trained)).eval()

    def reference(self, trained: TrainedModel, data: PreparedData, split: str = "test") -> np.ndarray:
        from edgeship.tasks.data import load_split
        from edgeship.tasks.detection.train import predict_detections
        from edgeship.tasks.train import load_model

        images, _ = load_split(data, split)
        return predict_detections(load_model(trained), _head(trained), images)

    def run(self, artifact: CompiledArtifact, images: np.ndarray, threads: int = 0) -> np.ndarray:
        from edgeship.device.detections import open_model
        from edgeship.errors import ModelLoadError
        from edgeship.tasks.host_check import run_batches

        if artifact.postprocess is None:
            raise ModelLoadError(f"{artifact.target}'s artifact does not say how its outputs become detections (no "
                                 f"postprocess); compile it again with task: detection")
        return run_batches(open_model(artifact.runtime, artifact.path, threads=threads,
                                      postprocess=artifact.postprocess), images, flatten=False)

    def score(self, outputs: np.ndarray, data: PreparedData, split: str = "test") -> dict[str, float]:
        from edgeship.tasks.detection.data import load_targets
        from edgeship.tasks.detection.metric import mean_average_precision

        _, targets = load_targets(data, split)
        return mean_average_precision(outputs, targets[:len(outputs)], len(data.classes))

    def agreement(self, outputs: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        from edgeship.device.detections import agreement

        matched, score_diff = agreement(outputs, reference)
        return {"matched_fraction": matched, "score_diff": score_diff}

    def validation_batch(self, data: PreparedData, path: Path, limit: int | None) -> int:
        """The test images only: the boxes stay with the pipeline, which scores the detections the device returns."""
        from edgeship.tasks.data import load_split

        images, _ = load_split(data, "test")
        np.savez(path, x=images[:limit].astype(np.float32, copy=False))
        return len(images[:limit])

    def score_device(self, result: EvaluationResult, batch) -> dict[str, float] | str:
        """mAP of a device's detections against the prepared boxes of the images it was sent."""
        from edgeship.device.detections import repack
        from edgeship.tasks.data import read_prepared
        from edgeship.tasks.detection.metric import mean_average_precision

        if result.detections is None:
            return ("the device answered no detections: its edgeship is older than this release's detection "
                    "support; upgrade edgeship[device] there")
        if len(result.detections) != batch.samples:
            return f"on-device evaluation returned detections for {len(result.detections)} of {batch.samples} images"
        with np.load(batch.truth) as arrays:
            boxes, classes, owner = arrays["boxes"], arrays["classes"], arrays["owner"]
        targets = [(boxes[owner == i], classes[owner == i]) for i in range(batch.samples)]
        num_classes = len(read_prepared(Path(batch.truth).parent).classes)
        widest = max([len(rows) for rows in result.detections] + [1])
        return mean_average_precision(repack(result.detections, widest), targets, num_classes)


def _head(trained: TrainedModel):
    from edgeship.errors import ModelLoadError

    if trained.detection is None:
        raise ModelLoadError(f"the trained model {trained.checkpoint} says nothing of its detection head; train it "
                             f"again with task: detection")
    return trained.detection
