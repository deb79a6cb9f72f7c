"""A bounded store-and-forward spool on disk: telemetry survives a broker outage and a process restart.

Each record is one file, `<sequence>.json`, written atomically; it leaves the pending area only when the
broker acknowledged it (MQTT QoS 1 PUBACK). An acknowledged record is kept a while longer in `sent/`:
a broker that crashes (SIGKILL, power) loses what it had acknowledged but not yet delivered or saved,
so after a reconnect the publisher puts the recently sent records back (`replay`) and the collector's
de-duplication absorbs the copies. When the spool is over its budget (records or bytes) the oldest
pending records are dropped, and the drop is counted in `dropped` (persisted), so the fleet sees what
a device lost instead of silently missing it.

    >>> spool = Spool(Path("/var/lib/edgeship/telemetry"), max_records=10_000, max_bytes=50_000_000)
    >>> spool.put(record.to_bytes())
    >>> for name, payload in spool.pending(): ...   # publish, then spool.ack(name) on PUBACK
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from edgeship.files import write_atomic


class Spool:
    """Records waiting for a broker acknowledgement, oldest first, within a budget."""

    def __init__(self, directory: Path, max_records: int = 10_000, max_bytes: int = 50_000_000):
        self.directory = Path(directory) / "spool"
        self.sent = self.directory / "sent"
        self.sent.mkdir(parents=True, exist_ok=True)
        self.max_records, self.max_bytes = max_records, max_bytes
        self._counter = self.directory.parent / "spool-dropped"
        self._lock = threading.Lock()
        names = self._names()
        self._next = int(names[-1].split(".")[0]) + 1 if names else 1
        self._bytes = sum(self._size(name) for name in names)
        self.dropped = int(self._counter.read_text() or 0) if self._counter.is_file() else 0

    def _names(self) -> list[str]:
        return sorted(p.name for p in self.directory.glob("*.json"))

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
            for path in sorted(self.sent.glob("*.json")):
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
