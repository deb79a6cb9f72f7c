"""Telemetry wire records: what a device publishes each window and the fleet side reads.

Both sides import them from here (the device's `WindowAggregator` builds them, the collector, store and
rollout controller read them). Wire records ignore fields they do not know and default the optional
ones they are not sent, so a newer device's records still parse in an older collector; `schema_version`
says which shape a record has.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import numpy as np
from pydantic import Field

from edgeship.records.base import WireRecord
from edgeship.records.histogram import (DEFAULT_SCALE, LEGACY_EDGES_MS, ExpHistogram, legacy_bucket,
                                        merge_all)

SCHEMA_VERSION = 2   # 2: exponential histograms (edgeship.records.histogram); 1: fixed 1.2x latency buckets
LATENCY_EDGES_MS = LEGACY_EDGES_MS   # schema 1's bucket edges, still read
CONFIDENCE_BINS = 10
DRIFT_TEST = "psi"


class Histogram(WireRecord):
    """A histogram as it travels: OpenTelemetry's exponential buckets (`scale`, `offset`, dense `buckets`,
    `zero_count`), or, in a schema 1 record, `counts` per fixed bucket (index -> count, bucket i holding
    values <= LATENCY_EDGES_MS[i]). Both read through `sketch()`; the methods below are shortcuts to it."""

    counts: dict[int, int] = Field(default_factory=dict)   # schema 1 fixed buckets
    scale: int | None = None
    offset: int = 0
    buckets: list[int] = Field(default_factory=list)
    zero_count: int = 0

    @classmethod
    def of(cls, values: Iterable[float], scale: int = DEFAULT_SCALE) -> Histogram:
        return cls.from_sketch(ExpHistogram.of(values, scale))

    @classmethod
    def from_sketch(cls, sketch: ExpHistogram) -> Histogram:
        trimmed = sketch.trimmed()
        return cls(scale=trimmed.scale, offset=trimmed.offset, buckets=trimmed.counts.tolist(),
                   zero_count=trimmed.zero, counts=dict(trimmed.legacy))

    def sketch(self) -> ExpHistogram:
        """The histogram as numpy counts, ready to merge and read."""
        return ExpHistogram(self.scale if self.scale is not None else DEFAULT_SCALE, self.offset,
                            np.asarray(self.buckets, dtype=np.int64), self.zero_count, self.counts)

    @property
    def total(self) -> int:
        return sum(self.buckets) + self.zero_count + sum(self.counts.values())

    def quantile(self, q: float) -> float | None:
        return self.sketch().quantile(q)

    def count_above(self, limit_ms: float) -> int:
        return self.sketch().count_above(limit_ms)

    def count_possibly_above(self, limit_ms: float) -> int:
        return self.sketch().count_possibly_above(limit_ms)


def latency_bucket(latency_ms: float) -> int:
    """Schema 1: the fixed bucket a latency falls in (the last index is the overflow bucket)."""
    return legacy_bucket(latency_ms)


def merge_histograms(histograms: Iterable[Histogram]) -> ExpHistogram:
    """The sum of wire histograms, as one numpy histogram."""
    return merge_all(h.sketch() for h in histograms)


class DriftReference(WireRecord):
    """What the release's own test split looked like; signed into the channel entry (`drift_reference`).

    A detector's (task "detection") holds its detections' class mix and score histogram in the same fields,
    and the shares of frames per detection count and of detections per box size (edgeship.device.telemetry_detection)."""

    test: str = DRIFT_TEST
    classes: int
    class_distribution: list[float]       # share of test inputs predicted as each class
    confidence_histogram: list[float]     # share of test inputs per top-1 confidence bin (CONFIDENCE_BINS on [0, 1])
    samples: int = 0
    version: str | None = None            # the model version the reference was computed with
    task: str = "classification"
    per_frame_histogram: list[float] | None = None  # detection: share of frames per detection count
    box_size_histogram: list[float] | None = None   # detection: share of detections per box size bin
    # Share of test inputs answered right per top-1 confidence bin (None where a bin is empty): the calibration the
    # label-free accuracy estimate reads (edgeship.fleet.estimate); absent in references before it.
    confidence_accuracy: list[float | None] | None = None


class DriftScore(WireRecord):
    test: str = DRIFT_TEST
    class_psi: float
    confidence_psi: float
    score: float                          # max of the two (of the four for a detector)
    samples: int
    reference_version: str | None = None
    per_frame_psi: float | None = None    # detection: detections per frame
    box_size_psi: float | None = None     # detection: box sizes


class ShadowStats(WireRecord):
    """How the shadow model compared with the active one on the inputs it saw this window."""

    version: str | None = None
    samples: int = 0
    agreements: int = 0                   # top-1 equal to the active model's
    confidence_diff_sum: float = 0.0      # sum over samples of |shadow top-1 conf - active top-1 conf|
    latency: Histogram = Field(default_factory=Histogram)
    skipped: int = 0                      # sampled inputs dropped because the shadow queue was full
    errors: int = 0

    @property
    def agreement(self) -> float | None:
        return self.agreements / self.samples if self.samples else None


class LabelledAnswers(WireRecord):
    """The application's ground truth this window for answers one version gave (whenever it gave them):
    edgeship.device.feedback counts them, edgeship.fleet.field_accuracy rolls them up."""

    version: str
    labelled: int = 0
    correct: int = 0                      # the answer's top-1 class was the true label
    by_class: list[int] = Field(default_factory=list)          # labelled answers per true class
    correct_by_class: list[int] = Field(default_factory=list)  # correct answers per true class
    delay_s_sum: float = 0.0              # sum over labels of (label received - answer given), seconds


class FieldSampleStats(WireRecord):
    """The device's field samples (edgeship.device.field_samples) this window; `pending*` as the window ends."""

    kept: int = 0                         # samples written to the device's sample spool
    uploaded: int = 0
    uploaded_bytes: int = 0
    dropped: int = 0                      # samples not kept or deleted unsent: over the day's byte budget
    upload_failures: int = 0
    pending: int = 0                      # waiting in the spool (bucket unreachable, or not yet sent)
    pending_bytes: int = 0


