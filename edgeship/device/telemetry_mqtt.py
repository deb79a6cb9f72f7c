"""Telemetry over MQTT (paho-mqtt 2.x, QoS 1), fed from the disk spool.

Topics, per fleet and device:
    edgeship/<fleet>/devices/<device_id>/telemetry   one TelemetryRecord per window (QoS 1)
    edgeship/<fleet>/devices/<device_id>/state       retained: versions per slot, last window, online
    edgeship/<fleet>/replay                          retained, from the collectors: "resend what you sent lately"

A record leaves the spool only when the broker acknowledged it (PUBACK). A broker outage or a process
restart therefore loses nothing within the spool's budget; it can deliver a record twice, which the
collector absorbs (records carry a unique `record_id`). It also resends what the broker acknowledged in the
last `replay_s` when a collector asks (`.../replay`): a collector that reconnected after a broker restart
(Mosquitto 2.0 does not restore shared subscriptions from its persistence file, so what devices published
before the collectors subscribed again went nowhere) or that starts without a session.

    >>> settings = MqttSettings(host="127.0.0.1", port=1883, fleet="lab")
    >>> reporter = TelemetryReporter(aggregator, Spool(state_dir / "telemetry"), settings, window_s=60)
    >>> with reporter:                         # publishes every window until the block ends
    ...     serve_the_application()
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import paho.mqtt.client as mqtt

from edgeship.device.telemetry import TelemetryRecord, WindowAggregator
from edgeship.device.telemetry_spool import Spool
from edgeship.errors import ConfigError

logger = logging.getLogger(__name__)
_INFLIGHT = 20


@dataclass(frozen=True)
class MqttSettings:
    """Where telemetry goes and how to authenticate.

    Args:
        host, port: the broker (Mosquitto, EMQX, AWS IoT Core, ...).
        fleet: topic namespace, `edgeship/<fleet>/...`.
        tls: connect over TLS; `ca_file` (the broker's CA), `cert_file`/`key_file` (client certificate).
        username: with the password read from the environment variable `password_env` (never from a file).
    """

    host: str = "127.0.0.1"
    port: int = 1883
    fleet: str = "default"
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password_env: str | None = None
    keepalive_s: int = 15

    def telemetry_topic(self, device_id: str) -> str:
        return f"edgeship/{self.fleet}/devices/{device_id}/telemetry"

    def state_topic(self, device_id: str) -> str:
        return f"edgeship/{self.fleet}/devices/{device_id}/state"

    def replay_topic(self) -> str:
        return f"edgeship/{self.fleet}/replay"

    def subscriptions(self) -> list[str]:
        return [f"edgeship/{self.fleet}/devices/+/telemetry", f"edgeship/{self.fleet}/devices/+/state"]


def mqtt_client(settings: MqttSettings, client_id: str, clean_session: bool = True, mqtt5: bool = False,
                reconnect: bool = True) -> mqtt.Client:
    """A paho client configured from settings (callback API version 2), not yet connected.

    `mqtt5`: speak MQTT 5 (session expiry, Receive Maximum, shared subscriptions; the session is then chosen
    at connect time, `clean_session` is not used); `reconnect=False`: do not reconnect after a disconnect."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         clean_session=None if mqtt5 else clean_session,
                         protocol=mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311, reconnect_on_failure=reconnect)
    if settings.username:
        password = None
        if settings.password_env:
            password = os.environ.get(settings.password_env)
            if password is None:
                raise ConfigError(f"MQTT password variable {settings.password_env} is not set; export it "
                                  "or remove password_env from the telemetry settings")
        client.username_pw_set(settings.username, password)
    if settings.tls:
        client.tls_set(ca_certs=settings.ca_file, certfile=settings.cert_file, keyfile=settings.key_file,
                       tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.reconnect_delay_set(min_delay=1, max_delay=5)
    client.max_inflight_messages_set(_INFLIGHT)
    return client


class TelemetryPublisher:
    """Drains the spool to the broker; keeps retrying through outages (paho reconnects on its own)."""

    def __init__(self, spool: Spool, settings: MqttSettings, device_id: str, replay_s: float = 30.0):
        self.spool, self.settings, self.device_id, self.replay_s = spool, settings, device_id, replay_s
        self._connected_before = False
        self.client = mqtt_client(settings, client_id=f"edgeship-device-{device_id}")
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_replay_request
        self._replay_requests: set[str] = set()
        self._inflight: dict[int, str] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.acknowledged = 0
        self._state: dict | None = None

    def start(self) -> None:
        self.client.connect_async(self.settings.host, self.settings.port, keepalive=self.settings.keepalive_s)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._pump, name="edgeship-telemetry", daemon=True)
        self._thread.start()

    def stop(self, drain_s: float = 2.0) -> None:
        """Give what is spooled `drain_s` to be acknowledged, then disconnect; the rest stays spooled."""
        deadline = time.monotonic() + drain_s
        while len(self.spool) and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self.client.disconnect()
        self.client.loop_stop()

    def kick(self) -> None:
        """Something new is spooled."""
        self._wake.set()

    def publish_state(self, state: dict) -> None:
        """The retained state message (sent now if connected, else on the next connect)."""
        self._state = state
        if self.client.is_connected():
            self.client.publish(self.settings.state_topic(self.device_id), json.dumps(state), qos=1, retain=True)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            logger.warning("broker refused the connection: %s", reason_code)
            return
        if self._connected_before:
            # The broker may have crashed with records it acknowledged but never delivered: send them again.
            replayed = self.spool.replay(self.replay_s)
            logger.info("reconnected; replaying %d recently sent records", replayed)
        self._connected_before = True
        client.subscribe(self.settings.replay_topic(), qos=1)
        if self._state is not None:
            client.publish(self.settings.state_topic(self.device_id), json.dumps(self._state), qos=1, retain=True)
        self._wake.set()

    def _on_replay_request(self, client, userdata, message) -> None:
        """A collector asks for what the broker acknowledged lately (each request once per process)."""
        try:
            request = json.loads(message.payload) if message.payload else {}
        except ValueError:
            return
        key = f"{request.get('by')}@{request.get('at')}"
        if not request.get("at") or key in self._replay_requests:
            return
        self._replay_requests.add(key)
        replayed = self.spool.replay(self.replay_s)
        logger.info("collector %s asked for a replay; resending %d records", request.get("by"), replayed)
        self._wake.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        # Unacknowledged records are still in the spool: publish them again after the reconnect.
        with self._lock:
            self._inflight.clear()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            name = self._inflight.pop(mid, None)
        if name is not None:
            self.spool.ack(name)
            self.acknowledged += 1
            self._wake.set()

    def _pump(self) -> None:
        pruned = time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            if time.monotonic() - pruned > 5.0:
                self.spool.prune_sent(self.replay_s)
                pruned = time.monotonic()
            if not self.client.is_connected():
                continue
            with self._lock:
                busy = set(self._inflight.values())
                room = _INFLIGHT - len(self._inflight)
            if room <= 0:
                continue
            for name, payload in self.spool.pending(limit=len(busy) + room):
                if name in busy:
                    continue
                info = self.client.publish(self.settings.telemetry_topic(self.device_id), payload, qos=1)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    break
                with self._lock:
                    self._inflight[info.mid] = name
                    if not self.client.is_connected():  # lost while publishing: on_disconnect already cleared
                        self._inflight.pop(info.mid, None)


