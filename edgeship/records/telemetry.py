"""Telemetry wire records: what a device publishes each window and the fleet side reads.

Both sides import them from here (the device's `WindowAggregator` builds them, the collector, store and
rollout controller read them). Wire records ignore fields they do not know and default the optional
ones they are not sent, so a newer device's records still parse in an older collector; `schema_version`
says which shape a record has.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime

import numpy as np
from pydantic import Field

from edgeship.records.base import WireRecord

SCHEMA_VERSION = 1
# Latency bucket upper edges in ms: geometric, 1.2x apart, 0.01 ms .. ~60 s, plus one overflow bucket.
# Fixed so that histograms from every device and every window add up bucket by bucket.
LATENCY_EDGES_MS: tuple[float, ...] = tuple(round(0.01 * 1.2 ** i, 6) for i in range(86))
CONFIDENCE_BINS = 10
DRIFT_TEST = "psi"


class Histogram(WireRecord):
    """Counts per fixed latency bucket (sparse: bucket index -> count); bucket i holds values <= edge i."""

    counts: dict[int, int] = Field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def quantile(self, q: float) -> float | None:
        """The q-quantile in ms: the upper edge of the bucket holding it (never below the true value)."""
        total = self.total
        if total == 0:
            return None
        rank, seen = math.ceil(q * total), 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return LATENCY_EDGES_MS[index] if index < len(LATENCY_EDGES_MS) else math.inf
        return math.inf

    def count_above(self, limit_ms: float) -> int:
        """Values certainly above `limit_ms` (in buckets whose lower edge is at or above it)."""
        lower = {i: (LATENCY_EDGES_MS[i - 1] if i > 0 else 0.0) for i in self.counts}
        return sum(c for i, c in self.counts.items() if lower[i] >= limit_ms)

    def count_possibly_above(self, limit_ms: float) -> int:
        """Values perhaps above `limit_ms` (in buckets whose upper edge is above it; the overflow bucket too)."""
        return sum(c for i, c in self.counts.items() if i >= len(LATENCY_EDGES_MS) or LATENCY_EDGES_MS[i] > limit_ms)

    def merged(self, other: Histogram) -> Histogram:
        counts = dict(self.counts)
        for index, count in other.counts.items():
            counts[index] = counts.get(index, 0) + count
        return Histogram(counts=counts)


def latency_bucket(latency_ms: float) -> int:
    """The bucket a latency falls in (the last index is the overflow bucket)."""
    return int(np.searchsorted(LATENCY_EDGES_MS, latency_ms, side="left"))


def merge_histograms(histograms: Iterable[Histogram]) -> Histogram:
    total = Histogram()
    for histogram in histograms:
        total = total.merged(histogram)
    return total


class DriftReference(WireRecord):
    """What the release's own test split looked like; signed into the channel entry (`drift_reference`)."""

    test: str = DRIFT_TEST
    classes: int
    class_distribution: list[float]       # share of test inputs predicted as each class
    confidence_histogram: list[float]     # share of test inputs per top-1 confidence bin (CONFIDENCE_BINS on [0, 1])
    samples: int = 0
    version: str | None = None            # the model version the reference was computed with


class DriftScore(WireRecord):
    test: str = DRIFT_TEST
    class_psi: float
    confidence_psi: float
    score: float                          # max of the two
    samples: int
    reference_version: str | None = None


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
    classes: list[int] = Field(default_factory=list)        # predicted-class counts
    drift: DriftScore | None = None
    shadow: ShadowStats | None = None
    events: list[TelemetryEvent] = Field(default_factory=list)
    sensors: dict[str, float] = Field(default_factory=dict)
    spool_dropped: int = 0                # records this device's spool ever had to drop (budget exceeded)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> TelemetryRecord:
        """Parse a published record; pydantic.ValidationError when it is not one."""
        return cls.model_validate_json(data)
