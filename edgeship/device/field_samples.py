"""Field samples on the device: keep a share of the inputs the model answered, within a byte budget per day.

Only where the channel opted in (its entry's `field_sampling`, which the updater keeps in the state
directory as field_sampling.json; without it nothing is kept). Which answers are kept, in order of preference:

    feedback        the application sent the true label (an input still among the last `recent_inputs`)
    disagreement    the compared model disagreed with the answer (`prefer(request_id, "disagreement")`)
    low_confidence  top-1 confidence below `low_confidence`
    sampled         `sample_rate` of the rest, using at most `random_share` of the day's budget

The answer path only decides and queues (a copy of the input, at most 64 waiting; more are dropped and
counted); the uploader's thread (edgeship.device.field_upload) writes samples to the spool directory
(state_dir/field-samples) and uploads them. Bytes kept per UTC day never exceed `budget_bytes_per_day`, nor do
the bytes waiting in the spool while the bucket is unreachable: what does not fit is dropped and counted
(`TelemetryRecord.field_samples`, per window). A label that arrives for an input already kept is written beside it.

    >>> sampler = FieldSampler(state_dir, identity)
    >>> sampler.offer(batch, prediction, request_id)       # FieldRuntime.predict does this
    >>> sampler.on_feedback(feedback)                      # AnsweredRequests' listener

No torch, TensorFlow, MLflow or Prefect here.
"""

from __future__ import annotations

import io
import json
import queue
import random
import threading
import time
import uuid
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgeship.files import keep_json, write_atomic
from edgeship.records.field import FieldSampling, SampleLabel, SampleMeta
from edgeship.records.telemetry import DeviceIdentity, FieldSampleStats

SETTINGS_FILE = "field_sampling.json"
SPOOL_DIR = "field-samples"
QUEUE_SIZE = 64
RECENT_MAX_BYTES = 16_000_000   # inputs held for late labels: at most `recent_inputs` of them and this many bytes
KEPT_IDS = 50_000   # request ids of kept samples remembered for late labels


def keep_field_sampling(state_dir: Path, settings: dict | None) -> None:
    """Keep the channel entry's field sampling settings beside the state (the updater calls this each check)."""
    keep_json(Path(state_dir) / SETTINGS_FILE, settings)


