"""Rollups: what every rollout decision reads, kept as sums while telemetry arrives.

Everything the controller, `fleet status` and the drift check use adds up: counts, latency and confidence
histograms, class counts, shadow comparisons, errors, fallbacks, per-device event states. So each stored
record adds its `Sums` to two kinds of rows (Prometheus recording rules, TimescaleDB continuous aggregates):

    class rows   (channel, target, version, device class, time bucket)   fleet-wide numbers over time
    device rows  (channel, target, version, device, device class)        one row per device and version

A pass reads about one row per device whatever the rollout's length; raw records stay the source of truth
for a retention period and `FleetStore.replay()` rebuilds rollups from them when this definition changes
(bump ROLLUP_VERSION).

`Sums` holds named scalar sums, count vectors and exponential histograms; merging adds each by name. What a
record adds is written by a list of contributors (`CONTRIBUTORS`, each `(record, rows) -> None` adding to
`rows.of_class(version)` / `rows.of_device(version)`): adding a signal to telemetry is adding a contributor
that names its sums, not a new table or column. A record's own `sums` and `histograms` (task telemetry,
e.g. a detector's detections per frame) are rolled up as they are named.

    >>> rows = Rollups(bucket_s=300)
    >>> rows.add_record(record)
    >>> rows.classes[ClassKey("stable", "onnx-int8", "8", "pi4", bucket)].values["inferences"]
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from typing import Protocol
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from edgeship.fleet.rollup_compared import compared_answers
from edgeship.records.histogram import ExpHistogram, merge_many
from edgeship.records.telemetry import TelemetryRecord

ROLLUP_VERSION = 1
SEPARATOR = "\x1f"
# Event kinds that give a device a state for a version (FLEET_CONTRACT.md UpdateEvent), and those with a reason.
DEVICE_EVENTS = ("installed", "refused", "confirmed", "rolled_back")
REASON_EVENTS = ("refused", "rolled_back")


class Sums:
    """Named sums: scalars, count vectors (added element-wise) and histograms (merged bucket-wise).

    Vectors and histograms added one by one are kept aside and summed in one go when read (a batch adds
    hundreds of records to one class row: one numpy sum, not hundreds of merges)."""

    __slots__ = ("values", "_vectors", "_histograms", "_pending_vectors", "_pending_histograms")

    def __init__(self, values: dict[str, float] | None = None, vectors: dict[str, np.ndarray] | None = None,
                 histograms: dict[str, ExpHistogram] | None = None):
        self.values: dict[str, float] = values if values is not None else {}
        self._vectors: dict[str, np.ndarray] = vectors if vectors is not None else {}
        self._histograms: dict[str, ExpHistogram] = histograms if histograms is not None else {}
        self._pending_vectors: dict[str, list] = {}
        self._pending_histograms: dict[str, list[ExpHistogram]] = {}

    def count(self, name: str, amount: float = 1) -> None:
        if amount:
            self.values[name] = self.values.get(name, 0) + amount

    def vector(self, name: str, counts) -> None:
        if len(counts):
            self._pending_vectors.setdefault(name, []).append(counts)

    def histogram(self, name: str, histogram: ExpHistogram) -> None:
        if len(histogram.counts) or histogram.zero or histogram.legacy:
            self._pending_histograms.setdefault(name, []).append(histogram)

    @property
    def vectors(self) -> dict[str, np.ndarray]:
        for name, pending in self._pending_vectors.items():
            mine = self._vectors.get(name)
            width = max(max(len(p) for p in pending), len(mine) if mine is not None else 0)
            total = np.zeros(width, dtype=np.int64)
            if mine is not None:
                total[:len(mine)] += mine
            for counts in pending:
                total[:len(counts)] += counts
            if total.any():
                self._vectors[name] = total
        self._pending_vectors.clear()
        return self._vectors

    @property
    def histograms(self) -> dict[str, ExpHistogram]:
        for name, pending in self._pending_histograms.items():
            mine = self._histograms.get(name)
            self._histograms[name] = merge_many(([mine] if mine is not None else []) + pending)
        self._pending_histograms.clear()
        return self._histograms

    def add(self, other: Sums) -> None:
        """Add every sum of `other` to this one, in place."""
        for name, value in other.values.items():
            self.values[name] = self.values.get(name, 0) + value
        for name, counts in other.vectors.items():
            self.vector(name, counts)
        for name, histogram in other.histograms.items():
            self.histogram(name, histogram)

    def get(self, name: str) -> float:
        return self.values.get(name, 0)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sums):
            return NotImplemented
        mine, theirs = self.vectors, other.vectors
        return (self.values == other.values and self.histograms == other.histograms and mine.keys() == theirs.keys()
                and all(np.array_equal(np.trim_zeros(v, "b"), np.trim_zeros(theirs[k], "b")) for k, v in mine.items()))

    def __repr__(self) -> str:
        return f"Sums({self.values}, vectors={list(self.vectors)}, histograms={list(self.histograms)})"

    def to_json(self) -> str:
        return json.dumps({"s": self.values, "v": {k: v.tolist() for k, v in self.vectors.items()},
                           "h": {k: h.to_json() for k, h in self.histograms.items()}}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> Sums:
        if not text:
            return cls()
        data = json.loads(text)
        return cls(data.get("s", {}), {k: np.asarray(v, dtype=np.int64) for k, v in data.get("v", {}).items()},
                   {k: ExpHistogram.from_json(h) for k, h in data.get("h", {}).items()})


@dataclass(frozen=True, order=True)
class ClassKey:
    channel: str
    target: str
    version: str
    device_class: str
    bucket: datetime

    @property
    def id(self) -> str:
        return SEPARATOR.join((self.channel, self.target, self.version, self.device_class, self.bucket.isoformat()))


@dataclass(frozen=True, order=True)
class DeviceKey:
    channel: str
    target: str
    version: str
    device_id: str
    device_class: str

    @property
    def id(self) -> str:
        return SEPARATOR.join((self.channel, self.target, self.version, self.device_id, self.device_class))


@dataclass
class DeviceSums:
    """A device row: its sums for one version, and the first and last window that added to them."""

    sums: Sums = field(default_factory=Sums)
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    device_class: str = "default"

    def add(self, sums: Sums, first_seen: datetime | None, last_seen: datetime | None) -> None:
        self.sums.add(sums)
        self.seen(first_seen, last_seen)

    def seen(self, first_seen: datetime | None, last_seen: datetime | None) -> None:
        self.first_seen = min(filter(None, (self.first_seen, first_seen)), default=None)
        self.last_seen = max(filter(None, (self.last_seen, last_seen)), default=None)


class Rows(Protocol):
    """Where a contributor adds a record's sums: the class row or the device row of a version."""

    def of_class(self, version: str, target: str | None = None) -> Sums: ...

    def of_device(self, version: str, target: str | None = None) -> Sums: ...


