"""Readiness and a watchdog for systemd (sd_notify), so a device's agent and `serve` run as services.

infra/device/'s units start `edgeship-device agent` and `serve` with `Type=notify` and `WatchdogSec=`: systemd
passes $NOTIFY_SOCKET and $WATCHDOG_USEC. The app's event loop then sends READY=1 once the app has started and
WATCHDOG=1 every half interval; a loop that stops answering (stuck in a blocking call) stops the pings, and
systemd kills and restarts the service (`Restart=on-failure`). Outside systemd nothing is sent. The protocol is
one datagram on a Unix socket (sd_notify(3)): a few lines here rather than a dependency.

    >>> supervise(app)     # in create_app: wraps the app's lifespan
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

logger = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send `message` (e.g. "READY=1") to the service manager; False when there is none (or it cannot be reached)."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path  # "@name": an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError as error:
        logger.warning("cannot notify the service manager at %s: %s", path, error)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds within which the service manager wants a WATCHDOG=1 from this process, or None (no watchdog)."""
    usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid.isdigit() and int(pid) != os.getpid()):
        return None  # WATCHDOG_PID names another process: a child that inherited the environment
    return int(usec) / 1e6


def supervise(app) -> None:
    """Wrap a FastAPI app's lifespan: READY=1 after its start-up, WATCHDOG=1 from its event loop, STOPPING=1 at the end."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(running):
        async with inner(running) as state:
            interval = watchdog_interval()
            pings = asyncio.create_task(_ping(interval / 2)) if interval else None
            notify("READY=1")
            try:
                yield state
            finally:
                notify("STOPPING=1")
                if pings is not None:
                    pings.cancel()

    app.router.lifespan_context = lifespan


async def _ping(every_s: float) -> None:
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(every_s)
