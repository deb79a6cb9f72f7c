"""A fleet load generator: telemetry of N simulated devices over MQTT at a chosen rate.

For benchmarks, and for users sizing their own broker and database before the fleet exists. Records are made
by the project's own `WindowAggregator` from simulated answers (latency per device class and version, class
and confidence mix, shadow comparisons on part of the fleet, install/confirm events, drift against a
reference): a few templates per (version, device class), then each device's window is its template with its
own id, sequence and window times, so a 2-core machine can publish thousands of realistic records a second.

    >>> load = FleetLoad(FleetProfile(devices=10_000), MqttSettings(host="127.0.0.1", port=1883, fleet="lab"))
    >>> load.publish(rate=2000, duration_s=60)          # {'published': 120000, 'acknowledged': 120000, ...}

`edgeship fleet loadgen --devices 10000 --rate 2000 --for 60` runs it from the command line.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np

from edgeship.device.telemetry import WindowAggregator, drift_reference
from edgeship.device.telemetry_mqtt import MqttSettings, mqtt_client
from edgeship.records.telemetry import DeviceIdentity, SlotVersions, TelemetryEvent, TelemetryRecord

_DEVICE, _SEQUENCE = "__device__", 987654321
_START, _EVENTS, _END = "1999-01-01T00:00:00Z", "1999-01-01T00:00:30Z", "1999-01-01T00:01:00Z"   # a template's times


@dataclass(frozen=True)
class FleetProfile:
    """What the simulated fleet looks like.

    Args:
        devices: how many devices report.
        versions: share of the devices answering with each version (the last is the candidate).
        device_classes: median latency in ms per device class (devices are spread evenly over them).
        shadow_share: share of the base's devices that shadow the candidate.
        answers_per_window: answers each device gives per window.
        window_s: the devices' telemetry window.
        templates: distinct windows made per (version, device class).
    """

    devices: int = 1000
    versions: dict[str, float] = field(default_factory=lambda: {"7": 0.9, "8": 0.1})
    device_classes: dict[str, float] = field(default_factory=lambda: {"pi4": 12.0, "jetson": 4.0, "x86": 2.0})
    shadow_share: float = 0.1
    answers_per_window: int = 60
    window_s: float = 60.0
    templates: int = 8
    channel: str = "stable"
    target: str = "onnx-int8"
    model_name: str = "digits"
    seed: int = 0

    def device(self, index: int) -> tuple[str, str, str, bool]:
        """(device id, version, device class, shadows the candidate) of device `index`."""
        device_id = f"sim-{index:06d}"
        position = int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:4], "big") / 2 ** 32
        version, edge = list(self.versions)[-1], 0.0
        for name, share in self.versions.items():
            edge += share
            if position < edge:
                version = name
                break
        classes = list(self.device_classes)
        candidate = list(self.versions)[-1]
        shadowing = version != candidate and (position * 7919) % 1.0 < self.shadow_share
        return device_id, version, classes[index % len(classes)], shadowing


class Inference:
    """What the runtime hands its observers (edgeship.device.runtime InferenceRecord's fields)."""

    __slots__ = ("latency_ms", "slot", "version", "outputs", "ok", "error")

    def __init__(self, latency_ms: float, outputs: np.ndarray, version: str):
        self.latency_ms, self.outputs, self.version = latency_ms, outputs, version
        self.slot, self.ok, self.error = "active", True, None


def make_templates(profile: FleetProfile, reference) -> dict[tuple[str, str, bool, bool], list[bytes]]:
    """Serialized windows per (version, device class, shadowing, first window) from a WindowAggregator, with
    placeholders for the device id, sequence and window times."""
    rng = np.random.default_rng(profile.seed)
    candidate = list(profile.versions)[-1]
    templates = {}
    for version in profile.versions:
        for device_class, median_ms in profile.device_classes.items():
            for shadowing in (False, True):
                for first in (False, True):
                    key = (version, device_class, shadowing, first)
                    templates[key] = [_window(profile, rng, version, device_class, median_ms, reference,
                                              shadowing and version != candidate, first) for _ in range(profile.templates)]
    return templates


def _window(profile: FleetProfile, rng, version: str, device_class: str, median_ms: float, reference,
            shadowing: bool, first: bool) -> bytes:
    candidate = list(profile.versions)[-1]
    identity = DeviceIdentity(device_id=_DEVICE, channel=profile.channel, target=profile.target,
                              model_name=profile.model_name, device_class=device_class)
    start = datetime(1999, 1, 1, tzinfo=timezone.utc)
    clock = iter([start, start + timedelta(seconds=60)])
    versions = SlotVersions(active=version, fallback="1", shadow=candidate if shadowing else None)
    aggregator = WindowAggregator(identity, reference=reference, versions=lambda: versions, clock=lambda: next(clock))
    slower = 1.15 if version == candidate else 1.0
    outputs = _answers(rng, profile.answers_per_window)
    for latency, output in zip(rng.lognormal(np.log(median_ms * slower), 0.25, profile.answers_per_window), outputs):
        aggregator.on_inference(Inference(float(latency), output[None], version))   # a batch of one
        if shadowing and rng.random() < 0.25:
            aggregator.on_shadow(candidate, int(rng.random() < 0.985), 1, float(abs(rng.normal(0, 0.05))),
                                 float(latency * 1.1))
    record = aggregator.close_window()
    if first:
        at = start + timedelta(seconds=30)
        events = [TelemetryEvent(at=at, kind=kind, version=version, target=profile.target, slot="active",
                                 sequence=i + 1) for i, kind in enumerate(("installed", "confirmed"))]
        record = record.model_copy(update={"events": events})
    record = record.model_copy(update={"sequence": _SEQUENCE, "record_id": f"{_DEVICE}/{_SEQUENCE}"})
    return record.to_bytes()


def _answers(rng, count: int) -> np.ndarray:
    """Class probabilities of `count` simulated answers (a confident top class, spread over ten classes)."""
    logits = rng.normal(0, 1, (count, 10))
    logits[np.arange(count), rng.integers(0, 10, count)] += rng.uniform(2, 6, count)
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True)


