"""The OTA writer lease on each store it can live in: a local directory, S3 that honours conditional requests
(moto's server over HTTP), and a PostgreSQL row (a database of its own on 127.0.0.1:5432, dropped after).

Renewal keeps a long write's lease; breaking an expired lease is a compare-and-delete of exactly the lease
that was read; a holder whose lease was broken writes nothing more. Two publishers against the real-services
stack itself are in tests/test_stack_writers.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import uuid

import pytest

from edgeship.errors import RepositoryBusy
from edgeship.ota.lock import LOCK_PATH, StorageLeases, open_leases, writer_lock
from edgeship.ota.storage import open_storage

PG = "postgresql://postgres@127.0.0.1:5432"


def _psql(sql: str) -> subprocess.CompletedProcess:
    return subprocess.run(["psql", f"{PG}/postgres", "-qtAc", sql], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def postgres_url():
    """A database of its own on the loopback PostgreSQL; dropped after the module."""
    if _psql("SELECT 1").returncode != 0:
        pytest.skip(f"PostgreSQL is not reachable at {PG} (trust auth, user postgres): the SQL lease lives there")
    name = f"edgeship_lock_{uuid.uuid4().hex[:10]}"
    assert _psql(f'CREATE DATABASE "{name}"').returncode == 0
    yield f"{PG}/{name}"
    from edgeship.ota import lock_sql

    for url, engine in list(lock_sql._ENGINES.items()):  # close this process's connections before dropping
        if name in url:
            engine.dispose()
            del lock_sql._ENGINES[url]
    _psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on a free loopback port (it honours If-None-Match and If-Match, as AWS S3 does)."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="ota")
    yield endpoint
    server.stop()


@pytest.fixture(params=["local", "s3", "postgresql"])
def store(request, tmp_path, monkeypatch):
    """(storage, lock_url) for each place the lease can live."""
    if request.param == "local":
        return open_storage(str(tmp_path / "repo")), None
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    if request.param == "s3":
        return open_storage(f"s3://ota/{uuid.uuid4().hex}", request.getfixturevalue("s3_endpoint")), None
    return open_storage(str(tmp_path / "repo")), request.getfixturevalue("postgres_url")


def test_a_long_write_keeps_its_lease_by_renewing_it(store):
    storage, lock_url = store
    with writer_lock(storage, "publish v1 (slow)", lease_s=1.0, lock_url=lock_url) as lease:
        first = lease.record["expires_at"]
        time.sleep(1.6)  # past the lease: only renewal keeps it
        with pytest.raises(RepositoryBusy, match=r"publish v1 \(slow\)"):
            with writer_lock(storage, "publish v2", wait_s=0.5, lease_s=1.0, lock_url=lock_url):
                pass
        lease.check()
        assert lease.record["expires_at"] > first and "renewed_at" in lease.record
    with writer_lock(storage, "publish v2", wait_s=0.5, lock_url=lock_url):
        pass  # released: free again


def test_breaking_an_expired_lease_is_a_compare_and_delete(store):
    storage, lock_url = store
    leases = open_leases(storage, lock_url)
    stale = {"token": "a", "purpose": "publish v1", "host": "elsewhere", "pid": 1,
             "acquired_at": "2026-01-01T00:00:00+00:00", "expires_at": "2026-01-01T00:15:00+00:00"}
    assert leases.create(stale) is not None
    _, seen = leases.read()
    # Before the breaker acts on what it read, the lease changes (its holder renewed it, or another took it):
    renewed = leases.replace(seen, {**stale, "expires_at": "2999-01-01T00:00:00+00:00"})
    assert renewed is not None and renewed != seen
    assert not leases.delete(seen)  # the stale tag removes nothing
    assert leases.read() == ({**stale, "expires_at": "2999-01-01T00:00:00+00:00"}, renewed)
    assert leases.replace(seen, stale) is None  # nor does it renew
    assert leases.delete(renewed) and leases.read() is None


def test_an_expired_lease_is_broken_by_the_next_writer(store):
    storage, lock_url = store
    leases = open_leases(storage, lock_url)
    assert leases.create({"token": "dead", "purpose": "publish v5", "host": "elsewhere", "pid": 1,
                          "acquired_at": "2026-01-01T00:00:00+00:00", "expires_at": "2026-01-01T00:15:00+00:00"})
    with writer_lock(storage, "publish v6", wait_s=5, lock_url=lock_url) as lease:
        assert leases.read()[0]["token"] == lease.record["token"]
    assert leases.read() is None


def test_a_writer_whose_lease_was_broken_finds_out_before_it_writes(store):
    storage, lock_url = store
    leases = open_leases(storage, lock_url)
    with writer_lock(storage, "publish v7 (stalled)", lease_s=3600, lock_url=lock_url) as lease:
        _, tag = leases.read()
        assert leases.delete(tag)  # what a breaker does once the stalled holder's lease ran out
        lease.renew()
        with pytest.raises(RepositoryBusy, match=r"publish v7 \(stalled\)\) lost the OTA writer lock"):
            lease.check()


def test_a_lost_lease_stops_the_repository_before_it_signs(tmp_path):
    from ota_world import make_artifact

    from edgeship.ota.keys import Keystore
    from edgeship.ota.publish import publish_release
    from edgeship.ota.repository import OtaRepository

    storage = open_storage(str(tmp_path / "repo"))
    repository = OtaRepository(storage, Keystore(tmp_path / "keys"))
    before = storage.get("metadata/timestamp.json")
    with pytest.raises(RepositoryBusy, match="lost the OTA writer lock"):
        with repository.writing("publish v1"):
            _, tag = StorageLeases(storage).read()
            StorageLeases(storage).delete(tag)
            repository._lease.renew()
            publish_release(repository, "tiny", "1", [make_artifact(tmp_path / "builds", "1")])
    assert storage.get("metadata/timestamp.json") == before  # nothing signed


def test_a_local_lease_file_is_never_seen_half_written(tmp_path):
    storage = open_storage(str(tmp_path / "repo"))
    record = json.dumps({"token": "x" * 4000}).encode()
    assert storage.create(LOCK_PATH, record) and storage.get(LOCK_PATH) == record
    assert storage.create(LOCK_PATH, b"{}") is None and storage.get(LOCK_PATH) == record
    assert not [p for p in (tmp_path / "repo" / "locks").iterdir() if p.name.startswith(".writer.json.")]