Contributor = Callable[[TelemetryRecord, Rows], None]


def answers(record: TelemetryRecord, rows: Rows) -> None:
    """The active model's answers: counts, latency and confidence, classes, task telemetry."""
    version = record.versions.active
    if not version:
        return
    fleet, device = rows.of_class(version), rows.of_device(version)
    latency = record.latency.sketch()
    for sums in (fleet, device):
        sums.count("records")
        sums.count("inferences", record.inferences)
        sums.count("errors", record.errors)
        sums.count("fallback_activations", record.fallback_activations)
        sums.histogram("latency", latency)
    fleet.count("fallback_inferences", record.fallback_inferences)
    for kind, count in record.error_kinds.items():
        fleet.count(f"error.{kind}", count)
    fleet.vector("classes", record.classes)
    fleet.vector("confidence", record.confidence)
    if record.confidence_histogram is not None:
        fleet.histogram("confidence", record.confidence_histogram.sketch())
    for name, value in record.sums.items():
        fleet.count(f"task.{name}", value)
    for name, histogram in record.histograms.items():
        fleet.histogram(f"task.{name}", histogram.sketch())


def shadow_comparisons(record: TelemetryRecord, rows: Rows) -> None:
    """The shadow's comparisons with the active model, counted for the shadow's version."""
    shadow = record.shadow
    if shadow is None or not shadow.version:
        return
    fleet, device = rows.of_class(shadow.version), rows.of_device(shadow.version)
    for sums in (fleet, device):
        sums.count("shadow.samples", shadow.samples)
        sums.count("shadow.agreements", shadow.agreements)
    fleet.count("shadow.records")
    fleet.count("shadow.confidence_diff_sum", shadow.confidence_diff_sum)
    fleet.count("shadow.errors", shadow.errors)
    fleet.count("shadow.skipped", shadow.skipped)
    fleet.histogram("shadow.latency", shadow.latency.sketch())


