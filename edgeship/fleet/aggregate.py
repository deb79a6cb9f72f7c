"""Fleet snapshots: rollup rows (edgeship.fleet.rollup) read per model version and device class.

What the rollout controller, `fleet status` and the drift check decide on. The store builds a snapshot from
its rollup tables (`FleetStore.snapshot`); `aggregate()` builds the same from a list of records, from
scratch, which is what tests compare the rollups with and what recorded fleet states replay through:

    >>> snapshot = store.snapshot("stable", "onnx-int8", since=rollout_start, reference=entry_reference)
    >>> snapshot.versions["8"].classes["pi4"].p99_ms
    >>> snapshot.versions["8"].shadow.agreement       # candidate running as shadow beside version 7

Class rows are cut at `since` by time bucket; a device row holds a device's whole life on a version, and is
read when the device reported since `since` (a candidate's rows are its rollout; the base's per-device sums
go back further, which no decision reads: the base is judged by its class rows).

Latency quantiles come from the merged exponential histograms (within 2%); fleet drift is the PSI of the
summed class and confidence counts against the release's reference (not a mean of per-window scores, which
small windows would inflate).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from edgeship.device.telemetry import drift_score
from edgeship.fleet.estimate import AccuracyEstimate, estimated_accuracy
from edgeship.fleet.rollup import DEVICE_EVENTS, ClassKey, DeviceKey, DeviceSums, Rollups, Sums
from edgeship.records.histogram import ExpHistogram
from edgeship.records.telemetry import DriftReference, DriftScore, TelemetryRecord


@dataclass(frozen=True)
class ClassStats:
    """One device class running one version."""

    devices: int
    inferences: int
    errors: int
    fallback_activations: int
    latency: ExpHistogram
    sums: Sums = field(default_factory=Sums)    # everything else the class rows hold, by name

    @property
    def p50_ms(self) -> float | None:
        return self.latency.quantile(0.5)

    @property
    def p95_ms(self) -> float | None:
        return self.latency.quantile(0.95)

    @property
    def p99_ms(self) -> float | None:
        return self.latency.quantile(0.99)


@dataclass(frozen=True)
class ShadowSummary:
    devices: int = 0
    samples: int = 0
    agreement: float | None = None
    confidence_diff: float | None = None
    p99_ms: float | None = None
    by_device: dict[str, float] = field(default_factory=dict)   # device -> its own agreement
    samples_by_device: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class EventCounts:
    """Devices (not events) per outcome for one version; a device counts once per outcome."""

    installed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    confirmed: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def install_executed(self) -> int:
        return len(set(self.installed) | set(self.refused))

    @property
    def probation_executed(self) -> int:
        return len(set(self.confirmed) | set(self.rolled_back))


@dataclass(frozen=True)
class VersionStats:
    version: str
    devices: list[str]                         # devices that reported answering with it as the active model
    classes: dict[str, ClassStats]
    inferences: int
    errors: int
    fallback_activations: int
    drift: DriftScore | None = None
    shadow: ShadowSummary = field(default_factory=ShadowSummary)
    events: EventCounts = field(default_factory=EventCounts)
    device_class_of: dict[str, str] = field(default_factory=dict)
    device_fallbacks: dict[str, int] = field(default_factory=dict)  # device -> fallback activations on this version
    device_samples: dict[str, int] = field(default_factory=dict)    # device -> answers timed on this version
    device_latency: dict[str, ExpHistogram] = field(default_factory=dict)
    sums: Sums = field(default_factory=Sums)   # the version's class rows summed, by name
    device_sums: dict[str, Sums] = field(default_factory=dict)     # device -> its row's sums on this version
    estimated_accuracy: AccuracyEstimate | None = None   # label-free (CBPE, edgeship.fleet.estimate)


@dataclass(frozen=True)
class FleetSnapshot:
    since: datetime | None
    records: int
    devices: int
    versions: dict[str, VersionStats]

    def version(self, version: str | None) -> VersionStats | None:
        return self.versions.get(version) if version else None


def snapshot_of(class_rows: Iterable[tuple[ClassKey, Sums]], device_rows: Iterable[tuple[DeviceKey, DeviceSums]],
                reference: DriftReference | dict | None = None, since: datetime | None = None) -> FleetSnapshot:
    """Sum rollup rows per model version (as the active model, and as the shadow) and device class."""
    if isinstance(reference, dict):
        reference = DriftReference.model_validate(reference)
    per_class: dict[str, dict[str, Sums]] = defaultdict(lambda: defaultdict(Sums))
    for key, sums in class_rows:
        per_class[key.version][key.device_class].add(sums)
    per_device: dict[str, dict[str, DeviceSums]] = defaultdict(dict)
    for key, row in device_rows:
        mine = per_device[key.version]
        earlier = mine.get(key.device_id)
        if earlier is None:
            mine[key.device_id] = DeviceSums(row.sums, row.first_seen, row.last_seen, key.device_class)
            continue
        # A device that changed class: one device, counted in the class of its latest window.
        merged = DeviceSums(Sums(), earlier.first_seen, earlier.last_seen, earlier.device_class)
        merged.add(earlier.sums, None, None)
        merged.add(row.sums, row.first_seen, row.last_seen)
        if row.last_seen is not None and (earlier.last_seen is None or row.last_seen >= earlier.last_seen):
            merged.device_class = key.device_class
        mine[key.device_id] = merged
    versions = {version: _version_stats(version, per_class.get(version, {}), per_device.get(version, {}), reference)
                for version in set(per_class) | set(per_device)}
    records = sum(int(s.get("records")) for classes in per_class.values() for s in classes.values())
    answering = {d for stats in versions.values() for d in stats.devices}
    return FleetSnapshot(since=since, records=records, devices=len(answering), versions=versions)


def _version_stats(version: str, classes: dict[str, Sums], devices: dict[str, DeviceSums],
                   reference: DriftReference | None) -> VersionStats:
    total = Sums()
    for sums in classes.values():
        total.add(sums)
    answering = {d: row for d, row in devices.items() if row.sums.get("records")}
    class_devices: dict[str, int] = defaultdict(int)
    for row in answering.values():
        class_devices[row.device_class] += 1
    class_stats = {name: ClassStats(devices=class_devices.get(name, 0), inferences=int(sums.get("inferences")),
                                    errors=int(sums.get("errors")),
                                    fallback_activations=int(sums.get("fallback_activations")),
                                    latency=sums.histograms.get("latency") or ExpHistogram(), sums=sums)
                   for name, sums in classes.items() if sums.get("records")}
    drift = None
    if reference is not None and "classes" in total.vectors:
        drift = drift_score(reference, total.vectors["classes"].tolist(),
                            total.vectors.get("confidence", []).tolist() if "confidence" in total.vectors else [])
    events = EventCounts(**{kind: sorted(d for d, row in devices.items() if row.sums.get(f"events.{kind}"))
                            for kind in DEVICE_EVENTS},
                         reasons={name.removeprefix("reason."): int(count) for name, count in total.values.items()
                                  if name.startswith("reason.")})
    return VersionStats(
        version=version, devices=sorted(answering), classes=class_stats, inferences=int(total.get("inferences")),
        errors=int(total.get("errors")), fallback_activations=int(total.get("fallback_activations")), drift=drift,
        shadow=_shadow_summary(total, devices), events=events,
        device_class_of={d: row.device_class for d, row in answering.items()},
        device_fallbacks={d: int(row.sums.get("fallback_activations")) for d, row in answering.items()},
        device_samples={d: row.sums.histograms["latency"].total if "latency" in row.sums.histograms else 0
                        for d, row in answering.items()},
        device_latency={d: row.sums.histograms.get("latency") or ExpHistogram() for d, row in answering.items()},
        sums=total, device_sums={d: row.sums for d, row in devices.items()},
        estimated_accuracy=estimated_accuracy(total, reference))


def _shadow_summary(total: Sums, devices: dict[str, DeviceSums]) -> ShadowSummary:
    samples = int(total.get("shadow.samples"))
    if not samples:
        return ShadowSummary()
    compared = {d: row.sums for d, row in devices.items() if row.sums.get("shadow.samples")}
    latency = total.histograms.get("shadow.latency")
    return ShadowSummary(devices=len(compared), samples=samples, agreement=total.get("shadow.agreements") / samples,
                         confidence_diff=total.get("shadow.confidence_diff_sum") / samples,
                         p99_ms=latency.quantile(0.99) if latency is not None else None,
                         by_device={d: s.get("shadow.agreements") / s.get("shadow.samples") for d, s in compared.items()},
                         samples_by_device={d: int(s.get("shadow.samples")) for d, s in compared.items()})


def aggregate(records: Iterable[TelemetryRecord], reference: DriftReference | dict | None = None,
              since: datetime | None = None, bucket_s: float = 300.0) -> FleetSnapshot:
    """The snapshot of a list of records, aggregated from scratch (records before `since` left out)."""
    rollups = Rollups(bucket_s).add_records(r for r in records if since is None or r.window_end >= since)
    return snapshot_of(rollups.classes.items(), rollups.devices.items(), reference, since)