class TelemetryEvent(WireRecord):
    """An update event as the state directory's events.jsonl holds it (issue-9's UpdateEvent)."""

    at: datetime | None = None
    kind: str
    version: str | None = None
    target: str | None = None
    slot: str | None = None
    reason: str | None = None
    sequence: int = 0


class SlotVersions(WireRecord):
    active: str | None = None
    shadow: str | None = None
    fallback: str | None = None
    on_probation: bool = False


class DeviceIdentity(WireRecord):
    """Who is reporting: from the provisioned device.json, plus the device class the operator assigned."""

    device_id: str
    channel: str = "stable"
    target: str = "onnx-int8"
    model_name: str = ""
    device_class: str = "default"


class TelemetryRecord(WireRecord):
    """One device's window: everything the collector and the rollout controller read."""

    schema_version: int = SCHEMA_VERSION
    record_id: str                         # "<device_id>/<sequence>": the collector's de-duplication key
    device_id: str
    sequence: int
    channel: str = "stable"
    target: str = ""
    model_name: str = ""
    device_class: str = "default"
    window_start: datetime
    window_end: datetime
    versions: SlotVersions = Field(default_factory=SlotVersions)
    inferences: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = Field(default_factory=dict)
    fallback_inferences: int = 0
    fallback_activations: int = 0         # switches from the active model to the fallback this window
    latency: Histogram = Field(default_factory=Histogram)   # answers of the active model, ms
    confidence: list[int] = Field(default_factory=list)     # top-1 confidence, CONFIDENCE_BINS bins on [0, 1]
    confidence_histogram: Histogram | None = None           # top-1 confidence, exponential buckets (schema 2)
    classes: list[int] = Field(default_factory=list)        # predicted-class counts
    drift: DriftScore | None = None
    shadow: ShadowStats | None = None
    # The active model's answers against the model it replaced (the rollback slot), on a sampled share of inputs
    # (edgeship.device.shadow, as the shadow runs); `version` is the replaced model's.
    compared: ShadowStats | None = None
    events: list[TelemetryEvent] = Field(default_factory=list)
    sensors: dict[str, float] = Field(default_factory=dict)
    # Task telemetry (e.g. a detector's detections per frame, score and box-size distributions): named sums and
    # histograms, rolled up by name (edgeship.fleet.rollup) without a change to the store.
    sums: dict[str, float] = Field(default_factory=dict)
    histograms: dict[str, Histogram] = Field(default_factory=dict)
    spool_dropped: int = 0                # records this device's spool ever had to drop (budget exceeded)
    labels: list[LabelledAnswers] = Field(default_factory=list)   # ground truth the application sent this window
    field_samples: FieldSampleStats | None = None

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> TelemetryRecord:
        """Parse a published record; pydantic.ValidationError when it is not one."""
        return cls.model_validate_json(data)
