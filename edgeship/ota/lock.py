"""One writer at a time: a renewed lease on the OTA repository, kept where every writer sees it.

Publish, rollback, rollout and re-sign each read the current metadata, sign a next
version and write it. Two writers interleaving would sign two different "version N+1"s,
and devices would see one or the other. So every writer first takes the writer lease:

- by default in the repository's own storage, `locks/writer.json`, created only if absent
  (link() on a local directory, `If-None-Match: *` on S3), renewed and released only if
  unchanged since read (an flock-guarded compare locally, `If-Match: <ETag>` on S3). A storage
  that does not honour those conditions (`rclone serve s3`, the local stack's) is refused
  with the fix, never trusted;
- or, with `ota.lock: postgresql://...` (or EDGESHIP_OTA_LOCK), a lease row in PostgreSQL
  (edgeship.ota.lock_sql), for storage that cannot do conditional writes.

The lease names its holder and an expiry. While the `with` block runs, a thread renews it
(every third of the lease), so a long write keeps it; a writer that died holding it blocks
others until the lease runs out (at once when it died on this host). Breaking such a lease
is a compare-and-delete of exactly the lease that was read, so it never removes a lease
that its holder renewed or another writer took meanwhile. A holder whose lease was lost
(broken after a stall longer than the lease) finds out at `lease.check()` before it writes.

    >>> with writer_lock(storage, "publish digits v7") as lease:
    ...     repository = OtaRepository(storage, keystore)   # read after taking the lock
    ...     lease.check()                                   # still ours: write
    ...     ...

When the writers run as Prefect flows they also take the global concurrency limit
`edgeship-ota-writer` (see edgeship.flows.publish), which queues them in Prefect's UI.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Protocol

from edgeship.errors import RepositoryBusy
from edgeship.ota.storage import Storage, StorageError

logger = logging.getLogger(__name__)

LOCK_PATH = "locks/writer.json"
LOCK_ENV = "EDGESHIP_OTA_LOCK"  # overrides ota.lock: where the lease lives (e.g. the stack's PostgreSQL)


class Leases(Protocol):
    """Where one repository's writer lease lives; every call is one atomic step of that store."""

    def create(self, record: dict) -> str | None:
        """Take the lease if nobody holds it: its tag, or None when somebody does."""

    def read(self) -> tuple[dict, str] | None:
        """The current lease and a tag that changes with every write of it; None when nobody holds it."""

    def replace(self, tag: str, record: dict) -> str | None:
        """Renew: write `record` only if the lease is still the one tagged `tag`; its new tag, or None."""

    def delete(self, tag: str) -> bool:
        """Release or break: remove the lease only if it is still the one tagged `tag`."""


class StorageLeases:
    """The lease as `locks/writer.json` in the repository's storage, through its conditional writes."""

    def __init__(self, storage: Storage):
        reason = storage.conditional_writes()
        if reason:
            raise StorageError(f"{storage} cannot hold the OTA writer lock: {reason}, so two publishers could both "
                               f"take it. Keep the lock in PostgreSQL instead: ota.lock: postgresql://USER@HOST/DB in "
                               f"params.yaml (or {LOCK_ENV}=postgresql://...), or use a store that honours "
                               f"conditional requests (AWS S3, a local directory)")
        self.storage = storage

    def create(self, record: dict) -> str | None:
        return self.storage.create(LOCK_PATH, json.dumps(record).encode())

    def read(self) -> tuple[dict, str] | None:
        found = self.storage.read_tagged(LOCK_PATH)
        if found is None:
            return None
        try:
            return json.loads(found[0]), found[1]
        except ValueError:  # not a lease edgeship wrote: breakable, by its exact content
            return {"expires_at": datetime.min.replace(tzinfo=timezone.utc).isoformat()}, found[1]

    def replace(self, tag: str, record: dict) -> str | None:
        return self.storage.replace_if(LOCK_PATH, json.dumps(record).encode(), tag)

    def delete(self, tag: str) -> bool:
        return self.storage.delete_if(LOCK_PATH, tag)

    def __str__(self) -> str:
        return f"{self.storage}/{LOCK_PATH}"


def open_leases(storage: Storage, lock_url: str | None = None) -> Leases:
    """The lease store: a SQL database when `lock_url` (else EDGESHIP_OTA_LOCK) names one, else the storage."""
    lock_url = lock_url or os.environ.get(LOCK_ENV) or None
    if lock_url and lock_url != "storage":
        from edgeship.ota.lock_sql import SqlLeases

        return SqlLeases(lock_url, repository=str(storage))
    return StorageLeases(storage)


