"""The collector: subscribes to every device's telemetry and state topics and stores them, in batches.

Several collectors share the fleet's topics through an MQTT 5 shared subscription (`$share/<group>/...`): the
broker hands each message to one member. Each member has its own client id (`edgeship-collector-<fleet>-
<member>`), a persistent session with an expiry, and a Receive Maximum that fits its batches (the broker's
own per-client cap, Mosquitto's `max_inflight_messages`, must be at least as large). Messages go to the
writer (edgeship.fleet.writer), which acknowledges each only after its batch committed: at least once, end to
end; duplicates are absorbed by the store's keys.

A member that stops or dies must not keep its share: Mosquitto keeps queueing a stopped member's share in
its session. So every member announces itself on `edgeship/<fleet>/collectors/<member>` (retained), with a
will that says `gone`; when a member is gone (killed: the broker publishes the will; stopped: it
disconnects with its will), the first live member by name adopts its session: connects with its client id,
unsubscribes it from the share (no new messages), stores what was queued and in flight, and ends the
session. Nothing is lost, nothing waits for the member to come back; a member that returns starts afresh.
A member that reconnects after losing its connection (or starts without a session) asks the devices, once
subscribed, to resend what the broker acknowledged lately (`edgeship/<fleet>/replay`, retained): a Mosquitto
restart loses shared subscriptions, and what devices sent before the collectors subscribed again.

With `group=None` (MQTT 3.1.1, e.g. the in-process amqtt broker) the collector is alone: plain
subscriptions on a persistent session that queues the fleet's records while it is away.

    >>> with Collector(MqttSettings(fleet="lab"), FleetStore("sqlite:///fleet.db"),
    ...                options=CollectorSettings(member="a")) as collector:
    ...     collector.wait_for(lambda: collector.stored >= 10, timeout_s=30)
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeship.device.telemetry_mqtt import MqttSettings, mqtt_client
from edgeship.fleet.store import FleetStore
from edgeship.fleet.writer import BatchWriter, Delivery
from edgeship.records.telemetry import TelemetryRecord

logger = logging.getLogger(__name__)
_TAKEN_OVER = 142   # MQTT 5 reason code: another connection took over this client id's session


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Poll `condition` every 50 ms until it holds or `timeout_s` passes; its last answer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@dataclass(frozen=True)
class CollectorSettings:
    """How one collector member receives and stores (params.yaml `fleet.collector`).

    Args:
        member: this collector's name in the group (its client id ends with it); each member its own.
        group: the shared subscription's group; None: plain subscriptions over MQTT 3.1.1 (one collector).
        session_expiry_s: how long the broker keeps a member's session (and queues its share) while away.
        receive_maximum: messages the broker may have in flight to this member (MQTT 5 Receive Maximum).
        batch_size, max_delay_s: a batch is stored when this many messages came, or this long after its first.
        adopt_idle_s: an adopted session is ended once it delivered nothing for this long.
    """

    member: str = field(default_factory=lambda: re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()))
    group: str | None = "edgeship"
    session_expiry_s: int = 600
    receive_maximum: int = 1000
    batch_size: int = 500
    max_delay_s: float = 0.2
    adopt_idle_s: float = 2.0


class Connection:
    """One MQTT session feeding the writer: the collector's own, or one adopted from a member that is gone."""

    def __init__(self, collector: Collector, client_id: str, adopted_from: str | None = None):
        self.collector, self.client_id, self.adopted_from = collector, client_id, adopted_from
        options, settings = collector.options, collector.settings
        self.mqtt5 = options.group is not None
        self.client = mqtt_client(settings, client_id=client_id, clean_session=False, mqtt5=self.mqtt5,
                                  reconnect=adopted_from is None)
        self.client.manual_ack_set(True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self._replay_mid: int | None = None
        self.generation = self.received = self.settled = 0
        self.last_message = time.monotonic()
        self.connected = threading.Event()
        self.session_present: bool | None = None
        self.finished = threading.Event()
        self._lock = threading.Lock()
        if self.mqtt5 and adopted_from is None:
            self.client.will_set(collector.status_topic(options.member), collector.status("gone"), qos=1,
                                 retain=True)

    def start(self) -> Connection:
        properties = None
        if self.mqtt5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self.collector.options.session_expiry_s
            properties.ReceiveMaximum = self.collector.options.receive_maximum
        settings = self.collector.settings
        self.client.connect_async(settings.host, settings.port, keepalive=settings.keepalive_s,
                                  **({"clean_start": False, "properties": properties} if self.mqtt5 else {}))
        self.client.loop_start()
        return self

    def stop(self, end_session: bool = False, with_will: bool = False) -> None:
        """Disconnect: keeping the session (the default), ending it, or publishing the will (a member leaving)."""
        properties, reason = None, None
        if self.mqtt5 and end_session:
            properties = Properties(PacketTypes.DISCONNECT)
            properties.SessionExpiryInterval = 0
        if self.mqtt5 and with_will:
            reason = ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")
        with self._lock:
            self.client.disconnect(reasoncode=reason, properties=properties)
            self.client.loop_stop()
        self.finished.set()

    def ack(self, delivery: Delivery) -> None:
        # An ack on a later connection would acknowledge another message: the broker resends this one instead.
        if delivery.qos > 0 and delivery.generation == self.generation:
            self.client.ack(delivery.mid, delivery.qos)

    def redeliver(self) -> None:
        """Reconnect, so the broker sends what this session has not acknowledged again."""
        with self._lock:
            self.client.disconnect()
            self.client.loop_stop()
        if self.adopted_from is None:
            self.start()
        else:  # an adopted session stays unfinished: the next adoption round picks it up
            self.finished.set()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            logger.warning("broker refused %s: %s", self.client_id, reason_code)
            return
        self.generation += 1
        self.session_present = bool(flags.session_present)
        topics = self.collector.subscriptions()
        if self.adopted_from is not None:
            # Stop the share flowing to the adopted session; what it holds still comes.
            client.unsubscribe(topics)
        else:
            _, mid = client.subscribe([(topic, 1) for topic in topics])
            # Back after losing the connection (a broker restart: Mosquitto 2.0 restores no shared subscription,
            # so what devices sent meanwhile went nowhere), or without a session: once subscribed, ask the
            # devices to resend what the broker acknowledged lately; the store absorbs the duplicates.
            self._replay_mid = mid if self.generation > 1 or not self.session_present else None
            if self.mqtt5:
                client.subscribe(self.collector.status_topic("+"), qos=1)
                client.publish(self.collector.status_topic(self.collector.options.member),
                               self.collector.status("up"), qos=1, retain=True)
        self.last_message = time.monotonic()
        self.connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if mid == self._replay_mid:
            self._replay_mid = None
            client.publish(self.collector.settings.replay_topic(), self.collector.status("replay"), qos=1,
                           retain=True)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if getattr(reason_code, "value", None) == _TAKEN_OVER:
            if self.adopted_from is None:
                logger.error("another client took over the session of %s: two collectors run as member %r; give "
                             "each its own --member", self.client_id, self.collector.options.member)
                self.collector.taken_over.set()
                threading.Thread(target=self.stop, daemon=True).start()
            else:   # the member came back and took its session: nothing left to adopt
                self.finished.set()

    def _on_message(self, client, userdata, message) -> None:
        self.last_message = time.monotonic()
        if "/collectors/" in message.topic:
            self.collector.member_status(message.topic.rsplit("/", 1)[-1], message.payload)
            if message.qos > 0:
                client.ack(message.mid, message.qos)
            return
        self.received += 1
        self.collector.writer.put(Delivery(message.topic, message.payload, message.mid, message.qos, self,
                                           self.generation))

    def drained(self) -> bool:
        return self.settled >= self.received


class Collector:
    """Stores what the fleet publishes, until stopped."""

    def __init__(self, settings: MqttSettings, store: FleetStore, client_id: str | None = None,
                 options: CollectorSettings | None = None,
                 on_batch: Callable[[list[TelemetryRecord]], None] | None = None):
        self.settings, self.store = settings, store
        self.options = options or CollectorSettings()
        self.writer = BatchWriter(store, self.options.batch_size, self.options.max_delay_s, on_batch=on_batch)
        self.client_id = client_id or self.client_id_of(self.options.member)
        self.own = Connection(self, self.client_id)
        self.connected = self.own.connected
        self.taken_over = threading.Event()
        self.members: dict[str, dict] = {}
        self.adoptions: dict[str, Connection] = {}
        self.adopted: list[str] = []           # members whose sessions this collector took over and ended
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def client(self):
        return self.own.client

    @property
    def stored(self) -> int:
        return self.writer.stored

    @property
    def duplicates(self) -> int:
        return self.writer.duplicates

    @property
    def rejected(self) -> int:
        return self.writer.rejected

    def client_id_of(self, member: str) -> str:
        return f"edgeship-collector-{self.settings.fleet}-{member}"

    def subscriptions(self) -> list[str]:
        topics = self.settings.subscriptions()
        group = self.options.group
        return [f"$share/{group}/{topic}" for topic in topics] if group else topics

    def status_topic(self, member: str) -> str:
        return f"edgeship/{self.settings.fleet}/collectors/{member}"

    def status(self, state: str) -> str:
        return json.dumps({"state": state, "client_id": self.client_id, "member": self.options.member,
                           "by": self.options.member, "at": datetime.now(timezone.utc).isoformat()})

    def start(self) -> Collector:
        self.writer.start()
        self.own.start()
        if self.options.group is not None:
            self._watcher = threading.Thread(target=self._watch, name="edgeship-collector-members", daemon=True)
            self._watcher.start()
        return self

    def stop(self, drain_s: float = 5.0) -> None:
        """Store what came, then leave: the session stays (and queues) unless another member adopts it."""
        self._stop.set()
        wait_until(lambda: self.own.drained(), drain_s)
        self.own.stop(with_will=True)
        for connection in list(self.adoptions.values()):
            connection.stop()        # unfinished: its member stays `gone`, the next adopter finishes it
        if self._watcher is not None:
            self._watcher.join(5)
        self.writer.stop()

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def wait_for(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        return wait_until(condition, timeout_s)

    # --- members of the group -------------------------------------------------------------

    def member_status(self, member: str, payload: bytes) -> None:
        try:
            self.members[member] = json.loads(payload) if payload else {"state": "cleared"}
        except ValueError:
            logger.warning("unreadable collector status for %s: %r", member, payload[:80])

    def _adopter_for(self, member: str) -> bool:
        """Whether this collector should adopt `member`: the first live member by name does."""
        live = {m for m, s in self.members.items() if s.get("state") == "up"} | {self.options.member}
        return member != self.options.member and min(live) == self.options.member

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            for member, status in list(self.members.items()):
                if status.get("state") == "gone" and member not in self.adoptions and self._adopter_for(member):
                    self._adopt(member, status.get("client_id") or self.client_id_of(member))
            for member, connection in list(self.adoptions.items()):
                if connection.finished.is_set():
                    del self.adoptions[member]
                    continue
                idle = time.monotonic() - connection.last_message > self.options.adopt_idle_s
                if connection.session_present is False or (connection.connected.is_set() and idle
                                                           and connection.drained()):
                    self._finish(member, connection)

    def _adopt(self, member: str, client_id: str) -> None:
        logger.info("collector %s adopts the session of %s (%s)", self.options.member, member, client_id)
        self.adoptions[member] = Connection(self, client_id, adopted_from=member).start()

    def _finish(self, member: str, connection: Connection) -> None:
        connection.stop(end_session=True)
        del self.adoptions[member]
        if self.members.get(member, {}).get("state") == "gone":
            self.own.client.publish(self.status_topic(member), b"", qos=1, retain=True)
            self.members.pop(member, None)
        self.adopted.append(member)
        logger.info("collector %s ended the session of %s after storing %d of its messages",
                    self.options.member, member, connection.received)
