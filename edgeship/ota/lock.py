"""One writer at a time: a lease lock kept in the OTA repository's own storage.

Publish, rollback, rollout and re-sign each read the current metadata, sign a
next version and write it. Two writers interleaving would sign two different
"version N+1"s, and devices would see one or the other. So every writer first
creates `locks/writer.json` with the storage's atomic create (O_EXCL on a local
directory, `If-None-Match: *` on S3): exactly one of two writers succeeds. The
file names its holder and a lease expiry, so a writer that died holding it
blocks others only until the lease runs out (at once, when it died on this host).

    >>> with writer_lock(storage, "publish digits v7"):
    ...     repository = OtaRepository(storage, keystore)   # read after taking the lock
    ...     ...

When the writers run as Prefect flows they also take the global concurrency
limit `edgeship-ota-writer` (see edgeship.flows.publish), which queues them in
Prefect's UI rather than here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

from edgeship.errors import RepositoryBusy
from edgeship.ota.storage import Storage

logger = logging.getLogger(__name__)

LOCK_PATH = "locks/writer.json"


@contextlib.contextmanager
def writer_lock(storage: Storage, purpose: str, wait_s: float = 60.0, lease_s: float = 900.0,
                poll_s: float = 0.2) -> Iterator[dict]:
    """Hold the repository's writer lock for the `with` block.

    Args:
        storage: The repository's storage.
        purpose: What the holder does, shown to a writer that has to wait.
        wait_s: How long to wait for another writer to finish.
        lease_s: How long the lock stays valid if this process dies holding it.

    Raises:
        RepositoryBusy: Another writer still held the lock after `wait_s`.
    """
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    holder: dict = {}
    while True:
        now = datetime.now(timezone.utc)
        record = {"token": token, "purpose": purpose, "host": socket.gethostname(), "pid": os.getpid(),
                  "acquired_at": now.isoformat(), "expires_at": (now + timedelta(seconds=lease_s)).isoformat()}
        if storage.create(LOCK_PATH, json.dumps(record).encode()):
            break
        holder = _read(storage)
        if holder and (datetime.fromisoformat(holder["expires_at"]) < now or _died_here(holder)):
            logger.warning("breaking the OTA writer lock of %s pid %s (%s): expired or its process died",
                           holder.get("host"), holder.get("pid"), holder.get("purpose"))
            _delete_if(storage, holder.get("token"))
            continue
        if time.monotonic() > deadline:
            raise RepositoryBusy(
                f"another writer holds {storage}/{LOCK_PATH}: {holder.get('purpose', '?')} on {holder.get('host', '?')} "
                f"(pid {holder.get('pid', '?')}) since {holder.get('acquired_at', '?')}; wait for it to finish, or, "
                f"if it died, delete that file (its lease ends at {holder.get('expires_at', '?')})")
        time.sleep(poll_s)
    try:
        yield record
    finally:
        _delete_if(storage, token)


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


def _read(storage: Storage) -> dict:
    data = storage.get(LOCK_PATH)
    try:
        return json.loads(data) if data else {}
    except ValueError:  # a torn lock file: treat as expired
        return {"expires_at": datetime.min.replace(tzinfo=timezone.utc).isoformat()}


def _delete_if(storage: Storage, token: str | None) -> None:
    """Remove the lock only when it is still the one with `token` (never another writer's)."""
    current = _read(storage)
    if not current or current.get("token") == token or token is None:
        storage.delete(LOCK_PATH)
