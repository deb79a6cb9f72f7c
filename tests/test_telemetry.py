"""Telemetry on the device: the window record, its histograms and drift score, the disk spool, and the
MQTT transport against real Mosquitto brokers (one of our own, killed and restarted mid-stream)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edgeship.device.telemetry import WindowAggregator, drift_reference, drift_score, psi
from edgeship.records.telemetry import (LATENCY_EDGES_MS, DeviceIdentity, DriftReference, Histogram, TelemetryRecord,
                                        latency_bucket)
from edgeship.device.telemetry_mqtt import MqttSettings, TelemetryReporter
from edgeship.device.telemetry_spool import Spool
from edgeship.fleet.broker import LocalBroker


@dataclass
class Inference:  # what the runtime hands its observers (FLEET_CONTRACT.md InferenceRecord)
    latency_ms: float
    outputs: np.ndarray | None
    slot: str = "active"
    version: str = "7"
    ok: bool = True
    error: Exception | None = None


def one_hot(classes, confidence=0.9, size=10):
    rows = np.full((len(classes), size), (1 - confidence) / (size - 1))
    rows[np.arange(len(classes)), classes] = confidence
    return rows


def test_an_old_fixed_bucket_histogram_still_reads_within_its_buckets():
    latencies = [1.0] * 90 + [5.0] * 9 + [40.0]
    counts = {}
    for value in latencies:
        counts[latency_bucket(value)] = counts.get(latency_bucket(value), 0) + 1
    histogram = Histogram.model_validate_json(json.dumps({"counts": counts, "future_field": 1}))  # schema 1 on the wire
    assert histogram.total == 100
    for q, true in ((0.5, 1.0), (0.95, 5.0), (0.99, 5.0), (1.0, 40.0)):
        assert true / 1.2 <= histogram.quantile(q) <= true * 1.2     # interpolated inside its 1.2x-wide bucket
    assert histogram.count_above(4.0) == 10 and histogram.count_possibly_above(40.0) == 1  # its bucket reaches 40.5
    assert histogram.count_possibly_above(50.0) == 0
    assert Histogram().quantile(0.99) is None
    assert latency_bucket(1e9) == len(LATENCY_EDGES_MS)  # overflow bucket


def test_psi_is_zero_on_the_reference_and_large_on_a_shift():
    reference = drift_reference(one_hot(np.arange(1000) % 10), version="7")
    assert psi(reference.class_distribution, [100] * 10) == pytest.approx(0.0, abs=1e-9)
    shifted = drift_score(reference, classes=[500, 500] + [0] * 8, confidence=[0] * 9 + [1000])
    assert shifted.class_psi > 1.0 and shifted.score == shifted.class_psi
    low_confidence = drift_score(reference, classes=[100] * 10, confidence=[0, 0, 1000] + [0] * 7)
    assert low_confidence.confidence_psi > 1.0 and low_confidence.class_psi < 1e-6


def test_window_record_from_recorded_inferences(tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    events = [{"at": "2026-12-01T10:00:00Z", "kind": "installed", "version": "7", "target": "onnx-int8",
               "slot": "active", "reason": None, "sequence": 1, "future_field": "ignored"},
              {"at": "2026-12-01T10:00:05Z", "kind": "confirmed", "version": "7", "target": "onnx-int8",
               "slot": "active", "sequence": 2}]
    (state_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"kind": "torn')
    reference = drift_reference(one_hot(np.arange(100) % 10), version="7")
    identity = DeviceIdentity(device_id="dev-1", channel="stable", target="onnx-int8", model_name="digits",
                              device_class="pi4")
    aggregator = WindowAggregator(identity, state_dir=state_dir, reference=reference, progress_dir=tmp_path / "t",
                                  sensors=lambda: {"thermal/cpu": 51.5})
    for i in range(20):
        aggregator.on_inference(Inference(latency_ms=2.0 + (i == 19) * 30, outputs=one_hot([i % 10, (i + 1) % 10])))
    aggregator.on_inference(Inference(latency_ms=1.0, outputs=None, ok=False, error=RuntimeError("boom")))
    aggregator.on_inference(Inference(latency_ms=0.5, outputs=one_hot([3]), slot="fallback", version="1"))
    aggregator.on_inference(Inference(latency_ms=0.5, outputs=one_hot([3]), slot="fallback", version="1"))
    aggregator.on_shadow("8", agreements=3, samples=4, confidence_diff_sum=0.2, latency_ms=3.0)
    record = aggregator.close_window()

    assert record.record_id == "dev-1/1" and record.device_class == "pi4"
    assert record.inferences == 23 and record.errors == 1 and record.error_kinds == {"RuntimeError": 1}
    assert record.fallback_inferences == 2 and record.fallback_activations == 1
    assert record.latency.total == 20 and record.latency.quantile(0.5) == pytest.approx(2.0, rel=0.02)
    assert record.latency.quantile(0.99) == pytest.approx(32.0, rel=0.02)
    assert sum(record.classes) == 42 and sum(record.confidence) == 42
    assert record.drift is not None and record.drift.test == "psi" and record.drift.samples == 42
    assert [e.kind for e in record.events] == ["installed", "confirmed"]
    assert record.shadow.agreement == 0.75 and record.shadow.version == "8"
    assert record.sensors == {"thermal/cpu": 51.5}
    # wire: unknown fields from a newer device are ignored; a round trip keeps everything
    wire = json.loads(record.to_bytes())
    wire["new_in_v2"] = {"x": 1}
    assert TelemetryRecord.model_validate(wire) == record

    # the next window starts empty, its events start after the last complete line, the sequence survives restarts
    with open(state_dir / "events.jsonl", "a") as handle:
        handle.write('", "sequence": 3}\n')
    again = WindowAggregator(identity, state_dir=state_dir, progress_dir=tmp_path / "t")
    second = again.close_window()
    assert second.sequence == 2 and second.inferences == 0 and [e.sequence for e in second.events] == [3]


def test_spool_is_bounded_counts_drops_and_survives_reopening(tmp_path):
    spool = Spool(tmp_path, max_records=5)
    names = [spool.put(f"record {i}".encode()) for i in range(8)]
    assert len(spool) == 5 and spool.dropped == 3
    assert [payload for _, payload in spool.pending()][0] == b"record 3"
    spool.ack(names[3])
    reopened = Spool(tmp_path, max_records=5)
    assert len(reopened) == 4 and reopened.dropped == 3
    assert reopened.put(b"record 8") > names[-1]  # numbering continues after a restart


class Subscriber:
    """A real MQTT subscriber with a persistent session (as the collector has)."""

    def __init__(self, port: int, topic: str):
        self.received: list[dict] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex[:8]}",
                                  clean_session=False)
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_message = lambda c, u, m: self.received.append(json.loads(m.payload))
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()

    def wait(self, condition, timeout_s=30.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not condition():
            time.sleep(0.05)
        return condition()

    def stop(self):
        self.client.disconnect()
        self.client.loop_stop()


def _feed(aggregator, stop):
    while not stop.is_set():
        aggregator.on_inference(Inference(latency_ms=1.5, outputs=one_hot([1])))
        time.sleep(0.01)


def test_no_record_is_lost_when_the_broker_is_killed_and_restarted(tmp_path):
    fleet = f"t{uuid.uuid4().hex[:8]}"
    with LocalBroker() as broker:
        subscriber = Subscriber(broker.port, f"edgeship/{fleet}/devices/+/telemetry")
        assert subscriber.wait(lambda: subscriber.client.is_connected(), 10)
        time.sleep(1.2)  # the broker's autosave has the subscriber's session before the crash
        identity = DeviceIdentity(device_id="dev-1", model_name="digits")
        aggregator = WindowAggregator(identity, progress_dir=tmp_path)
        stop = threading.Event()
        feeder = threading.Thread(target=_feed, args=(aggregator, stop))
        feeder.start()
        reporter = TelemetryReporter(aggregator, Spool(tmp_path), MqttSettings(port=broker.port, fleet=fleet),
                                     window_s=0.2)
        try:
            with reporter:
                assert subscriber.wait(lambda: len(subscriber.received) >= 3, 10)
                broker.kill()
                time.sleep(1.5)  # records keep being made and spooled while the broker is down
                assert len(reporter.spool) >= 3
                broker.start()
                assert subscriber.wait(lambda: len(reporter.spool) <= 1, 20), f"{len(reporter.spool)} still spooled"
            sent = reporter.records
            assert subscriber.wait(lambda: {r["sequence"] for r in subscriber.received} >= set(range(1, sent + 1)), 30)
        finally:
            stop.set()
            feeder.join()
            subscriber.stop()
        sequences = {r["sequence"] for r in subscriber.received}
        assert sequences == set(range(1, sent + 1)), f"lost {set(range(1, sent + 1)) - sequences}"
        assert sum(r["inferences"] for r in {r["sequence"]: r for r in subscriber.received}.values()) > 50
        assert len(reporter.spool) == 0


def test_spooled_records_are_sent_after_a_process_restart(tmp_path):
    fleet = f"t{uuid.uuid4().hex[:8]}"
    with LocalBroker() as broker:
        port = broker.port
    # no broker: the first "process" spools three windows and stops
    identity = DeviceIdentity(device_id="dev-2")
    first = TelemetryReporter(WindowAggregator(identity, progress_dir=tmp_path), Spool(tmp_path),
                              MqttSettings(port=port, fleet=fleet), window_s=3600)
    with first:
        for _ in range(3):
            first.flush()
    assert len(Spool(tmp_path)) == 4  # three flushes and the one on exit
    with LocalBroker(port=port) as broker:
        subscriber = Subscriber(broker.port, f"edgeship/{fleet}/devices/+/telemetry")
        assert subscriber.wait(lambda: subscriber.client.is_connected(), 10)
        second = TelemetryReporter(WindowAggregator(identity, progress_dir=tmp_path), Spool(tmp_path),
                                   MqttSettings(port=port, fleet=fleet), window_s=3600)
        try:
            with second:  # the spooled four arrive; the fifth is the window closed on exit
                assert subscriber.wait(lambda: len({r["sequence"] for r in subscriber.received}) >= 4, 20)
            assert subscriber.wait(lambda: len({r["sequence"] for r in subscriber.received}) >= 5, 10)
        finally:
            subscriber.stop()
    assert {r["sequence"] for r in subscriber.received} == {1, 2, 3, 4, 5}


def test_the_fleet_loop_device_modules_import_no_heavy_frameworks():
    import subprocess
    import sys

    modules = ["edgeship.device.telemetry", "edgeship.device.telemetry_mqtt", "edgeship.device.telemetry_spool",
               "edgeship.device.shadow", "edgeship.device.serve",
               "edgeship.device.serve_http", "edgeship.device.cli"]
    script = (f"import importlib, json, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
              "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))")
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                                           text=True, timeout=60).stdout))
    assert "paho" in loaded and not loaded & {"torch", "tensorflow", "mlflow", "prefect"}
