"""Recorded fleet states for tests: telemetry records as devices send them, built from a few numbers.

    >>> records = [record(f"d{i}", "8", device_class="pi4", p99_ms=9.0) for i in range(4)]

Latency histograms are exponential (schema 2) unless `HISTOGRAMS["format"]` is "fixed" (schema 1 records, as
devices of an older edgeship still send them).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from edgeship.records.telemetry import (Histogram, ShadowStats, SlotVersions, TelemetryEvent, TelemetryRecord,
                                       latency_bucket)

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc)
HISTOGRAMS = {"format": "exponential"}


def latency(p50_ms: float, p99_ms: float, count: int = 200, tail_share: float = 0.02) -> Histogram:
    """`count` answers at p50_ms but `tail_share` of them (at least one) at p99_ms: 2% puts the p99 there."""
    slow = max(1, round(count * tail_share))
    if HISTOGRAMS["format"] == "exponential":
        return Histogram.of([p50_ms] * (count - slow) + [p99_ms] * slow)
    counts: dict[int, int] = {}
    for value, n in ((p50_ms, count - slow), (p99_ms, slow)):
        counts[latency_bucket(value)] = counts.get(latency_bucket(value), 0) + n
    return Histogram(counts=counts)


def record(device: str, version: str, *, sequence: int = 1, device_class: str = "default", p50_ms: float = 2.0,
           p99_ms: float = 4.0, tail_share: float = 0.02, classes: list[int] | None = None, shadow: tuple[str, int, int] | None = None,
           events: list[tuple[str, str, str | None]] = (), fallback_activations: int = 0,
           at: datetime = T0 + timedelta(seconds=60), channel: str = "stable", target: str = "onnx-int8",
           compared: tuple[str, int, int] | None = None, confidence: list[int] | None = None) -> TelemetryRecord:
    """One window of one device; shadow=(version, agreements, samples); compared=(replaced version, agreements,
    samples); events=[(kind, version, reason)]; confidence: top-1 counts per tenth (default: all above 0.8)."""
    classes = classes if classes is not None else [20] * 10
    return TelemetryRecord(
        record_id=f"{device}/{sequence}", device_id=device, sequence=sequence, channel=channel, target=target,
        model_name="digits", device_class=device_class, window_start=at - timedelta(seconds=60), window_end=at,
        versions=SlotVersions(active=version, shadow=shadow[0] if shadow else None, fallback="1"),
        inferences=sum(classes), latency=latency(p50_ms, p99_ms, sum(classes), tail_share),
        schema_version=2 if HISTOGRAMS["format"] == "exponential" else 1,
        confidence=confidence if confidence is not None else [0] * 8 + [sum(classes) // 2,
                                                                        sum(classes) - sum(classes) // 2],
        classes=classes,
        fallback_activations=fallback_activations,
        shadow=ShadowStats(version=shadow[0], agreements=shadow[1], samples=shadow[2]) if shadow else None,
        compared=ShadowStats(version=compared[0], agreements=compared[1], samples=compared[2]) if compared else None,
        events=[TelemetryEvent(at=at - timedelta(seconds=30), kind=k, version=v, target=target, slot="active",
                               reason=r, sequence=i + 1) for i, (k, v, r) in enumerate(events)])


def events_of(records: list[TelemetryRecord]) -> list[dict]:
    """The event rows the store would hold for these records."""
    return [{"device_id": r.device_id, "device_class": r.device_class, "kind": e.kind, "version": e.version,
             "slot": e.slot, "reason": e.reason, "at": e.at, "sequence": e.sequence}
            for r in records for e in r.events]
