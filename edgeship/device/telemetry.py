"""Telemetry: one compact record per device per window, describing how the model behaves in the field.

A `WindowAggregator` is an observer on the on-device runtime (`on_inference`), and of the shadow runner
(`on_shadow`). Every window (60 s in the field, about 1 s in tests) `close_window()` returns one
`TelemetryRecord`: versions per slot, the update events written since the last window (the state
directory's events.jsonl, read from the last offset), latency as a fixed-bucket histogram (p50/p95/p99
are read from it), the top-1 confidence histogram, the predicted-class distribution, a drift score
against the reference signed into the release, fallback activations, errors, and sensor readings.

Drift test: PSI (population stability index) of the predicted-class distribution and of the top-1
confidence histogram against the pipeline's own test-split distributions; the score is the larger of
the two (PSI > 0.2 is the usual "significant shift").

    >>> aggregator = WindowAggregator(identity, state_dir=state_dir, reference=reference)
    >>> runtime = DeviceRuntime(state_dir, observers=[aggregator.on_inference])
    >>> record = aggregator.close_window()          # a TelemetryRecord, ready to publish
    >>> record.latency.quantile(0.99)

Records are wire records (extra="ignore", defaults on optional fields, `schema_version`), so a newer
device's records still parse in an older collector. No torch, TensorFlow, MLflow or Prefect here.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgeship.device.telemetry_detection import CONFIDENCE_BINS, DetectionWindow, summarize
from edgeship.files import write_atomic

SCHEMA_VERSION = 1
# Latency bucket upper edges in ms: geometric, 1.2x apart, 0.01 ms .. ~60 s, plus one overflow bucket.
# Fixed so that histograms from every device and every window add up bucket by bucket.
LATENCY_EDGES_MS: tuple[float, ...] = tuple(round(0.01 * 1.2 ** i, 6) for i in range(86))
DRIFT_TEST = "psi"
DRIFT_REFERENCE_FILE = "drift_reference.json"  # in the state directory: the channel entry's reference, kept by the updater
_PSI_FLOOR = 1e-4  # empty bins would make PSI infinite; this is the usual smoothing


class _Wire(BaseModel):
    # Wire records: a collector must keep parsing records from newer devices.
    model_config = ConfigDict(frozen=True, extra="ignore")


class Histogram(_Wire):
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


class DriftReference(_Wire):
    """What the release's own test split looked like; signed into the channel entry (`drift_reference`).

    A detector's (task "detection") holds its detections' class mix and score histogram in the same fields,
    and the shares of detections per frame and of box sizes (edgeship.device.telemetry_detection)."""

    test: str = DRIFT_TEST
    classes: int
    class_distribution: list[float]       # share of test inputs predicted as each class
    confidence_histogram: list[float]     # share of test inputs per top-1 confidence bin (CONFIDENCE_BINS on [0, 1])
    samples: int = 0
    version: str | None = None            # the model version the reference was computed with
    task: str = "classification"
    per_frame_histogram: list[float] | None = None  # detection: share of frames per detection count
    box_size_histogram: list[float] | None = None   # detection: share of detections per box size bin


class DriftScore(_Wire):
    test: str = DRIFT_TEST
    class_psi: float
    confidence_psi: float
    score: float                          # max of the two (of the four for a detector)
    samples: int
    reference_version: str | None = None
    per_frame_psi: float | None = None    # detection: detections per frame
    box_size_psi: float | None = None     # detection: box sizes


class ShadowStats(_Wire):
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


class TelemetryEvent(_Wire):
    """An update event as the state directory's events.jsonl holds it (issue-9's UpdateEvent)."""

    at: datetime | None = None
    kind: str
    version: str | None = None
    target: str | None = None
    slot: str | None = None
    reason: str | None = None
    sequence: int = 0


class SlotVersions(_Wire):
    active: str | None = None
    shadow: str | None = None
    fallback: str | None = None
    on_probation: bool = False


class DeviceIdentity(_Wire):
    """Who is reporting: from the provisioned device.json, plus the device class the operator assigned."""

    device_id: str
    channel: str = "stable"
    target: str = "onnx-int8"
    model_name: str = ""
    device_class: str = "default"


class TelemetryRecord(_Wire):
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
    classes: list[int] = Field(default_factory=list)        # predicted-class counts (a detector: its detections')
    detections: DetectionWindow | None = None               # a detector's answers (confidence: their scores)
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


def probabilities(outputs: np.ndarray) -> np.ndarray:
    """Rows of class probabilities: outputs as they are when they already are, else their softmax."""
    values = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)
    sums = values.sum(axis=1)
    if values.min(initial=0.0) >= 0.0 and values.max(initial=0.0) <= 1.0 and np.allclose(sums, 1.0, atol=1e-3):
        return values
    shifted = np.exp(values - values.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def confidence_bins(confidences: np.ndarray) -> np.ndarray:
    return np.minimum((np.asarray(confidences) * CONFIDENCE_BINS).astype(int), CONFIDENCE_BINS - 1)


def drift_reference(outputs: np.ndarray, version: str | None = None) -> DriftReference:
    """The reference a release carries: class and confidence distributions of its outputs on the test split."""
    probs = probabilities(outputs)
    classes = probs.shape[1]
    predicted = np.bincount(probs.argmax(axis=1), minlength=classes)
    confidence = np.bincount(confidence_bins(probs.max(axis=1)), minlength=CONFIDENCE_BINS)
    return DriftReference(classes=classes, class_distribution=(predicted / predicted.sum()).tolist(),
                          confidence_histogram=(confidence / confidence.sum()).tolist(),
                          samples=len(probs), version=version)


def psi(expected: Iterable[float], observed_counts: Iterable[float]) -> float:
    """Population stability index of observed counts against expected shares (both smoothed)."""
    expected = np.asarray(list(expected), dtype=np.float64)
    observed = np.asarray(list(observed_counts), dtype=np.float64)
    size = max(len(expected), len(observed))
    expected, observed = np.pad(expected, (0, size - len(expected))), np.pad(observed, (0, size - len(observed)))
    p = np.maximum(expected / max(expected.sum(), 1e-12), _PSI_FLOOR)
    q = np.maximum(observed / max(observed.sum(), 1e-12), _PSI_FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def drift_score(reference: DriftReference, classes: list[int], confidence: list[int],
                detections: DetectionWindow | None = None) -> DriftScore | None:
    """PSI of a window's (or a fleet's) class and confidence counts against the release's reference; for a detector
    (given its window) also of detections per frame and box sizes, where the reference has them."""
    samples = int(sum(classes)) if detections is None else detections.frames
    if samples == 0:
        return None
    class_psi = psi(reference.class_distribution, classes) if sum(classes) else 0.0
    confidence_psi = psi(reference.confidence_histogram, confidence) if sum(confidence) else 0.0
    extra = {}
    if detections is not None and reference.per_frame_histogram is not None:
        extra["per_frame_psi"] = round(psi(reference.per_frame_histogram, detections.per_frame), 6)
    if detections is not None and reference.box_size_histogram is not None and detections.detections:
        extra["box_size_psi"] = round(psi(reference.box_size_histogram, detections.box_sizes), 6)
    return DriftScore(class_psi=round(class_psi, 6), confidence_psi=round(confidence_psi, 6),
                      score=round(max(class_psi, confidence_psi, *extra.values()), 6), samples=samples,
                      reference_version=reference.version, **extra)


def read_events(path: Path, offset: int) -> tuple[list[TelemetryEvent], int]:
    """Complete lines of events.jsonl after `offset`, and the offset after them (a torn last line waits)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return [], 0
    end = data.rfind(b"\n") + 1
    events = []
    for line in data[:end].splitlines():
        if line.strip():
            try:
                events.append(TelemetryEvent.model_validate_json(line))
            except ValueError:
                continue  # a line this version does not understand is not worth losing the window for
    return events, offset + end


