"""uvicorn for the device's services (`agent`, `serve`), with every wait bounded and the log kept small.

A device's HTTP service must outlast clients that open connections and never finish a request:
    - a connection must send its request head within `header_timeout_s` (also before each
      request on a kept-alive connection), else it is closed; an idle kept-alive one after `keep_alive_s`;
    - past `max_connections` open connections a new one is closed at once (the process keeps
      file descriptors for real clients), and requests past as many in flight are answered 503;
    - a request head may not exceed h11's 16 KB (uvicorn's default);
    - errors of the accept loop (out of file descriptors) and uvicorn's per-connection warnings are
      logged at most once per `log_every_s` per kind, with the count of those left out.
Request bodies have their own limits in each service (upload size, body size, upload deadline).

    >>> run_server(create_app(settings), ServerLimits(header_timeout_s=10), host="127.0.0.1", port=8765)
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    """How long a connection may wait and how many may be open (`--header-timeout-s`, `--max-connections`)."""

    header_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    max_connections: int = 64
    log_every_s: float = 10.0


class RateLimitedLog(logging.Filter):
    """Lets one record per message template through every `every_s` seconds; the next one says how many were left
    out."""

    def __init__(self, every_s: float):
        super().__init__()
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)[:200]
        now = time.monotonic()
        if now - self._last.get(key, -self.every_s) < self.every_s:
            self._left_out[key] = self._left_out.get(key, 0) + 1
            return False
        self._last[key] = now
        left_out = self._left_out.pop(key, 0)
        if left_out:
            record.msg = f"{record.msg} ({left_out} more like it in the last {self.every_s:g} s not logged)"
        return True


def run_server(app, limits: ServerLimits = ServerLimits(), log_level: str = "warning", **where) -> None:
    """Serve `app` until SIGTERM or Ctrl-C; `where`: host and port, or uds, plus uvicorn's TLS and shutdown
    settings (ssl_certfile, ssl_keyfile, timeout_graceful_shutdown)."""
    import uvicorn

    config = uvicorn.Config(app, http=_guarded_protocol(limits), timeout_keep_alive=max(1, round(limits.keep_alive_s)),
                            limit_concurrency=limits.max_connections + 1,  # uvicorn counts the asking one too
                            log_level=log_level, log_config=None,  # uvicorn's lines in this process's format
                            **where)
    server = uvicorn.Server(config)
    quiet = RateLimitedLog(limits.log_every_s)
    for name in ("uvicorn.error", "asyncio"):
        logging.getLogger(name).addFilter(quiet)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: _rate_limited(loop, context, quiet))
        await server.serve()

    try:
        asyncio.run(serve())
    finally:
        for name in ("uvicorn.error", "asyncio"):
            logging.getLogger(name).removeFilter(quiet)


def _rate_limited(loop, context: dict, quiet: RateLimitedLog) -> None:
    """The event loop's errors (an accept loop out of file descriptors repeats one every second) through `quiet`."""
    record = logging.LogRecord("asyncio", logging.ERROR, __file__, 0, str(context.get("message")), None, None)
    if quiet.filter(record):
        context = {**context, "message": record.msg}
        loop.default_exception_handler(context)


def _guarded_protocol(limits: ServerLimits):
    """uvicorn's h11 protocol with a request-head deadline and a hard cap on open connections."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                logger.warning("over %d open connections: closing new ones at once", limits.max_connections)
                transport.close()
                return
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_timer()  # the next request's head is due too (the keep-alive timer ends idle ones)

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            waiting_for = self.cycle
            self._head_timer = self.loop.call_later(limits.header_timeout_s, self._head_timeout, waiting_for)

        def _head_timeout(self, waiting_for) -> None:
            if self.cycle is waiting_for and not self.transport.is_closing():  # no request head arrived in time
                self.transport.close()

    return GuardedH11Protocol


def add_server_arguments(parser) -> None:
    """The flags of ServerLimits, for `agent` and `serve`."""
    defaults = ServerLimits()
    parser.add_argument("--header-timeout-s", type=float, default=defaults.header_timeout_s,
                        help="a connection must send its request head within this (default: %(default)s)")
    parser.add_argument("--keep-alive-s", type=float, default=defaults.keep_alive_s,
                        help="an idle kept-alive connection is closed after this (default: %(default)s)")
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections,
                        help="open connections at most; more are closed at once (default: %(default)s)")


def server_limits(args) -> ServerLimits:
    """ServerLimits from the flags of `add_server_arguments`."""
    return ServerLimits(header_timeout_s=args.header_timeout_s, keep_alive_s=args.keep_alive_s,
                        max_connections=args.max_connections)