class TelemetryReporter:
    """Closes a window every `window_s`, spools its record and lets the publisher send it."""

    def __init__(self, aggregator: WindowAggregator, spool: Spool, settings: MqttSettings, window_s: float = 60.0):
        self.aggregator, self.spool, self.window_s = aggregator, spool, window_s
        self.publisher = TelemetryPublisher(spool, settings, aggregator.identity.device_id)
        self.records = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> TelemetryReporter:
        self.publisher.start()
        self._thread = threading.Thread(target=self._loop, name="edgeship-telemetry-window", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self, drain_s: float = 2.0) -> None:
        """Stop the windows, spool the last one and give the publisher `drain_s` to send what is spooled."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.flush()
        self.publisher.stop(drain_s=drain_s)

    def flush(self) -> TelemetryRecord:
        """Close the current window now and spool its record."""
        record = self.aggregator.close_window(spool_dropped=self.spool.dropped)
        self.spool.put(record.to_bytes())
        self.records += 1
        self.publisher.publish_state({"device_id": record.device_id, "versions": record.versions.model_dump(),
                                      "last_window_end": record.window_end.isoformat(), "sequence": record.sequence,
                                      "at": datetime.now(timezone.utc).isoformat()})
        self.publisher.kick()
        return record

    def _loop(self) -> None:
        while not self._stop.wait(self.window_s):
            try:
                self.flush()
            except Exception:  # telemetry must never take the application down
                logger.exception("telemetry window failed")
