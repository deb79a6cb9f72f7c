"""The default MQTT broker of `edgeship fleet collect` (no `fleet.broker` in params.yaml): amqtt, in-process.

A background thread runs the broker on its own asyncio loop, listening on 127.0.0.1:<free port>, so a
laptop demo needs no set-up and no binary. QoS 1, retained messages and persistent sessions
(clean_session=False: the collector's subscriptions, and the QoS 1 messages queued for it while it
reconnects) work for as long as the process runs; nothing survives the process (edgeship.fleet.broker's
Mosquitto keeps sessions on disk, for tests that kill a broker).

Measured limits of amqtt 0.12.1, where Mosquitto does better: a QoS 1 message in flight to the collector
when it disconnects, or not acknowledged within 5 s, is dropped instead of redelivered. The collector
acknowledges after storing and reconnects for a redelivery when its store keeps failing; with this
broker that record is lost (`edgeship fleet collect --local-broker mosquitto` keeps it).

    >>> with EmbeddedBroker() as broker:
    ...     settings = MqttSettings(host="127.0.0.1", port=broker.port, fleet="lab")
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass

from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin

from edgeship.errors import ConfigError
from edgeship.fleet.broker import free_port


class LoopbackAuth(BaseAuthPlugin):
    """Every client is accepted and none counts as anonymous: amqtt drops what it queued for a disconnected
    persistent session when its client is anonymous, and on a loopback-only broker there is no one to tell apart."""

    @dataclass
    class Config:
        pass

    async def authenticate(self, *, session) -> bool:
        return True


class EmbeddedBroker:
    """An amqtt broker in a background thread of this process, on 127.0.0.1:<port> (a free one by default)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._broker: Broker | None = None

    def _config(self) -> dict:
        return {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
                "plugins": {f"{__name__}.LoopbackAuth": {}}}  # no $SYS topics, no packet logging

    async def _boot(self) -> None:
        self._broker = Broker(self._config(), loop=self._loop)
        await self._broker.start()

    def start(self, timeout_s: float = 10.0) -> EmbeddedBroker:
        for name in ("amqtt", "transitions"):  # amqtt logs every connection at INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"edgeship-broker-{self.port}",
                                        daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._boot(), self._loop).result(timeout_s)
        except Exception as error:  # a busy port, mostly
            self._halt(timeout_s)
            raise ConfigError(f"the in-process MQTT broker did not start on 127.0.0.1:{self.port}: "
                              f"{error or type(error).__name__}") from error
        return self

    def session_state(self, client_id: str, timeout_s: float = 5.0) -> str | None:
        """'connected', 'disconnected' (a persistent session kept for its client), or None (no session)."""
        async def read() -> str | None:
            entry = self._broker._sessions.get(client_id) if self._broker is not None else None
            return entry[0].transitions.state if entry else None

        return asyncio.run_coroutine_threadsafe(read(), self._loop).result(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._thread is None:
            return
        try:
            if self._broker is not None:
                asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(timeout_s)
        finally:
            self._halt(timeout_s)

    def _halt(self, timeout_s: float) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s)
        self._thread = None
        self._loop.close()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
