"""Collectors as processes (`edgeship fleet collect`) on a real Mosquitto, fed by the fleet load generator: one
killed mid-batch loses nothing and doubles nothing; of two sharing the topics (MQTT 5 shared subscription),
one killed for good: the other adopts its session and everything is stored, without waiting for it."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import paho.mqtt.client as mqtt
import pytest
import yaml

from edgeship.device.telemetry_mqtt import MqttSettings
from edgeship.fleet.aggregate import aggregate
from edgeship.fleet.broker import LocalBroker
from edgeship.fleet.collector import wait_until
from edgeship.fleet.loadgen import FleetLoad, FleetProfile
from edgeship.fleet.store import FleetStore

from test_fleet_ingest import summary

START = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=2)


class Members:
    """The collectors' retained status topics, as a client of the broker sees them."""

    def __init__(self, port: int, fleet: str):
        self.states: dict[str, str] = {}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{fleet}")
        self.client.on_message = lambda c, u, m: self.states.__setitem__(
            m.topic.rsplit("/", 1)[-1], json.loads(m.payload)["state"] if m.payload else "cleared")
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"edgeship/{fleet}/collectors/+", qos=1)
        self.client.loop_start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def fleet_world(tmp_path):
    """A Mosquitto of its own, a project directory whose params.yaml names it, and a load of 60 devices."""
    fleet = f"c{uuid.uuid4().hex[:8]}"
    with LocalBroker() as broker:
        def project(store_url: str):
            (tmp_path / "params.yaml").write_text(yaml.safe_dump({"fleet": {
                "name": fleet, "broker": {"host": "127.0.0.1", "port": broker.port}, "store": store_url,
                "collector": {"batch_size": 100, "max_delay_s": 0.1, "receive_maximum": 200}}}))
        settings = MqttSettings(port=broker.port, fleet=fleet)
        load = FleetLoad(FleetProfile(devices=60, templates=2), settings, connections=2)
        members = Members(broker.port, fleet)
        processes: list[subprocess.Popen] = []

        def collector(member: str) -> subprocess.Popen:
            processes.append(subprocess.Popen([sys.executable, "-m", "edgeship.cli", "fleet", "collect", "-C",
                                               str(tmp_path), "--member", member], stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True))
            assert wait_until(lambda: members.states.get(member) == "up", 60), f"collector {member} never came up"
            return processes[-1]

        yield project, collector, load, members
        members.close()
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.communicate(timeout=30)


def stored_once_and_rolled_up(store_url: str, published: int) -> None:
    store = FleetStore(store_url)
    records = store.records()
    assert len(records) == published == len({r.record_id for r in records})
    assert summary(store.snapshot(None)) == summary(aggregate(records))
    store.close()


def test_a_collector_killed_mid_batch_loses_nothing_and_doubles_nothing(fleet_world, tmp_path):
    project, collector, load, _ = fleet_world
    project(f"sqlite:///{tmp_path}/fleet.db")
    first = collector("a")
    load.publish(rate=2000, count=150, start=START)
    store = FleetStore(f"sqlite:///{tmp_path}/fleet.db")
    assert wait_until(lambda: store.count_records() >= 150, 60)
    # Hold the database: the collector's next batch is taken, parsed and stuck before its commit.
    blocker = sqlite3.connect(tmp_path / "fleet.db", timeout=30)
    blocker.execute("BEGIN EXCLUSIVE")
    load.publish(rate=2000, count=150)                # the next 150 windows (sequence 4, 5, 6 of each device)
    time.sleep(1.5)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    blocker.rollback()
    blocker.close()
    assert store.count_records() == 150               # nothing of the batch in flight was committed
    collector("a")                                    # back as the same member: its session is redelivered
    assert wait_until(lambda: store.count_records() >= 300, 60), store.count_records()
    store.close()
    stored_once_and_rolled_up(f"sqlite:///{tmp_path}/fleet.db", 300)


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_two_collectors_share_the_topics_and_one_killed_is_adopted(fleet_world, store_url):
    project, collector, load, members = fleet_world
    project(store_url)
    collector("a")
    doomed = collector("b")
    publishing = threading.Thread(target=load.publish, kwargs={"rate": 200, "count": 900, "start": START})
    publishing.start()
    time.sleep(1.5)
    doomed.send_signal(signal.SIGKILL)                # b dies with its share in flight and queued
    doomed.wait(10)
    publishing.join(60)
    assert load.published == 900 and load.acknowledged == 900
    store = FleetStore(store_url)
    # b never comes back: a adopts its session (the broker's will says b is gone), stores what it held, ends it
    assert wait_until(lambda: store.count_records() >= 900, 60), store.count_records()
    assert wait_until(lambda: members.states.get("b") == "cleared", 20)
    store.close()
    stored_once_and_rolled_up(store_url, 900)


