"""The embedded broker (amqtt, in-process): the default of `edgeship fleet collect` when params.yaml names none.
Real paho clients on loopback: devices' telemetry at QoS 1 reaches the collector, the retained state topic
reaches a late subscriber, and the collector's persistent session queues what devices send while it is away."""

from __future__ import annotations

import json
import socket
import threading
import uuid

import paho.mqtt.client as mqtt

from edgeship.device.telemetry import WindowAggregator
from edgeship.records.telemetry import DeviceIdentity
from edgeship.device.telemetry_mqtt import MqttSettings, TelemetryReporter
from edgeship.device.telemetry_spool import Spool
from edgeship.fleet.collector import Collector, CollectorSettings, wait_until
from edgeship.fleet.embedded_broker import EmbeddedBroker
from edgeship.fleet.store import FleetStore

from fleet_records import record


def test_embedded_broker_carries_telemetry_and_keeps_the_collectors_session(tmp_path):
    fleet = f"e{uuid.uuid4().hex[:8]}"
    store = FleetStore(f"sqlite:///{tmp_path}/fleet.db")
    with EmbeddedBroker() as broker:
        settings = MqttSettings(port=broker.port, fleet=fleet)
        collector_id = f"collector-{fleet}"
        alone = CollectorSettings(group=None)   # amqtt speaks MQTT 3.1.1: plain subscriptions, one collector
        collector = Collector(settings, store, client_id=collector_id, options=alone).start()
        assert collector.connected.wait(10)
        identity = DeviceIdentity(device_id="dev-1", model_name="digits", device_class="pi4")
        aggregator = WindowAggregator(identity, progress_dir=tmp_path / "dev-1",
                                      versions=lambda: record("x", "7").versions)
        with TelemetryReporter(aggregator, Spool(tmp_path / "dev-1"), settings, window_s=3600) as reporter:
            reporter.flush()
            assert collector.wait_for(lambda: collector.stored == 1, 10)

            # the collector goes away; its persistent session (clean_session=False) queues the QoS 1 records
            collector.stop()
            assert wait_until(lambda: broker.session_state(collector_id) == "disconnected")
            for _ in range(3):
                reporter.flush()
            assert wait_until(lambda: len(reporter.spool) == 0)  # the broker acknowledged all three
            back = Collector(settings, store, client_id=collector_id, options=alone).start()
            assert back.wait_for(lambda: back.stored == 3, 10), back.stored

            # the retained state topic: a subscriber that comes later still gets each device's last state
            states: list[tuple[str, bool, dict]] = []
            got = threading.Event()
            late = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"late-{fleet}")
            late.on_message = lambda c, u, m: (states.append((m.topic, m.retain, json.loads(m.payload))), got.set())
            late.connect("127.0.0.1", broker.port)
            late.subscribe(settings.state_topic("+"), qos=1)
            late.loop_start()
            try:
                assert got.wait(10)
            finally:
                late.disconnect()
                late.loop_stop()
        assert back.wait_for(lambda: back.stored == 4, 10)  # the reporter's last window, sent as it closed
        back.stop()
    topic, retained, state = states[0]
    assert topic == settings.state_topic("dev-1") and retained and state["sequence"] == 4
    assert store.count_records() == 5 and {f"dev-1/{i}" for i in range(1, 6)} == store.record_ids()
    store.close()
    with socket.socket() as probe:  # stopped: nothing listens on its port any more
        assert probe.connect_ex(("127.0.0.1", broker.port)) != 0
    assert not any(t.name.startswith("edgeship-broker") for t in threading.enumerate())