class WindowAggregator:
    """Accumulates one window of inferences (thread-safe) and turns it into a TelemetryRecord.

    Args:
        identity: who reports.
        state_dir: the device's state directory (events.jsonl is read from it); None: no events.
        reference: the active release's drift reference; None: no drift score.
        versions: returns the slot versions now (default: from the state directory's state functions).
        sensors: returns sensor readings now, e.g. {"thermal/cpu": 51.0, "cpufreq/cpu0": 1800.0}.
        progress_dir: where the window sequence and events offset survive a restart (the spool directory).
    """

    def __init__(self, identity: DeviceIdentity, state_dir: Path | None = None,
                 reference: DriftReference | None = None, versions: Callable[[], SlotVersions] | None = None,
                 sensors: Callable[[], dict[str, float]] | None = None, progress_dir: Path | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)):
        self.identity = identity
        self.state_dir = Path(state_dir) if state_dir else None
        self.reference = reference
        self._versions = versions or (lambda: slot_versions(self.state_dir))
        self._sensors = sensors
        self._clock = clock
        self._progress = Path(progress_dir) / "aggregator.json" if progress_dir else None
        self._lock = threading.Lock()
        saved = json.loads(self._progress.read_text()) if self._progress and self._progress.is_file() else {}
        self._sequence = int(saved.get("sequence", 0))
        self._events_offset = int(saved.get("events_offset", 0))
        self._last_slot = "active"
        self._reset(self._clock())

    def _reset(self, start: datetime) -> None:
        self._start = start
        self._inferences = self._errors = self._fallback = self._activations = 0
        self._error_kinds: dict[str, int] = {}
        self._latency: dict[int, int] = {}
        self._confidence = np.zeros(CONFIDENCE_BINS, dtype=np.int64)
        self._classes = np.zeros(0, dtype=np.int64)
        self._shadow: dict[str, Any] = {}
        self._shadow_latency: dict[int, int] = {}
        self._detections: DetectionWindow | None = None

    def on_inference(self, record: Any) -> None:
        """Runtime observer: `record` has latency_ms, slot, version, outputs, ok, error (an InferenceRecord)."""
        ok, slot = bool(getattr(record, "ok", True)), getattr(record, "slot", "active")
        outputs = getattr(record, "outputs", None)
        detector = getattr(record, "task", "classification") == "detection"
        answered = ok and outputs is not None and np.size(outputs) > 0
        probs = probabilities(outputs) if answered and not detector else None
        found = summarize(outputs) if answered and detector else None
        with self._lock:
            self._inferences += 1
            if not ok:
                self._errors += 1
                kind = _error_kind(getattr(record, "error", None))
                self._error_kinds[kind] = self._error_kinds.get(kind, 0) + 1
            if slot == "fallback":
                self._fallback += 1
                if self._last_slot != "fallback":
                    self._activations += 1
            elif ok:
                bucket = latency_bucket(float(record.latency_ms))
                self._latency[bucket] = self._latency.get(bucket, 0) + 1
            self._last_slot = slot
            if found is not None:  # a detector: its detections' scores and classes, and its window's counts
                self._confidence += found.confidence
                self._detections = found.added_to(self._detections)
            if probs is not None or found is not None:
                if probs is not None:
                    self._confidence += np.bincount(confidence_bins(probs.max(axis=1)), minlength=CONFIDENCE_BINS)
                counts = np.bincount(probs.argmax(axis=1), minlength=probs.shape[1]) if probs is not None \
                    else found.classes
                if len(counts) > len(self._classes):
                    self._classes = np.pad(self._classes, (0, len(counts) - len(self._classes)))
                self._classes[:len(counts)] += counts

    def on_shadow(self, version: str | None, agreements: int, samples: int, confidence_diff_sum: float,
                  latency_ms: float | None, error: bool = False, skipped: int = 0) -> None:
        """Shadow runner observer: one comparison of the shadow with the active model's answer."""
        with self._lock:
            shadow = self._shadow
            if version is not None or "version" not in shadow:
                shadow["version"] = version
            shadow["samples"] = shadow.get("samples", 0) + samples
            shadow["agreements"] = shadow.get("agreements", 0) + agreements
            shadow["confidence_diff_sum"] = shadow.get("confidence_diff_sum", 0.0) + confidence_diff_sum
            shadow["errors"] = shadow.get("errors", 0) + int(error)
            shadow["skipped"] = shadow.get("skipped", 0) + skipped
            if latency_ms is not None:
                bucket = latency_bucket(latency_ms)
                self._shadow_latency[bucket] = self._shadow_latency.get(bucket, 0) + 1

    def close_window(self, spool_dropped: int = 0) -> TelemetryRecord:
        """End the window: the record of everything since the last call, and start the next one."""
        end = self._clock()
        events, offset = ([], self._events_offset)
        if self.state_dir is not None:
            events, offset = read_events(self.state_dir / "events.jsonl", self._events_offset)
        versions = self._versions()
        sensors = self._read_sensors()
        with self._lock:
            classes, confidence, detections = self._classes.tolist(), self._confidence.tolist(), self._detections
            shadow = None
            if self._shadow:
                shadow = ShadowStats(**self._shadow, latency=Histogram(counts=dict(self._shadow_latency)))
            self._sequence += 1
            record = TelemetryRecord(
                record_id=f"{self.identity.device_id}/{self._sequence}", device_id=self.identity.device_id,
                sequence=self._sequence, channel=self.identity.channel, target=self.identity.target,
                model_name=self.identity.model_name, device_class=self.identity.device_class,
                window_start=self._start, window_end=end, versions=versions, inferences=self._inferences,
                errors=self._errors, error_kinds=dict(self._error_kinds), fallback_inferences=self._fallback,
                fallback_activations=self._activations, latency=Histogram(counts=dict(self._latency)),
                confidence=confidence, classes=classes, detections=detections,
                drift=drift_score(self.reference, classes, confidence, detections) if self.reference else None,
                shadow=shadow, events=events, sensors=sensors, spool_dropped=spool_dropped)
            self._events_offset = offset
            self._reset(end)
            sequence = self._sequence
        if self._progress is not None:
            write_atomic(self._progress, json.dumps({"sequence": sequence, "events_offset": offset}).encode())
        return record

    def _read_sensors(self) -> dict[str, float]:
        if self._sensors is None:
            return {}
        try:
            return {key: float(value) for key, value in self._sensors().items()}
        except Exception:  # a sensor that fails now must not cost the window
            return {}