def read_field_sampling(state_dir: Path) -> FieldSampling | None:
    path = Path(state_dir) / SETTINGS_FILE
    try:
        return FieldSampling.model_validate_json(path.read_bytes()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def utc_day(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%d")


class FieldSampler:
    """Chooses which answers to keep and holds the spool's ledger (thread-safe).

    Args:
        state_dir: the device's state directory (settings file and spool directory).
        identity: who the device is (written into every sample).
        settings: returns the sampling settings now (default: the state directory's file, read when it changed).
    """

    def __init__(self, state_dir: str | Path, identity: DeviceIdentity, settings=None, clock=time.time,
                 rng: random.Random | None = None):
        self.state_dir = Path(state_dir)
        self.spool = self.state_dir / SPOOL_DIR
        self.identity = identity
        self._settings = settings or self._settings_file
        self._clock, self._rng = clock, rng or random.Random()
        self._lock = threading.Lock()
        self._cached: tuple[tuple | None, FieldSampling | None] = (None, None)
        self._recent: OrderedDict[str, tuple] = OrderedDict()
        self._recent_bytes = 0
        self._kept: OrderedDict[str, str] = OrderedDict()      # request id -> sample id
        self.queue: queue.Queue = queue.Queue(QUEUE_SIZE)
        ledger = self._read_ledger()
        self._day, self._day_bytes, self._random_bytes = ledger
        self.stats = {name: 0 for name in FieldSampleStats.model_fields}   # this window
        self.totals = dict(self.stats)                                     # since the service started

    def _settings_file(self) -> FieldSampling | None:
        # One stat per call (microseconds); the file is read again only when the updater rewrote it.
        try:
            stat = (self.state_dir / SETTINGS_FILE).stat()
            version = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError:
            version = None
        if version != self._cached[0]:
            self._cached = (version, read_field_sampling(self.state_dir) if version else None)
        return self._cached[1]

    @property
    def settings(self) -> FieldSampling | None:
        return self._settings()

    # --- the answer path: decide and queue -------------------------------------------------------

    def offer(self, batch: np.ndarray, prediction, request_id: str) -> None:
        """Keep this answer when the channel samples and it is preferred or drawn; else hold it a while in memory.
        Never raises: sampling must not cost the application its answer."""
        try:
            self._offer(batch, prediction, request_id)
        except Exception:
            self.count("dropped")

    def _offer(self, batch: np.ndarray, prediction, request_id: str) -> None:
        settings = self.settings
        if settings is None or prediction.task != "classification" or prediction.outputs is None:
            return
        from edgeship.device.telemetry import probabilities

        confidence = probabilities(prediction.outputs).max(axis=1) if np.size(prediction.outputs) else np.zeros(0)
        held = (np.array(batch, copy=True), np.asarray(prediction.outputs), str(prediction.version),
                self._clock(), [round(float(c), 4) for c in confidence])
        with self._lock:
            if settings.recent_inputs and held[0].nbytes <= RECENT_MAX_BYTES:
                self._recent[request_id] = held
                self._recent_bytes += held[0].nbytes
                while len(self._recent) > settings.recent_inputs or self._recent_bytes > RECENT_MAX_BYTES:
                    self._recent_bytes -= self._recent.popitem(last=False)[1][0].nbytes
        if len(confidence) and confidence.min() < settings.low_confidence:
            self._queue(request_id, held, "low_confidence", None)
        elif self._rng.random() < settings.sample_rate:
            self._queue(request_id, held, "sampled", None)

    def prefer(self, request_id: str, reason: str = "disagreement") -> bool:
        """Keep a recent answer for `reason` (the compared model's disagreement); False when it is no longer held."""
        with self._lock:
            held = self._recent.get(request_id)
        return held is not None and self._queue(request_id, held, reason, None)

    def on_feedback(self, feedback) -> None:
        """A label came (edgeship.device.feedback.Feedback): kept already, note the label; else keep the input."""
        if self.settings is None:
            return
        with self._lock:
            sample_id = self._kept.get(feedback.request_id)
            held = self._recent.get(feedback.request_id)
        if sample_id is not None:
            label = SampleLabel(sample_id=sample_id, labels=feedback.labels, labelled_at=self._clock())
            try:
                self.spool.mkdir(parents=True, exist_ok=True)
                write_atomic(self.spool / f"{sample_id}.label.json", label.model_dump_json().encode())
            except OSError:
                self.count("dropped")
        elif held is not None:
            self._queue(feedback.request_id, held, "feedback", feedback.labels)

    def _queue(self, request_id: str, held: tuple, reason: str, labels: list[int] | None) -> bool:
        with self._lock:
            if request_id in self._kept:
                return False
            sample_id = f"{utc_day(held[3])}_{uuid.uuid4().hex[:16]}"
            self._kept[request_id] = sample_id
            while len(self._kept) > KEPT_IDS:
                self._kept.popitem(last=False)
        try:
            self.queue.put_nowait((sample_id, request_id, held, reason, labels))
            return True
        except queue.Full:
            self.count("dropped")
            return False

    # --- the uploader's thread: write within the budget ------------------------------------------

    def write_queued(self) -> int:
        """Write what is queued into the spool, within the day's budget and the spool's; returns how many."""
        written = 0
        while True:
            try:
                sample_id, request_id, held, reason, labels = self.queue.get_nowait()
            except queue.Empty:
                return written
            written += self._write(sample_id, request_id, held, reason, labels)

    def _write(self, sample_id: str, request_id: str, held: tuple, reason: str, labels: list[int] | None) -> int:
        settings = self.settings
        if settings is None:
            return 0
        x, outputs, version, answered_at, confidence = held
        meta = SampleMeta(**self.identity.model_dump(), sample_id=sample_id, request_id=request_id, version=version,
                          answered_at=answered_at, reason=reason, confidence=confidence)
        label_array = np.asarray(labels if labels is not None else [-1] * len(x), dtype=np.int64)
        buffer = io.BytesIO()
        np.savez(buffer, x=x, outputs=outputs, labels=label_array, meta=np.asarray(meta.model_dump_json()))
        data = buffer.getvalue()
        day = utc_day(self._clock())
        with self._lock:
            if day != self._day:
                self._day, self._day_bytes, self._random_bytes = day, 0, 0
            budget = settings.budget_bytes_per_day
            random_room = settings.random_share * budget - self._random_bytes
            fits = (self._day_bytes + len(data) <= budget and self.pending_bytes() + len(data) <= budget
                    and (reason != "sampled" or len(data) <= random_room))
            if fits:
                self._day_bytes += len(data)
                self._random_bytes += len(data) if reason == "sampled" else 0
        if not fits:
            self.count("dropped")
            return 0
        try:
            self.spool.mkdir(parents=True, exist_ok=True)
            write_atomic(self.spool / f"{sample_id}.npz", data)
            self._write_ledger()
        except OSError:
            self.count("dropped")
            return 0
        self.count("kept")
        return 1

    def pending(self) -> list[Path]:
        """Samples and late labels waiting in the spool, oldest first."""
        if not self.spool.is_dir():
            return []
        return sorted((p for p in self.spool.iterdir() if p.suffix in (".npz", ".json") and p.name != "ledger.json"),
                      key=lambda p: p.stat().st_mtime_ns)

    def pending_bytes(self) -> int:
        total = 0
        for path in self.pending():
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                continue
        return total

    def _read_ledger(self) -> tuple[str, int, int]:
        try:
            saved = json.loads((self.spool / "ledger.json").read_text())
            return str(saved["day"]), int(saved["bytes"]), int(saved.get("random_bytes", 0))
        except (OSError, ValueError, KeyError):
            return utc_day(self._clock()), 0, 0

    def _write_ledger(self) -> None:
        with self._lock:
            data = {"day": self._day, "bytes": self._day_bytes, "random_bytes": self._random_bytes}
        write_atomic(self.spool / "ledger.json", json.dumps(data).encode())

    def count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self.stats[name] += amount
            self.totals[name] += amount

    def window_fields(self) -> dict:
        """`field_samples` for the telemetry window (counts since the last window, what waits now); nothing
        where the channel does not sample and nothing happened."""
        with self._lock:
            stats, self.stats = self.stats, {name: 0 for name in self.stats}
        if self.settings is None and not any(stats.values()):
            return {}
        pending = self.pending()
        stats["pending"] = sum(1 for p in pending if p.suffix == ".npz")
        stats["pending_bytes"] = self.pending_bytes()
        return {"field_samples": FieldSampleStats(**stats)}
