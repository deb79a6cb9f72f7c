"""Telemetry: one compact record per device per window, describing how the model behaves in the field.

A `WindowAggregator` is an observer on the on-device runtime (`on_inference`), of the shadow runner
(`on_shadow`) and of the runner comparing the active model with the one it replaced (`on_compared`). Every window (60 s in the field, about 1 s in tests) `close_window()` returns one
`TelemetryRecord`: versions per slot, the update events written since the last window (the state
directory's events.jsonl, read from the last offset), latency and top-1 confidence as exponential
histograms (edgeship.records.histogram: p50/p95/p99 within 2%, mergeable across windows and devices),
the 10-bin confidence histogram and the predicted-class distribution, a drift score
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
import threading
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.device.telemetry_detection import DetectionWindow, summarize
from edgeship.files import keep_json, write_atomic
from edgeship.records.histogram import DEFAULT_SCALE, ExpHistogram, bucket_index
from edgeship.records.telemetry import (CONFIDENCE_BINS, DeviceIdentity, DriftReference, DriftScore, Histogram,
                                       ShadowStats, SlotVersions, TelemetryEvent, TelemetryRecord)

DRIFT_REFERENCE_FILE = "drift_reference.json"  # in the state directory: the channel entry's reference, kept by the updater
_PSI_FLOOR = 1e-4  # empty bins would make PSI infinite; this is the usual smoothing


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
        # Other parts of the window (ground truth, field samples): each returns record fields when the window ends.
        self.window_parts: list[Callable[[], dict[str, Any]]] = []
        self._reset(self._clock())

    def _reset(self, start: datetime) -> None:
        self._start = start
        self._inferences = self._errors = self._fallback = self._activations = 0
        self._error_kinds: dict[str, int] = {}
        self._latency: dict[int, int] = {}
        self._latency_zero = 0
        self._confidence = np.zeros(CONFIDENCE_BINS, dtype=np.int64)
        self._confidence_exp = ExpHistogram(DEFAULT_SCALE)
        self._classes = np.zeros(0, dtype=np.int64)
        self._shadow: dict[str, Any] = {}
        self._shadow_latency: dict[int, int] = {}
        self._compared: dict[str, Any] = {}
        self._compared_latency: dict[int, int] = {}
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
                latency_ms = float(record.latency_ms)
                if latency_ms > 0:
                    bucket = bucket_index(latency_ms)
                    self._latency[bucket] = self._latency.get(bucket, 0) + 1
                else:
                    self._latency_zero += 1
            self._last_slot = slot
            if found is not None:  # a detector: its detections' scores and classes, and its window's counts
                self._confidence += found.confidence
                if len(found.scores):
                    self._confidence_exp.add(ExpHistogram.of(found.scores))
                self._detections = found.added_to(self._detections)
            if probs is not None or found is not None:
                if probs is not None:
                    top = probs.max(axis=1)
                    self._confidence += np.bincount(confidence_bins(top), minlength=CONFIDENCE_BINS)
                    self._confidence_exp.add(_exp_of(top))
                counts = np.bincount(probs.argmax(axis=1), minlength=probs.shape[1]) if probs is not None \
                    else found.classes
                if len(counts) > len(self._classes):
                    self._classes = np.pad(self._classes, (0, len(counts) - len(self._classes)))
                self._classes[:len(counts)] += counts

    def on_shadow(self, version: str | None, agreements: int, samples: int, confidence_diff_sum: float,
                  latency_ms: float | None, error: bool = False, skipped: int = 0) -> None:
        """Shadow runner observer: one comparison of the shadow with the active model's answer."""
        self._add_comparison(self._shadow, self._shadow_latency, version, agreements, samples, confidence_diff_sum,
                             latency_ms, error, skipped)

    def on_compared(self, version: str | None, agreements: int, samples: int, confidence_diff_sum: float,
                    latency_ms: float | None, error: bool = False, skipped: int = 0) -> None:
        """Observer of the runner comparing the active model with the one it replaced (`version`: the replaced one)."""
        self._add_comparison(self._compared, self._compared_latency, version, agreements, samples,
                             confidence_diff_sum, latency_ms, error, skipped)

    def _add_comparison(self, into: dict[str, Any], latency: dict[int, int], version: str | None, agreements: int,
                        samples: int, confidence_diff_sum: float, latency_ms: float | None, error: bool,
                        skipped: int) -> None:
        with self._lock:
            if version is not None and into.get("version") not in (None, version):
                into.clear()      # another model now (an install mid-window): never mix two pairs' counts
                latency.clear()
            if version is not None or "version" not in into:
                into["version"] = version
            into["samples"] = into.get("samples", 0) + samples
            into["agreements"] = into.get("agreements", 0) + agreements
            into["confidence_diff_sum"] = into.get("confidence_diff_sum", 0.0) + confidence_diff_sum
            into["errors"] = into.get("errors", 0) + int(error)
            into["skipped"] = into.get("skipped", 0) + skipped
            if latency_ms is not None and latency_ms > 0:
                bucket = bucket_index(latency_ms)
                latency[bucket] = latency.get(bucket, 0) + 1

    def close_window(self, spool_dropped: int = 0) -> TelemetryRecord:
        """End the window: the record of everything since the last call, and start the next one."""
        end = self._clock()
        events, offset = ([], self._events_offset)
        if self.state_dir is not None:
            events, offset = read_events(self.state_dir / "events.jsonl", self._events_offset)
        versions = self._versions()
        sensors = self._read_sensors()
        parts = {name: value for part in self.window_parts for name, value in part().items()}
        with self._lock:
            classes, confidence, detections = self._classes.tolist(), self._confidence.tolist(), self._detections
            shadow = _comparison(self._shadow, self._shadow_latency)
            compared = _comparison(self._compared, self._compared_latency)
            self._sequence += 1
            record = TelemetryRecord(
                record_id=f"{self.identity.device_id}/{self._sequence}", device_id=self.identity.device_id,
                sequence=self._sequence, channel=self.identity.channel, target=self.identity.target,
                model_name=self.identity.model_name, device_class=self.identity.device_class,
                window_start=self._start, window_end=end, versions=versions, inferences=self._inferences,
                errors=self._errors, error_kinds=dict(self._error_kinds), fallback_inferences=self._fallback,
                fallback_activations=self._activations,
                latency=Histogram.from_sketch(ExpHistogram.from_counts(self._latency, zero=self._latency_zero)),
                confidence=confidence, classes=classes,
                confidence_histogram=Histogram.from_sketch(self._confidence_exp),
                drift=drift_score(self.reference, classes, confidence, detections) if self.reference else None,
                shadow=shadow, compared=compared, events=events, sensors=sensors, spool_dropped=spool_dropped,
                **(detections.as_record_fields() if detections is not None else {}), **parts)
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


def _comparison(sums: dict[str, Any], latency: dict[int, int]) -> ShadowStats | None:
    if not sums:
        return None
    return ShadowStats(**sums, latency=Histogram.from_sketch(ExpHistogram.from_counts(latency)))


def _exp_of(values: np.ndarray) -> ExpHistogram:
    # Top-1 confidences of one batch (usually one answer): a zero confidence counts in the zero bucket.
    positive = values[values > 0]
    if len(positive) == 1:
        return ExpHistogram.from_counts({bucket_index(float(positive[0])): 1}, zero=len(values) - 1)
    return ExpHistogram.of(values)


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
    keep_json(Path(state_dir) / DRIFT_REFERENCE_FILE, reference)


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