def _error_kind(error: Any) -> str:
    # The runtime reports "TypeName: message"; the kind is the type name, so counts stay few and comparable.
    if error is None:
        return "non-finite outputs"
    if isinstance(error, BaseException):
        return type(error).__name__
    return str(error).split(":", 1)[0][:60]


def sensor_reader(sensors: Iterable[Any]) -> Callable[[], dict[str, float]]:
    """A `sensors` callable over edgeship.device.sensors plug-ins: temperature and clock only (cheap reads)."""
    chosen = [s for s in sensors if getattr(s, "available", False) and s.kind in ("temperature", "clock")]

    def read() -> dict[str, float]:
        values: dict[str, float] = {}
        for sensor in chosen:
            try:
                values.update(sensor.read())
            except Exception:
                continue
        return values

    return read


def keep_drift_reference(state_dir: Path, reference: dict | None) -> None:
    """Keep the channel entry's drift reference beside the state (the updater calls this each check)."""
    path = Path(state_dir) / DRIFT_REFERENCE_FILE
    if reference is None:
        path.unlink(missing_ok=True)
        return
    data = json.dumps(reference, sort_keys=True).encode()
    if not path.is_file() or path.read_bytes() != data:
        write_atomic(path, data)


def slot_versions(state_dir: Path | None) -> SlotVersions:
    """Versions installed in each slot, through the state module's functions (FLEET_CONTRACT.md)."""
    if state_dir is None:
        return SlotVersions()
    try:
        from edgeship.device import state as device_state
    except ImportError:
        return SlotVersions()

    def version_of(getter_name: str) -> tuple[str | None, bool]:
        getter = getattr(device_state, getter_name, None)
        installed = getter(state_dir) if getter else None
        if installed is None:
            return None, False
        release = getattr(installed, "release", None) or getattr(installed, "model", None)
        return getattr(release, "version", None), bool(getattr(installed, "on_probation", False))

    active, probation = version_of("active_model")
    return SlotVersions(active=active, shadow=version_of("shadow_model")[0],
                        fallback=version_of("fallback_model")[0], on_probation=probation)
