"""The collector: subscribes to every device's telemetry and state topics and stores them.

It holds a persistent MQTT session (clean_session=False, a fixed client id), so a broker with
persistence keeps queueing the fleet's records while the collector is away, and acknowledges a
record only after the store has it (manual acks): at least once, end to end. Duplicates are absorbed
by the store's keys.

    >>> with Collector(MqttSettings(fleet="lab"), FleetStore("sqlite:///fleet.db")) as collector:
    ...     collector.wait_for(lambda: collector.stored >= 10, timeout_s=30)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

from pydantic import ValidationError

from edgeship.device.telemetry_mqtt import MqttSettings, mqtt_client
from edgeship.fleet.store import FleetStore
from edgeship.records.telemetry import TelemetryRecord

logger = logging.getLogger(__name__)
_STORE_ATTEMPTS = 5


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Poll `condition` every 50 ms until it holds or `timeout_s` passes; its last answer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


class Collector:
    """Stores what the fleet publishes, until stopped."""

    def __init__(self, settings: MqttSettings, store: FleetStore, client_id: str | None = None,
                 on_record: Callable[[TelemetryRecord], None] | None = None):
        self.settings, self.store = settings, store
        # A persistent session, and acknowledgements only after the record is stored.
        self.client = mqtt_client(settings, client_id=client_id or f"edgeship-collector-{settings.fleet}",
                                  clean_session=False)
        self.client.manual_ack_set(True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.on_record = on_record
        self.stored = 0
        self.duplicates = 0
        self.rejected = 0
        self.connected = threading.Event()

    def start(self) -> Collector:
        self.client.connect_async(self.settings.host, self.settings.port, keepalive=self.settings.keepalive_s)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def wait_for(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        return wait_until(condition, timeout_s)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            logger.warning("broker refused the collector: %s", reason_code)
            return
        client.subscribe([(topic, 1) for topic in self.settings.subscriptions()])
        self.connected.set()

    def _on_message(self, client, userdata, message) -> None:
        for attempt in range(_STORE_ATTEMPTS):
            try:
                self._store(message.topic, message.payload)
                break
            except (ValidationError, ValueError) as error:
                self.rejected += 1  # not a record: acknowledge it so it is not redelivered forever
                logger.warning("rejected a message on %s: %s", message.topic, error)
                break
            except Exception:
                if attempt + 1 < _STORE_ATTEMPTS:
                    time.sleep(0.2 * 2 ** attempt)
                    continue
                # Unacknowledged messages block the broker's in-flight window for this session: reconnect,
                # so the broker sends this one (and everything queued behind it) again.
                logger.exception("could not store a message on %s; reconnecting for a redelivery", message.topic)
                client.disconnect()
                client.reconnect()
                return
        if message.qos > 0:
            client.ack(message.mid, message.qos)

    def _store(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if parts[-1] == "state":
            if payload:  # an empty retained message clears a state
                self.store.set_device_state(parts[-2], json.loads(payload))
            return
        record = TelemetryRecord.from_bytes(payload)
        if self.store.add_record(record):
            self.stored += 1
            if self.on_record is not None:
                self.on_record(record)
        else:
            self.duplicates += 1
