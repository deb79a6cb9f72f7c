"""Detection telemetry: what a detector's answers look like in one window, and the drift of it.

A classifier's window carries its predicted classes and top-1 confidence; a detector's carries, in the
same fields so the collector, the fleet aggregates and the rollout controller read it unchanged, the
class mix of its detections (`classes`) and their score histogram (`confidence`), and beside them a
`DetectionWindow`: frames, detections per frame (a histogram), the share of frames with none, and the box
sizes (sqrt of the area in input pixels, log2 bins). Drift compares all four with the reference a release
signs in (`detection_drift_reference`, from its own test split): PSI of classes, scores, detections per
frame and box sizes; the score is the largest.

    >>> summary = summarize(packed)                    # one answer's counts
    >>> reference = detection_drift_reference(packed_test_outputs, version="7")

No torch, TensorFlow, MLflow or Prefect here.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgeship.device.detections import unpack

PER_FRAME_BINS = 17  # 0, 1, ..., 15 detections, and 16 or more
BOX_SIZE_EDGES_PX = tuple(2.0 ** i for i in range(1, 11))  # sqrt(area): < 2, 2-4, ..., 512-1024, >= 1024 px
CONFIDENCE_BINS = 10


class DetectionWindow(BaseModel):
    """A window of a detector's answers (wire record: unknown fields ignored)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    frames: int = 0
    detections: int = 0
    empty_frames: int = 0
    per_frame: list[int] = Field(default_factory=lambda: [0] * PER_FRAME_BINS)  # frames with n detections
    box_sizes: list[int] = Field(default_factory=lambda: [0] * (len(BOX_SIZE_EDGES_PX) + 1))

    @property
    def empty_share(self) -> float | None:
        return self.empty_frames / self.frames if self.frames else None

    @property
    def per_frame_mean(self) -> float | None:
        return self.detections / self.frames if self.frames else None


class Summary:
    """Counts of a batch of answers, to add into a window."""

    def __init__(self, packed: np.ndarray):
        scores, classes, sizes, counts = [], [], [], []
        for boxes, frame_scores, frame_classes in unpack(packed):
            counts.append(len(frame_scores))
            scores.append(frame_scores)
            classes.append(frame_classes)
            sides = np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None))
            sizes.append(sides)
        scores = np.concatenate(scores) if scores else np.zeros(0)
        classes = np.concatenate(classes).astype(np.int64) if classes else np.zeros(0, np.int64)
        sizes = np.concatenate(sizes) if sizes else np.zeros(0)
        self.frames, self.detections = len(counts), int(sum(counts))
        self.empty = int(sum(1 for c in counts if c == 0))
        self.per_frame = np.bincount(np.minimum(counts, PER_FRAME_BINS - 1), minlength=PER_FRAME_BINS) \
            if counts else np.zeros(PER_FRAME_BINS, np.int64)
        self.confidence = np.bincount(np.minimum((scores * CONFIDENCE_BINS).astype(int), CONFIDENCE_BINS - 1),
                                      minlength=CONFIDENCE_BINS)
        self.classes = np.bincount(classes) if len(classes) else np.zeros(0, np.int64)
        self.box_sizes = np.bincount(np.searchsorted(BOX_SIZE_EDGES_PX, sizes, side="right"),
                                     minlength=len(BOX_SIZE_EDGES_PX) + 1)

    def added_to(self, window: DetectionWindow | None) -> DetectionWindow:
        window = window or DetectionWindow()
        return DetectionWindow(frames=window.frames + self.frames, detections=window.detections + self.detections,
                               empty_frames=window.empty_frames + self.empty,
                               per_frame=(np.asarray(window.per_frame) + self.per_frame).tolist(),
                               box_sizes=(np.asarray(window.box_sizes) + self.box_sizes).tolist())


def summarize(packed: np.ndarray) -> Summary:
    return Summary(np.asarray(packed))


def detection_drift_reference(packed: np.ndarray, num_classes: int | None = None, version: str | None = None) -> dict:
    """The reference a detection release carries (DriftReference fields): the class mix and score histogram of its
    detections on the test split, and its detections per frame and box sizes."""
    summary = summarize(packed)
    classes = summary.classes
    if num_classes is not None and len(classes) < num_classes:
        classes = np.pad(classes, (0, num_classes - len(classes)))
    share = lambda counts: (np.asarray(counts, np.float64) / max(float(np.sum(counts)), 1.0)).tolist()  # noqa: E731
    return {"task": "detection", "classes": int(len(classes)), "class_distribution": share(classes),
            "confidence_histogram": share(summary.confidence), "per_frame_histogram": share(summary.per_frame),
            "box_size_histogram": share(summary.box_sizes), "samples": summary.frames, "version": version}