def test_loadgen_status_replay_and_prune_as_the_docs_type_them(fleet_world, tmp_path, monkeypatch):
    """docs/fleet-loop.md's block, line by line, in this process (no Python start per command)."""
    import shlex

    from typer.testing import CliRunner

    from edgeship.cli import app

    from doc_blocks import doc_block

    project, collector, _, _ = fleet_world
    project(f"sqlite:///{tmp_path}/fleet.db")
    collector("a")
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.chdir(tmp_path)
    script = doc_block("docs/fleet-loop.md", "fleet-at-scale",
                       replace={"--devices 10000 --rate 2000 --for 60": "--devices 40 --rate 400 --count 120"})
    said = []
    for line in script.splitlines():
        words = shlex.split(line, comments=True)
        assert words[0] == ".venv/bin/edgeship", line
        done = CliRunner().invoke(app, words[1:])
        assert done.exit_code == 0, done.output
        said.append(done.output)
        if words[2] == "loadgen":
            store = FleetStore(f"sqlite:///{tmp_path}/fleet.db")
            assert wait_until(lambda: store.count_records() >= 120, 60)
            before = summary(store.snapshot(None))
    loadgen, status, replay, prune = said
    assert "published 120 records" in loadgen and "120 acknowledged" in loadgen
    assert "│ base " in status and "│ candidate " in status          # both versions, per device class
    assert "replayed 120 records" in replay and summary(store.snapshot(None)) == before
    assert "records: 0" in prune                                       # nothing past the 7-day retention
    store.close()


def test_a_broker_restart_loses_nothing_on_a_shared_subscription(tmp_path):
    """Mosquitto 2.0 restores no shared subscription from its persistence file: what devices send between its
    restart and the collector's next subscribe goes nowhere, unless the collector asks them to resend."""
    from edgeship.device.telemetry import WindowAggregator
    from edgeship.device.telemetry_mqtt import TelemetryReporter
    from edgeship.device.telemetry_spool import Spool
    from edgeship.fleet.collector import Collector, CollectorSettings
    from edgeship.records.telemetry import DeviceIdentity

    fleet = f"r{uuid.uuid4().hex[:8]}"
    store = FleetStore(f"sqlite:///{tmp_path}/fleet.db")
    with LocalBroker() as broker:
        settings = MqttSettings(port=broker.port, fleet=fleet)
        collector = Collector(settings, store, options=CollectorSettings(member="a")).start()
        assert collector.connected.wait(10)
        time.sleep(1.2)                               # the broker's autosave has the collector's session
        reporters = [TelemetryReporter(WindowAggregator(DeviceIdentity(device_id=f"dev-{i}"),
                                                        progress_dir=tmp_path / f"dev-{i}"),
                                       Spool(tmp_path / f"dev-{i}"), settings, window_s=0.25) for i in range(3)]
        for reporter in reporters:
            reporter.__enter__()
        assert wait_until(lambda: collector.stored >= 6, 20)
        collector.client.reconnect_delay_set(min_delay=4, max_delay=4)   # it comes back after the devices
        broker.restart(down_s=1.0)                    # devices reconnect within a second and send
        time.sleep(6.0)
        for reporter in reporters:
            reporter.close()
        made = sum(reporter.records for reporter in reporters)
        assert all(len(reporter.spool) == 0 for reporter in reporters)   # the broker acknowledged every record
        assert wait_until(lambda: store.count_records() >= made, 30), f"{store.count_records()} of {made} stored"
        collector.stop()
    assert store.count_records() == made and collector.duplicates >= 1      # some were sent twice: absorbed
    store.close()
