"""Label-free accuracy estimate per version: confidence-based performance estimation (NannyML's CBPE).

A calibrated classifier answering with top-1 confidence c is right with probability c, so its expected accuracy on
the answers it gave is the mean of their (calibrated) top-1 confidences: a shift that lowers the model's confidence
shows before any label arrives. Calibration comes from the release's own test split (signed into the channel entry
with the drift reference): `confidence_accuracy[b]`, the share of test inputs answered right among those whose
top-1 confidence fell in bin b (histogram binning, the CONFIDENCE_BINS bins of [0, 1] that telemetry counts). The
fleet estimate is then sum_b answers_b * confidence_accuracy_b / sum_b answers_b over the version's rolled-up
confidence counts. Without that calibration (a reference from before it), the mean top-1 confidence itself
(`method` "uncalibrated"): right for a calibrated model, optimistic for an over-confident one.

Like CBPE it assumes the shift is in the inputs, not in what a label means for an input (no concept shift);
labelled field accuracy (from the application's feedback) is what checks that.

    >>> estimate = estimated_accuracy(stats.sums, reference)
    >>> estimate.accuracy, estimate.method, estimate.answers
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict

from edgeship.records.telemetry import CONFIDENCE_BINS, DriftReference


class AccuracyEstimate(BaseModel):
    model_config = ConfigDict(frozen=True)
    accuracy: float
    method: str          # "cbpe" (calibrated on the release's test split) | "uncalibrated" (mean top-1 confidence)
    answers: int


def confidence_accuracy(outputs: np.ndarray, labels: np.ndarray) -> list[float | None]:
    """Per confidence bin, the share of these answers (class probabilities) that were right (None: empty bin)."""
    from edgeship.device.telemetry import confidence_bins, probabilities

    probs = probabilities(outputs)
    bins = confidence_bins(probs.max(axis=1))
    right = probs.argmax(axis=1) == np.asarray(labels).reshape(-1)
    return [round(float(right[bins == b].mean()), 6) if np.any(bins == b) else None for b in range(CONFIDENCE_BINS)]


def estimated_accuracy(sums, reference: DriftReference | None) -> AccuracyEstimate | None:
    """CBPE from a version's rollup sums (`confidence` counts, `confidence` histogram); None for a detector (its
    confidence is per detection, not per answer) or before any answer."""
    if reference is not None and reference.task != "classification" or sums.get("task.detection.frames"):
        return None
    counts = sums.vectors.get("confidence")
    answers = int(counts.sum()) if counts is not None else 0
    if not answers:
        return None
    calibration = reference.confidence_accuracy if reference is not None else None
    if calibration:
        midpoints = (np.arange(CONFIDENCE_BINS) + 0.5) / CONFIDENCE_BINS   # an empty test bin: its own confidence
        per_bin = np.array([midpoints[b] if calibration[b] is None else calibration[b]
                            for b in range(CONFIDENCE_BINS)])
        counts = np.pad(counts[:CONFIDENCE_BINS], (0, max(0, CONFIDENCE_BINS - len(counts))))
        return AccuracyEstimate(accuracy=round(float(counts @ per_bin / answers), 6), method="cbpe", answers=answers)
    histogram = sums.histograms.get("confidence")
    mean = histogram.mean() if histogram is not None and histogram.total else None
    if mean is None:
        mean = float(counts @ ((np.arange(len(counts)) + 0.5) / CONFIDENCE_BINS)) / answers
    return AccuracyEstimate(accuracy=round(float(mean), 6), method="uncalibrated", answers=answers)
