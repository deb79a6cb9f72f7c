"""A Mosquitto broker process on a free loopback port, with persistence on disk, owned by this process.

What fault tests and the fleet simulator use to kill a broker abruptly (SIGKILL) and restart it
mid-stream. The default broker of `edgeship fleet collect` (no `fleet.broker` in params.yaml) is the
in-process one in edgeship.fleet.embedded_broker.

    >>> with LocalBroker() as broker:        # /usr/sbin/mosquitto -p <free port>, stopped on exit
    ...     settings = MqttSettings(host="127.0.0.1", port=broker.port, fleet="lab")
    ...     broker.restart(down_s=2.0)      # an outage: same port, fresh process
    >>> LocalBroker(certfile="broker.pem", keyfile="broker.key", password_file="passwords")  # TLS, no anonymous
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from edgeship.errors import ConfigError

MAX_INFLIGHT = 1000
_CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mosquitto_binary() -> str:
    for candidate in _CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    raise ConfigError("no mosquitto binary found; install mosquitto (apt-get install mosquitto)")


class LocalBroker:
    """A Mosquitto broker on 127.0.0.1:<port> owned by this process (loopback only): anonymous, or with TLS
    (`certfile`, `keyfile`: the broker's certificate chain and key, PEM) and users in a Mosquitto `password_file`
    (`mosquitto_passwd`'s format)."""

    def __init__(self, port: int | None = None, certfile: str | Path | None = None, keyfile: str | Path | None = None,
                 password_file: str | Path | None = None):
        self.port = port or free_port()
        self.secure = (f"certfile {certfile}\nkeyfile {keyfile}\n" if certfile else "") + (
            f"allow_anonymous false\npassword_file {password_file}\n" if password_file else "allow_anonymous true\n")
        self.process: subprocess.Popen | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="edgeship-broker-"))

    def start(self, timeout_s: float = 10.0) -> LocalBroker:
        config = self._dir / "mosquitto.conf"
        # Run as whoever started it: as root, mosquitto would otherwise switch to user `mosquitto`, which
        # cannot write the persistence file in our directory (and sessions would not survive a restart).
        config.write_text(f"user {getpass.getuser()}\nlistener {self.port} 127.0.0.1\n{self.secure}"
                          "max_queued_messages 1000000\n"
                          # Mosquitto's default of 20 unacknowledged messages per client would cap the collector's
                          # batches: its Receive Maximum (edgeship.fleet.collector) asks for 1000.
                          f"max_inflight_messages {MAX_INFLIGHT}\n"
                          # Persistent sessions survive a restart, so a collector's queued messages do too.
                          f"persistence true\npersistence_location {self._dir}/\nautosave_interval 1\n")
        self.process = subprocess.Popen([mosquitto_binary(), "-c", str(config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigError(f"mosquitto exited at start (port {self.port} busy?)")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise ConfigError(f"mosquitto did not listen on 127.0.0.1:{self.port} within {timeout_s} s")

    def kill(self) -> None:
        """Stop the broker abruptly (SIGKILL), as a crash or a power cut would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self, down_s: float = 1.0) -> None:
        self.kill()
        time.sleep(down_s)
        self.start()

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