def update_events(record: TelemetryRecord, rows: Rows) -> None:
    """Update events: per device, which outcomes it reached for a version; per class, how often and why."""
    for event in record.events:
        if not event.version:
            continue
        for sums in (rows.of_class(event.version, event.target), rows.of_device(event.version, event.target)):
            if event.kind in DEVICE_EVENTS and event.slot != "shadow":
                sums.count(f"events.{event.kind}")
            if event.kind in REASON_EVENTS:
                sums.count(f"reason.{event.kind}: {event.reason or 'unknown'}")


from edgeship.fleet import rollup_field  # noqa: E402 - the field's truth: labels and field samples

CONTRIBUTORS: list[Contributor] = [answers, shadow_comparisons, update_events, compared_answers,
                                   rollup_field.labelled_answers, rollup_field.field_samples]


def bucket_of(at: datetime, bucket_s: float) -> datetime:
    """The start of the time bucket holding `at` (UTC, aligned to the epoch)."""
    at = at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)
    seconds = at.timestamp()
    return _bucket_start(seconds - seconds % bucket_s)


@functools.lru_cache(maxsize=4096)
def _bucket_start(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


class Rollups:
    """Class and device rows in memory: what a batch of records adds (the store merges it into its tables), or a
    from-scratch aggregation of a list of records."""

    def __init__(self, bucket_s: float = 300.0, contributors: list[Contributor] | None = None):
        self.bucket_s = bucket_s
        self.contributors = contributors if contributors is not None else CONTRIBUTORS
        self.classes: dict[ClassKey, Sums] = {}
        self.devices: dict[DeviceKey, DeviceSums] = {}

    def add_record(self, record: TelemetryRecord) -> None:
        rows = _RecordRows(self, record)
        for contributor in self.contributors:
            contributor(record, rows)

    def add_records(self, records: Iterable[TelemetryRecord]) -> Rollups:
        for record in records:
            self.add_record(record)
        return self


class _RecordRows:
    """The rows one record adds to (created on first use; a device row also notes the record's window)."""

    __slots__ = ("rollups", "record", "bucket", "touched")

    def __init__(self, rollups: Rollups, record: TelemetryRecord):
        self.rollups, self.record = rollups, record
        self.bucket = bucket_of(record.window_end, rollups.bucket_s)
        self.touched: set[DeviceKey] = set()

    def of_class(self, version: str, target: str | None = None) -> Sums:
        r = self.record
        key = ClassKey(r.channel, target or r.target, version, r.device_class, self.bucket)
        sums = self.rollups.classes.get(key)
        if sums is None:
            sums = self.rollups.classes[key] = Sums()
        return sums

    def of_device(self, version: str, target: str | None = None) -> Sums:
        r = self.record
        key = DeviceKey(r.channel, target or r.target, version, r.device_id, r.device_class)
        row = self.rollups.devices.get(key)
        if row is None:
            row = self.rollups.devices[key] = DeviceSums(device_class=r.device_class)
        if key not in self.touched:
            self.touched.add(key)
            row.seen(r.window_end, r.window_end)
        return row.sums
