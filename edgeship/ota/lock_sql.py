"""The OTA writer lease as a row in a SQL database (PostgreSQL), for storage without conditional writes.

`ota.lock: postgresql://postgres@127.0.0.1:5432/edgeship_ota` (or EDGESHIP_OTA_LOCK) puts the lease of
each repository in one row of `edgeship_ota_writer_lease`, keyed by the repository's location. Each
step is one statement, so the database decides between writers: INSERT ... ON CONFLICT DO NOTHING
takes it, an UPDATE or DELETE whose WHERE names the tag that was read renews, releases or breaks
exactly that lease (compare-and-swap, compare-and-delete). Every write gets a fresh random tag, so a
breaker that read a lease before its holder renewed it (or before another writer took a new one)
removes nothing.

    >>> leases = SqlLeases("postgresql://postgres@127.0.0.1:5432/edgeship_ota", repository="s3://ota/releases")
    >>> with writer_lock(storage, "publish v7", lock_url=leases.url): ...

`postgresql://` URLs use psycopg 3 (installed with the pipeline); `sqlite:///path.db` works too.
"""

from __future__ import annotations

import json
import threading
import uuid

from edgeship.ota.storage import StorageError

TABLE = "edgeship_ota_writer_lease"
_ENGINES: dict[str, object] = {}
_ENGINES_LOCK = threading.Lock()


def _engine(url: str):
    """One engine per database URL per process, its table created once."""
    import sqlalchemy as sa

    with _ENGINES_LOCK:
        if url not in _ENGINES:
            driver = url.replace("postgresql://", "postgresql+psycopg://", 1) if url.startswith("postgresql://") else url
            engine = sa.create_engine(driver, pool_pre_ping=True, future=True)
            try:
                with engine.begin() as connection:
                    connection.execute(sa.text(
                        f"CREATE TABLE IF NOT EXISTS {TABLE} (repository VARCHAR(1000) PRIMARY KEY, "
                        f"tag VARCHAR(32) NOT NULL, holder TEXT NOT NULL)"))
            except sa.exc.IntegrityError:  # PostgreSQL: another process created it at the same moment
                pass
            except sa.exc.SQLAlchemyError as error:
                raise StorageError(f"cannot keep the OTA writer lock in {sa.make_url(driver).render_as_string()}: "
                                   f"{error.__class__.__name__}: {str(error).splitlines()[0]}; check ota.lock "
                                   f"(or EDGESHIP_OTA_LOCK): the database must exist and accept this user") from None
            _ENGINES[url] = engine
        return _ENGINES[url]


class SqlLeases:
    """The lease of one repository, as one row; its tag changes with every write."""

    def __init__(self, url: str, repository: str):
        self.url, self.repository = url, repository
        self._engine = _engine(url)

    def create(self, record: dict) -> str | None:
        import sqlalchemy as sa

        tag = uuid.uuid4().hex
        with self._engine.begin() as connection:
            inserted = connection.execute(sa.text(
                f"INSERT INTO {TABLE} (repository, tag, holder) VALUES (:repository, :tag, :holder) "
                f"ON CONFLICT (repository) DO NOTHING"),
                {"repository": self.repository, "tag": tag, "holder": json.dumps(record)})
        return tag if inserted.rowcount == 1 else None

    def read(self) -> tuple[dict, str] | None:
        import sqlalchemy as sa

        with self._engine.connect() as connection:
            row = connection.execute(sa.text(f"SELECT tag, holder FROM {TABLE} WHERE repository = :repository"),
                                     {"repository": self.repository}).first()
        return None if row is None else (json.loads(row.holder), row.tag)

    def replace(self, tag: str, record: dict) -> str | None:
        import sqlalchemy as sa

        new = uuid.uuid4().hex
        with self._engine.begin() as connection:
            updated = connection.execute(sa.text(
                f"UPDATE {TABLE} SET tag = :new, holder = :holder WHERE repository = :repository AND tag = :tag"),
                {"repository": self.repository, "tag": tag, "new": new, "holder": json.dumps(record)})
        return new if updated.rowcount == 1 else None

    def delete(self, tag: str) -> bool:
        import sqlalchemy as sa

        with self._engine.begin() as connection:
            deleted = connection.execute(sa.text(
                f"DELETE FROM {TABLE} WHERE repository = :repository AND tag = :tag"),
                {"repository": self.repository, "tag": tag})
        return deleted.rowcount == 1

    def __str__(self) -> str:
        import sqlalchemy as sa

        return f"the lease row of {self.repository} in {sa.make_url(self.url).render_as_string()}"