class Lease:
    """A held writer lease; renewed in the background until released."""

    def __init__(self, leases: Leases, record: dict, tag: str, lease_s: float):
        self.leases, self.record, self.lease_s = leases, record, lease_s
        self._tag, self._lost = tag, None
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_until_released, daemon=True,
                                         name=f"edgeship-lease-{record['token'][:8]}")
        self._renewer.start()

    def check(self) -> None:
        """Raise RepositoryBusy when the lease was lost (this writer stalled past it and another took over)."""
        if self._lost:
            raise RepositoryBusy(f"this writer ({self.record['purpose']}) lost the OTA writer lock: {self._lost}; "
                                 f"nothing more was written, run it again")

    def renew(self) -> None:
        """Extend the lease by `lease_s` from now, if it is still this writer's."""
        if self._lost:
            return
        record = {**self.record, "expires_at": _iso(_now() + timedelta(seconds=self.lease_s)),
                  "renewed_at": _iso(_now())}
        try:
            tag = self.leases.replace(self._tag, record)
        except Exception as error:  # noqa: BLE001 - a store blip: retried next period while the lease lasts
            logger.warning("could not renew the OTA writer lease (%s); retrying", error)
            return
        if tag is None:
            self._lost = "it was broken or replaced while held"
            return
        self.record, self._tag = record, tag

    def release(self) -> None:
        self._stop.set()
        self._renewer.join()
        if not self._lost and not self.leases.delete(self._tag):
            logger.warning("the OTA writer lease of %s was gone at release", self.record["purpose"])

    def _renew_until_released(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            self.renew()


@contextlib.contextmanager
def writer_lock(storage: Storage, purpose: str, wait_s: float = 60.0, lease_s: float = 900.0,
                poll_s: float = 0.2, lock_url: str | None = None,
                on_busy: Callable[[dict], None] | None = None) -> Iterator[Lease]:
    """Hold the repository's writer lease for the `with` block, renewing it while the block runs.

    Args:
        storage: The repository's storage (and, by default, where the lease lives).
        purpose: What the holder does, shown to a writer that has to wait.
        wait_s: How long to wait for another writer to finish.
        lease_s: How long the lease lasts without renewal (if this process dies holding it).
        lock_url: A SQL database for the lease (postgresql://...); None: EDGESHIP_OTA_LOCK, else the storage.
        on_busy: Called once with the holder's record when another writer holds the lease (to say who waits).

    Raises:
        RepositoryBusy: Another writer still held the lease after `wait_s`.
        StorageError: The storage cannot hold a lease safely (no conditional writes) and no lock_url was given.
    """
    leases = open_leases(storage, lock_url)
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        now = _now()
        record = {"token": token, "purpose": purpose, "host": socket.gethostname(), "pid": os.getpid(),
                  "acquired_at": _iso(now), "expires_at": _iso(now + timedelta(seconds=lease_s))}
        tag = leases.create(record)
        if tag is not None:
            break
        found = leases.read()
        if found is None:  # released between our create and read: try again at once
            continue
        holder, seen = found
        if _expired(holder, now) or _died_here(holder):
            if leases.delete(seen):  # exactly the lease we read, never one renewed or taken since
                logger.warning("broke the OTA writer lock of %s pid %s (%s): expired or its process died",
                               holder.get("host"), holder.get("pid"), holder.get("purpose"))
            continue
        if on_busy is not None and not told:
            told = True
            on_busy(holder)
        if time.monotonic() > deadline:
            raise RepositoryBusy(
                f"another writer holds {leases}: {holder.get('purpose', '?')} on {holder.get('host', '?')} "
                f"(pid {holder.get('pid', '?')}) since {holder.get('acquired_at', '?')}; wait for it to finish, or, "
                f"if it died, delete that lock (its lease ends at {holder.get('expires_at', '?')})")
        time.sleep(poll_s)
    lease = Lease(leases, record, tag, lease_s)
    try:
        yield lease
    finally:
        lease.release()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.isoformat()


def _expired(holder: dict, now: datetime) -> bool:
    try:
        return datetime.fromisoformat(holder["expires_at"]) < now
    except (KeyError, TypeError, ValueError):
        return True  # a lease without a readable expiry is not one edgeship wrote


def _died_here(holder: dict) -> bool:
    """A holder on this host whose process no longer exists (a publisher killed mid-publish)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
