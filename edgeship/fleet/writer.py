"""The collector's writer: stores what MQTT delivers in batches, and acknowledges each message after its batch
committed.

The MQTT threads only queue deliveries; one writer thread takes up to `batch_size` of them (or what came within
`max_delay_s` of the first), parses them, stores the batch in one transaction (`FleetStore.add_batch`:
records, events, rollups, device states) and only then sends each PUBACK, in the order the messages came. A
crash before the commit leaves every message of the batch unacknowledged: the broker sends them again (at
least once, end to end), and the store absorbs what was already stored. A message that is not a record is
acknowledged and counted, never retried.

    >>> writer = BatchWriter(store, batch_size=500).start()
    >>> writer.put(Delivery(topic, payload, mid, qos, connection, connection.generation))
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pydantic import ValidationError

from edgeship.fleet.store import FleetStore
from edgeship.records.telemetry import TelemetryRecord

logger = logging.getLogger(__name__)


class Source(Protocol):
    """Where deliveries come from (an MQTT connection): it acknowledges them, or asks the broker to resend."""

    generation: int
    settled: int

    def ack(self, delivery: Delivery) -> None: ...

    def redeliver(self) -> None: ...


@dataclass(slots=True)
class Delivery:
    topic: str
    payload: bytes
    mid: int
    qos: int
    source: Source
    generation: int           # the source's connection it came on: an ack on a later connection would be wrong


class BatchWriter:
    """One thread that stores deliveries in batches and acknowledges them after the commit."""

    def __init__(self, store: FleetStore, batch_size: int = 500, max_delay_s: float = 0.2, attempts: int = 5,
                 on_batch: Callable[[list[TelemetryRecord]], None] | None = None):
        self.store, self.batch_size, self.max_delay_s, self.attempts = store, batch_size, max_delay_s, attempts
        self.on_batch = on_batch
        self.stored = self.duplicates = self.rejected = self.batches = self.failures = 0
        self._queue: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> BatchWriter:
        self._thread = threading.Thread(target=self._run, name="edgeship-collector-writer", daemon=True)
        self._thread.start()
        return self

    def put(self, delivery: Delivery) -> None:
        self._queue.put(delivery)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Store and acknowledge what is queued, then end the thread."""
        self._stopping.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _take(self) -> list[Delivery]:
        try:
            first = self._queue.get(timeout=0.5)
        except queue.Empty:
            return []
        if first is None:
            return []
        batch, deadline = [first], time.monotonic() + self.max_delay_s
        while len(batch) < self.batch_size:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)   # keep the stop signal for the loop
                break
            batch.append(item)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch:
                self._write(batch)
            elif self._stopping.is_set() and self._queue.empty():
                return

    def _write(self, batch: list[Delivery]) -> None:
        records: list[TelemetryRecord] = []
        payloads: list[bytes] = []
        states: dict[str, dict] = {}
        for delivery in batch:
            try:
                if delivery.topic.endswith("/state"):
                    if delivery.payload:  # an empty retained message clears a state
                        states[delivery.topic.split("/")[-2]] = json.loads(delivery.payload)
                else:
                    records.append(TelemetryRecord.from_bytes(delivery.payload))
                    payloads.append(delivery.payload)
            except (ValidationError, ValueError) as error:
                self.rejected += 1  # not a record: acknowledged below, so it is not redelivered forever
                logger.warning("rejected a message on %s: %s", delivery.topic, error)
        for attempt in range(self.attempts):
            try:
                new = self.store.add_batch(records, states, payloads=payloads)
                break
            except Exception:
                if attempt + 1 < self.attempts:
                    time.sleep(0.2 * 2 ** attempt)
                    continue
                # Nothing of the batch is acknowledged: ask each connection to resend what it has not acked.
                self.failures += 1
                logger.exception("could not store a batch of %d messages; reconnecting for a redelivery", len(batch))
                for source in {id(d.source): d.source for d in batch}.values():
                    source.redeliver()
                for delivery in batch:
                    delivery.source.settled += 1
                return
        self.batches += 1
        self.stored += sum(new)
        self.duplicates += len(new) - sum(new)
        for delivery in batch:
            delivery.source.ack(delivery)
            delivery.source.settled += 1
        if self.on_batch is not None and any(new):
            try:
                self.on_batch([r for r, fresh in zip(records, new) if fresh])
            except Exception:
                logger.exception("on_batch failed")
