"""A bounded store-and-forward spool on disk: telemetry survives a broker outage and a process restart.

Each record is one file, `<sequence>.json`, written atomically; it leaves the pending area only when the
broker acknowledged it (MQTT QoS 1 PUBACK). An acknowledged record is kept a while longer in `sent/`:
a broker that crashes (SIGKILL, power) loses what it had acknowledged but not yet delivered or saved,
so after a reconnect the publisher puts the recently sent records back (`replay`) and the collector's
de-duplication absorbs the copies. When the spool is over its budget (records or bytes) the oldest
pending records are dropped, and the drop is counted in `dropped` (persisted), so the fleet sees what
a device lost instead of silently missing it.

A spool never stops the service: a file that is not a record this spool wrote (a stray name, a
directory or unreadable file under a record's name, a temporary file a crash left) is moved to `quarantine/` and counted
in `quarantined`, and a drop counter that does not read as a number starts again at 0, with a warning.

    >>> spool = Spool(Path("/var/lib/edgeship/telemetry"), max_records=10_000, max_bytes=50_000_000)
    >>> spool.put(record.to_bytes())
    >>> for name, payload in spool.pending(): ...   # publish, then spool.ack(name) on PUBACK
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path

from edgeship.files import write_atomic

logger = logging.getLogger(__name__)

_RECORD = re.compile(r"^[0-9]{1,18}\.json$")  # what `put` writes: <sequence>.json
_QUARANTINE_KEPT = 100  # set-aside files kept for a look; older ones are deleted


class Spool:
    """Records waiting for a broker acknowledgement, oldest first, within a budget."""

    def __init__(self, directory: Path, max_records: int = 10_000, max_bytes: int = 50_000_000):
        self.directory = Path(directory) / "spool"
        self.sent = self.directory / "sent"
        self.sent.mkdir(parents=True, exist_ok=True)
        self.max_records, self.max_bytes = max_records, max_bytes
        self.quarantine = self.directory / "quarantine"
        self.quarantined = 0
        self._counter = self.directory.parent / "spool-dropped"
        self._lock = threading.Lock()
        for area in (self.directory, self.sent):
            for path in sorted(area.iterdir()):
                if path not in (self.sent, self.quarantine) and not (_RECORD.match(path.name) and path.is_file()):
                    self._set_aside(path, "not a spool record")
        names = self._names()
        self._next = int(names[-1].split(".")[0]) + 1 if names else 1
        self._bytes = sum(self._size(name) for name in names)
        self.dropped = self._read_counter()

    def _names(self) -> list[str]:
        return sorted((p.name for p in self.directory.glob("*.json") if _RECORD.match(p.name)), key=_sequence)

    def _read_counter(self) -> int:
        if not self._counter.is_file():
            return 0
        text = self._counter.read_text(errors="replace").strip()
        if text.isdigit():
            return int(text)
        logger.warning("the spool's drop counter %s reads %r, not a count: starting it again at 0 (the old file is "
                       "in %s)", self._counter, text[:40], self.quarantine)
        self._set_aside(self._counter, "a corrupt drop counter")
        return 0

    def _set_aside(self, path: Path, why: str) -> None:
        """Move a file that is no record into quarantine/ (counted), so it can neither stop nor fill the spool."""
        self.quarantine.mkdir(exist_ok=True)
        target = self.quarantine / f"{time.time_ns()}-{path.name}"
        try:
            os.replace(path, target)
        except OSError as error:
            logger.warning("cannot set aside %s (%s): %s", path, why, error)
            return
        self.quarantined += 1
        logger.warning("set aside %s from the telemetry spool: %s (kept in %s)", path.name, why, self.quarantine)
        kept = sorted(self.quarantine.iterdir())
        for old in kept[:max(0, len(kept) - _QUARANTINE_KEPT)]:
            if old.is_file():
                old.unlink(missing_ok=True)

    def _size(self, name: str) -> int:
        try:
            return (self.directory / name).stat().st_size
        except FileNotFoundError:
            return 0

    def put(self, payload: bytes) -> str:
        """Keep a record until it is acknowledged; drop the oldest ones when over budget. Returns its name."""
        with self._lock:
            name = f"{self._next:012d}.json"
            self._next += 1
            write_atomic(self.directory / name, payload)
            self._bytes += len(payload)
            names = self._names()
            dropped = 0
            while len(names) > 1 and (len(names) > self.max_records or self._bytes > self.max_bytes):
                oldest = names.pop(0)
                self._bytes -= self._size(oldest)
                (self.directory / oldest).unlink(missing_ok=True)
                dropped += 1
            if dropped:
                self.dropped += dropped
                write_atomic(self._counter, str(self.dropped).encode())
            return name

    def pending(self, limit: int | None = None) -> list[tuple[str, bytes]]:
        """Records not acknowledged yet, oldest first."""
        out = []
        for name in self._names()[:limit]:
            try:
                out.append((name, (self.directory / name).read_bytes()))
            except FileNotFoundError:
                continue
            except OSError as error:  # a directory or an unreadable file under a record's name
                with self._lock:
                    self._set_aside(self.directory / name, f"unreadable: {error.strerror}")
        return out

    def ack(self, name: str) -> None:
        """The broker has the record: move it to `sent/` (kept for a replay after a broker crash)."""
        with self._lock:
            size = self._size(name)
            path = self.directory / name
            if path.exists():
                try:
                    os.replace(path, self.sent / name)
                    os.utime(self.sent / name)
                except FileNotFoundError:
                    return
                self._bytes -= size

    def replay(self, max_age_s: float) -> int:
        """Put records acknowledged in the last `max_age_s` back in the pending area; returns how many."""
        now, count = time.time(), 0
        with self._lock:
            for path in sorted(self.sent.glob("*.json"), key=lambda p: _sequence(p.name)):
                try:
                    if now - path.stat().st_mtime <= max_age_s:
                        size = path.stat().st_size
                        os.replace(path, self.directory / path.name)
                        self._bytes += size
                        count += 1
                except FileNotFoundError:
                    continue
        return count

    def prune_sent(self, max_age_s: float) -> None:
        """Forget acknowledged records older than `max_age_s` (and beyond the record budget)."""
        now = time.time()
        paths = sorted(self.sent.glob("*.json"))
        for index, path in enumerate(paths):
            try:
                if len(paths) - index > self.max_records or now - path.stat().st_mtime > max_age_s:
                    path.unlink(missing_ok=True)
            except FileNotFoundError:
                continue

    def __len__(self) -> int:
        return len(self._names())


def _sequence(name: str) -> int:
    return int(name.split(".")[0]) if _RECORD.match(name) else 0