def _iso(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class FleetLoad:
    """Publishes the profile's devices' windows over MQTT (QoS 1), round after round, at a chosen rate."""

    def __init__(self, profile: FleetProfile, settings: MqttSettings, connections: int = 4):
        self.profile, self.settings, self.connections = profile, settings, connections
        # The release's drift reference: the simulated answers' own distribution (the fleet has not drifted).
        self.reference = drift_reference(_answers(np.random.default_rng(profile.seed + 1), 2000),
                                         version=list(profile.versions)[0])
        self.templates = make_templates(profile, self.reference)
        self.devices = [profile.device(i) for i in range(profile.devices)]
        self.published = 0
        self._acked = 0
        self._stream: Iterator[tuple[str, bytes]] | None = None   # publish() continues where it stopped
        self._lock = threading.Lock()

    def window(self, index: int, sequence: int, end: datetime) -> tuple[str, bytes]:
        """(device id, record bytes) of device `index`'s window `sequence`, ending at `end`."""
        device_id, version, device_class, shadowing = self.devices[index]
        choices = self.templates[(version, device_class, shadowing, sequence == 1)]
        template = choices[(index + sequence) % len(choices)]
        begin = _iso(end - timedelta(seconds=self.profile.window_s)).encode()
        return device_id, (template.replace(_DEVICE.encode(), device_id.encode())
                           .replace(str(_SEQUENCE).encode(), str(sequence).encode())
                           .replace(b'"' + _START.encode() + b'"', b'"' + begin + b'"')
                           .replace(b'"' + _END.encode() + b'"', b'"' + _iso(end).encode() + b'"')
                           .replace(b'"' + _EVENTS.encode() + b'"',
                                    b'"' + _iso(end - timedelta(seconds=30)).encode() + b'"'))

    def windows(self, start: datetime, rounds: int | None = None, first_sequence: int = 1) -> Iterator[tuple[str, bytes]]:
        """(device id, record bytes) for every device, window after window; window 1 ends at `start`."""
        sequence = first_sequence
        while rounds is None or sequence < first_sequence + rounds:
            end = start + timedelta(seconds=self.profile.window_s * (sequence - first_sequence))
            for index in range(len(self.devices)):
                yield self.window(index, sequence, end)
            sequence += 1

    def records(self, start: datetime, rounds: int) -> Iterator[TelemetryRecord]:
        for _, payload in self.windows(start, rounds):
            yield TelemetryRecord.from_bytes(payload)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            self._acked += 1

    @property
    def acknowledged(self) -> int:
        return self._acked

    def publish(self, rate: float, count: int | None = None, duration_s: float | None = None,
                start: datetime | None = None, settle_s: float = 30.0) -> dict:
        """Publish at `rate` records/s until `count` records or `duration_s` seconds; what was sent and acked.

        A later call goes on with the next windows (the first call's `start`, default now, is window 1's end)."""
        clients = []
        for i in range(self.connections):
            client = mqtt_client(self.settings, client_id=f"edgeship-loadgen-{self.settings.fleet}-{i}")
            client.max_inflight_messages_set(1000)
            client.max_queued_messages_set(0)
            client.on_publish = self._on_publish
            client.connect(self.settings.host, self.settings.port, keepalive=self.settings.keepalive_s)
            client.loop_start()
            clients.append(client)
        if self._stream is None:
            self._stream = self.windows(start or datetime.now(timezone.utc))
        began, sent = time.monotonic(), self.published
        deadline = began + duration_s if duration_s else None
        try:
            n = 0
            while (count is None or n < count) and (deadline is None or time.monotonic() < deadline):
                device_id, payload = next(self._stream)
                ahead = began + n / rate - time.monotonic()
                n += 1
                if ahead > 0:
                    time.sleep(ahead)
                client = clients[hash(device_id) % len(clients)]
                client.publish(self.settings.telemetry_topic(device_id), payload, qos=1)
                self.published += 1
            sent_s = time.monotonic() - began
            settle = time.monotonic() + settle_s
            while self._acked < self.published and time.monotonic() < settle:
                time.sleep(0.05)
        finally:
            for client in clients:
                client.disconnect()
                client.loop_stop()
        return {"published": self.published, "acknowledged": self._acked, "seconds": round(sent_s, 3),
                "rate": round((self.published - sent) / sent_s, 1) if sent_s else None}
