"""The collector on a real broker, storing into SQLite and into a real PostgreSQL (a database of its own)."""

from __future__ import annotations

import os
import uuid

import psutil

import paho.mqtt.client as mqtt
import pytest

from edgeship.device.telemetry import WindowAggregator
from edgeship.records.telemetry import DeviceIdentity
from edgeship.device.telemetry_mqtt import MqttSettings, TelemetryReporter
from edgeship.device.telemetry_spool import Spool
from edgeship.fleet.broker import LocalBroker
from edgeship.fleet.collector import Collector
from edgeship.fleet.store import FleetStore

from fleet_records import record


def test_collector_stores_each_record_once_from_real_devices(tmp_path, store_url):
    fleet = f"t{uuid.uuid4().hex[:8]}"
    store = FleetStore(store_url)
    with LocalBroker() as broker:
        settings = MqttSettings(port=broker.port, fleet=fleet)
        with Collector(settings, store, client_id=f"collector-{fleet}") as collector:
            assert collector.connected.wait(10)
            reporters = []
            for i in range(3):
                identity = DeviceIdentity(device_id=f"dev-{i}", model_name="digits", device_class="pi4")
                aggregator = WindowAggregator(identity, progress_dir=tmp_path / f"dev-{i}",
                                              versions=lambda: record("x", "7").versions)
                reporters.append(TelemetryReporter(aggregator, Spool(tmp_path / f"dev-{i}"), settings, window_s=3600))
            for reporter in reporters:
                with reporter:
                    reporter.flush()
            assert collector.wait_for(lambda: collector.stored >= 6, 20)  # one flush + one on exit, each

            # a QoS 1 redelivery (same record twice) and a message that is not a record
            raw = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"raw-{fleet}")
            raw.connect("127.0.0.1", broker.port)
            raw.loop_start()
            duplicate = record("dev-9", "8", device_class="jetson").to_bytes()
            for payload in (duplicate, duplicate, b"not json"):
                raw.publish(settings.telemetry_topic("dev-9"), payload, qos=1).wait_for_publish(5)
            raw.disconnect()
            raw.loop_stop()
            assert collector.wait_for(lambda: collector.stored == 7 and collector.duplicates == 1
                                      and collector.rejected == 1, 20)
    assert store.count_records() == 7
    assert "dev-0/1" in store.record_ids() and "dev-9/1" in store.record_ids()
    snapshot = store.snapshot("stable")
    assert sorted(snapshot.versions) == ["7", "8"] and snapshot.versions["8"].classes["jetson"].devices == 1
    assert set(snapshot.versions["7"].devices) == {"dev-0", "dev-1", "dev-2"}
    store.close()


def test_fleet_collect_starts_an_in_process_broker_and_status_shows_the_table(tmp_path):
    import socket
    import subprocess
    import sys
    import time

    from edgeship.fleet.broker import free_port

    (tmp_path / "params.yaml").write_text("fleet: {name: clitest, store: 'sqlite:///fleet.db'}\n")
    port = free_port()
    cli = [sys.executable, "-m", "edgeship.cli", "fleet"]
    collector = subprocess.Popen([*cli, "collect", "-C", str(tmp_path), "--port", str(port), "--for", "60"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(1.0)  # the collector subscribes right after the broker listens
        assert psutil.Process(collector.pid).children() == []  # the broker runs inside the collector's process
        settings = MqttSettings(port=port, fleet="clitest")
        identity = DeviceIdentity(device_id="cli-dev", model_name="digits", device_class="pi4")
        aggregator = WindowAggregator(identity, progress_dir=tmp_path / "dev",
                                      versions=lambda: record("x", "7").versions)
        from test_telemetry import Inference, one_hot

        for _ in range(50):
            aggregator.on_inference(Inference(latency_ms=3.0, outputs=one_hot([2])))
        with TelemetryReporter(aggregator, Spool(tmp_path / "dev"), settings, window_s=3600):
            pass
        store = FleetStore(f"sqlite:///{tmp_path}/fleet.db")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and store.count_records() < 1:
            time.sleep(0.2)
        assert store.count_records() == 1
        store.close()
    finally:
        collector.terminate()
        output = collector.communicate(timeout=20)[0]
    assert "started a local broker (embedded)" in output and "stored 1 records" in output
    with socket.socket() as probe:  # the broker stopped with the collector
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    shown = subprocess.run([*cli, "status", "-C", str(tmp_path), "--channel", "stable"], capture_output=True,
                           text=True, timeout=60, env={**os.environ, "COLUMNS": "250"})
    assert shown.returncode == 0, shown.stderr
    row = next(line for line in shown.stdout.splitlines() if "pi4" in line)
    assert "│ 7 " in row and " 50 " in row  # version 7 on pi4, 50 inferences
