"""Detection telemetry: what a detector's answers look like in one window, and the drift of it.

A classifier's window carries its predicted classes and top-1 confidence; a detector's carries, in the
same fields so the collector, the fleet aggregates and the rollout controller read it unchanged, the
class mix of its detections (`classes`) and their score histogram (`confidence`, `confidence_histogram`),
and as task telemetry (the record's named `sums` and `histograms`, which the fleet rolls up by name):
frames, detections and empty frames, detections per frame and box sizes (sqrt of the area, input pixels).
Drift compares classes, scores, detections per frame and box sizes (fixed bins: PER_FRAME_BINS, log2
box-size bins) with the reference a release signs in (`detection_drift_reference`, from its own test
split): PSI of each; the score is the largest.

    >>> summary = summarize(packed)                    # one answer's counts
    >>> reference = detection_drift_reference(packed_test_outputs, version="7")

No torch, TensorFlow, MLflow or Prefect here.
"""

from __future__ import annotations

import numpy as np

from edgeship.device.detections import unpack
from edgeship.records.histogram import ExpHistogram
from edgeship.records.telemetry import CONFIDENCE_BINS, Histogram

PER_FRAME_BINS = 17  # 0, 1, ..., 15 detections, and 16 or more
BOX_SIZE_EDGES_PX = tuple(2.0 ** i for i in range(1, 11))  # sqrt(area): < 2, 2-4, ..., 512-1024, >= 1024 px
SUMS = ("detection.frames", "detection.detections", "detection.empty_frames")
HISTOGRAMS = ("detection.per_frame", "detection.box_size_px")


class DetectionWindow:
    """A window of a detector's answers: counts in the fixed bins drift compares, and exponential histograms of
    detections per frame and box sizes for the fleet's rollups."""

    def __init__(self):
        self.frames = self.detections = self.empty_frames = 0
        self.per_frame = np.zeros(PER_FRAME_BINS, np.int64)
        self.box_sizes = np.zeros(len(BOX_SIZE_EDGES_PX) + 1, np.int64)
        self.per_frame_exp, self.box_size_exp = ExpHistogram(), ExpHistogram()

    @property
    def empty_share(self) -> float | None:
        return self.empty_frames / self.frames if self.frames else None

    def as_record_fields(self) -> dict:
        """The TelemetryRecord fields it fills: named sums and histograms."""
        return {"sums": dict(zip(SUMS, (float(self.frames), float(self.detections), float(self.empty_frames)))),
                "histograms": {HISTOGRAMS[0]: Histogram.from_sketch(self.per_frame_exp),
                               HISTOGRAMS[1]: Histogram.from_sketch(self.box_size_exp)}}


class Summary:
    """Counts of a batch of answers, to add into a window."""

    def __init__(self, packed: np.ndarray):
        scores, classes, sizes, counts = [], [], [], []
        for boxes, frame_scores, frame_classes in unpack(packed):
            counts.append(len(frame_scores))
            scores.append(frame_scores)
            classes.append(frame_classes)
            sizes.append(np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None)
                                 * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)))
        self.scores = np.concatenate(scores) if scores else np.zeros(0)
        classes = np.concatenate(classes).astype(np.int64) if classes else np.zeros(0, np.int64)
        self.sizes = np.concatenate(sizes) if sizes else np.zeros(0)
        self.counts = np.asarray(counts, np.int64)
        self.frames, self.detections = len(counts), int(self.counts.sum())
        self.empty = int((self.counts == 0).sum())
        self.per_frame = np.bincount(np.minimum(self.counts, PER_FRAME_BINS - 1), minlength=PER_FRAME_BINS)
        self.confidence = np.bincount(np.minimum((self.scores * CONFIDENCE_BINS).astype(int), CONFIDENCE_BINS - 1),
                                      minlength=CONFIDENCE_BINS)
        self.classes = np.bincount(classes) if len(classes) else np.zeros(0, np.int64)
        self.box_sizes = np.bincount(np.searchsorted(BOX_SIZE_EDGES_PX, self.sizes, side="right"),
                                     minlength=len(BOX_SIZE_EDGES_PX) + 1)

    def added_to(self, window: DetectionWindow | None) -> DetectionWindow:
        window = window or DetectionWindow()
        window.frames += self.frames
        window.detections += self.detections
        window.empty_frames += self.empty
        window.per_frame += self.per_frame
        window.box_sizes += self.box_sizes
        window.per_frame_exp.add(ExpHistogram.of(self.counts.astype(float)))
        if len(self.sizes):
            window.box_size_exp.add(ExpHistogram.of(self.sizes))
        return window


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
