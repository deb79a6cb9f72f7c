"""Fleet aggregates: telemetry records and update events summed per model version and device class.

Pure functions over stored records, so the rollout controller's inputs can be recorded and replayed:

    >>> snapshot = aggregate(store.records(channel="stable", target="onnx-int8", since=stage_start),
    ...                      store.events(channel="stable", since=stage_start), reference=entry_reference)
    >>> snapshot.versions["8"].classes["pi4"].p99_ms
    >>> snapshot.versions["8"].shadow.agreement       # candidate running as shadow beside version 7

Latency quantiles come from the merged fixed-bucket histograms; fleet drift is the PSI of the summed
class and confidence counts against the release's reference (not a mean of per-window scores, which
small windows would inflate).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from edgeship.device.telemetry import drift_score
from edgeship.records.telemetry import DriftReference, DriftScore, Histogram, TelemetryRecord, merge_histograms

# Event kinds (FLEET_CONTRACT.md UpdateEvent) and what they count as.
INSTALL_OK, INSTALL_FAILED = {"installed"}, {"refused"}
PROBATION_OK, PROBATION_FAILED = {"confirmed"}, {"rolled_back"}


class _Summary(BaseModel):
    model_config = ConfigDict(frozen=True)


class ClassStats(_Summary):
    """One device class running one version."""

    devices: int
    inferences: int
    errors: int
    fallback_activations: int
    latency: Histogram
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


class ShadowSummary(_Summary):
    devices: int = 0
    samples: int = 0
    agreement: float | None = None
    confidence_diff: float | None = None
    p99_ms: float | None = None
    by_device: dict[str, float] = Field(default_factory=dict)   # device -> its own agreement
    samples_by_device: dict[str, int] = Field(default_factory=dict)


class EventCounts(_Summary):
    """Devices (not events) per outcome for one version; a device counts once per outcome."""

    installed: list[str] = Field(default_factory=list)
    refused: list[str] = Field(default_factory=list)
    confirmed: list[str] = Field(default_factory=list)
    rolled_back: list[str] = Field(default_factory=list)
    reasons: dict[str, int] = Field(default_factory=dict)

    @property
    def install_executed(self) -> int:
        return len(set(self.installed) | set(self.refused))

    @property
    def probation_executed(self) -> int:
        return len(set(self.confirmed) | set(self.rolled_back))


class VersionStats(_Summary):
    version: str
    devices: list[str]                         # devices that reported answering with it as the active model
    classes: dict[str, ClassStats]
    inferences: int
    errors: int
    fallback_activations: int
    drift: DriftScore | None = None
    shadow: ShadowSummary = Field(default_factory=ShadowSummary)
    events: EventCounts = Field(default_factory=EventCounts)
    device_p99_ms: dict[str, float] = Field(default_factory=dict)   # device -> its own p99 on this version
    device_class_of: dict[str, str] = Field(default_factory=dict)
    device_fallbacks: dict[str, int] = Field(default_factory=dict)  # device -> fallback activations on this version
    device_samples: dict[str, int] = Field(default_factory=dict)    # device -> answers timed on this version
    device_latency: dict[str, Histogram] = Field(default_factory=dict)


class FleetSnapshot(_Summary):
    since: datetime | None = None
    records: int
    devices: int
    versions: dict[str, VersionStats]

    def version(self, version: str | None) -> VersionStats | None:
        return self.versions.get(version) if version else None


def _class_stats(records: list[TelemetryRecord]) -> ClassStats:
    latency = merge_histograms(r.latency for r in records)
    return ClassStats(devices=len({r.device_id for r in records}), inferences=sum(r.inferences for r in records),
                      errors=sum(r.errors for r in records),
                      fallback_activations=sum(r.fallback_activations for r in records), latency=latency,
                      p50_ms=latency.quantile(0.5), p95_ms=latency.quantile(0.95), p99_ms=latency.quantile(0.99))


def _shadow_summary(records: list[TelemetryRecord]) -> ShadowSummary:
    shadows = [r for r in records if r.shadow is not None and r.shadow.samples]
    if not shadows:
        return ShadowSummary()
    samples = sum(r.shadow.samples for r in shadows)
    agreements = sum(r.shadow.agreements for r in shadows)
    per_device: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in shadows:
        per_device[r.device_id][0] += r.shadow.agreements
        per_device[r.device_id][1] += r.shadow.samples
    return ShadowSummary(devices=len(per_device), samples=samples, agreement=agreements / samples,
                         confidence_diff=sum(r.shadow.confidence_diff_sum for r in shadows) / samples,
                         p99_ms=merge_histograms(r.shadow.latency for r in shadows).quantile(0.99),
                         by_device={d: a / n for d, (a, n) in per_device.items()},
                         samples_by_device={d: n for d, (a, n) in per_device.items()})


def _event_counts(events: list[dict]) -> EventCounts:
    buckets: dict[str, set[str]] = defaultdict(set)
    reasons: dict[str, int] = defaultdict(int)
    for event in events:
        if event["kind"] in ("installed", "refused", "confirmed", "rolled_back") and event.get("slot") != "shadow":
            buckets[event["kind"]].add(event["device_id"])
        if event["kind"] in ("refused", "rolled_back"):
            reasons[f"{event['kind']}: {event.get('reason') or 'unknown'}"] += 1
    return EventCounts(**{kind: sorted(devices) for kind, devices in buckets.items()}, reasons=dict(reasons))


def aggregate(records: Iterable[TelemetryRecord], events: Iterable[dict] = (),
              reference: DriftReference | dict | None = None, since: datetime | None = None) -> FleetSnapshot:
    """Sum records and events per model version (as the active model, and as the shadow) and device class."""
    if isinstance(reference, dict):
        reference = DriftReference.model_validate(reference)
    records = [r for r in records if since is None or r.window_end >= since]
    events = [e for e in events if since is None or e.get("at") is None or e["at"] >= since]
    active: dict[str, list[TelemetryRecord]] = defaultdict(list)
    shadow: dict[str, list[TelemetryRecord]] = defaultdict(list)
    for record in records:
        if record.versions.active:
            active[record.versions.active].append(record)
        if record.shadow is not None and record.shadow.version:
            shadow[record.shadow.version].append(record)
    by_version_events: dict[str, list[dict]] = defaultdict(list)
    for event in events:
        if event.get("version"):
            by_version_events[event["version"]].append(event)
    versions = {}
    for version in set(active) | set(shadow) | set(by_version_events):
        mine = active.get(version, [])
        per_class: dict[str, list[TelemetryRecord]] = defaultdict(list)
        per_device: dict[str, list[TelemetryRecord]] = defaultdict(list)
        for record in mine:
            per_class[record.device_class].append(record)
            per_device[record.device_id].append(record)
        classes = [sum(x) for x in _zip_longest(r.classes for r in mine)]
        confidence = [sum(x) for x in _zip_longest(r.confidence for r in mine)]
        drift = drift_score(reference, classes, confidence) if reference is not None and classes else None
        device_latency = {d: merge_histograms(r.latency for r in rs) for d, rs in per_device.items()}
        device_p99 = {d: h.quantile(0.99) for d, h in device_latency.items()}
        versions[version] = VersionStats(
            version=version, devices=sorted(per_device), classes={c: _class_stats(rs) for c, rs in per_class.items()},
            inferences=sum(r.inferences for r in mine), errors=sum(r.errors for r in mine),
            fallback_activations=sum(r.fallback_activations for r in mine), drift=drift,
            shadow=_shadow_summary(shadow.get(version, [])), events=_event_counts(by_version_events.get(version, [])),
            device_p99_ms={d: p for d, p in device_p99.items() if p is not None},
            device_class_of={d: rs[-1].device_class for d, rs in per_device.items()},
            device_fallbacks={d: sum(r.fallback_activations for r in rs) for d, rs in per_device.items()},
            device_samples={d: sum(r.latency.total for r in rs) for d, rs in per_device.items()},
            device_latency=device_latency)
    return FleetSnapshot(since=since, records=len(records), devices=len({r.device_id for r in records}),
                         versions=versions)


def _zip_longest(rows: Iterable[list[int]]) -> list[tuple[int, ...]]:
    rows = [list(r) for r in rows]
    width = max((len(r) for r in rows), default=0)
    return list(zip(*[r + [0] * (width - len(r)) for r in rows])) if rows else []
