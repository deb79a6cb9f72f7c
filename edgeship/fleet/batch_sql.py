"""The statements of the store's batch path, on the database driver itself (psycopg 3, sqlite3).

A batch of 500 records is a handful of statements: on PostgreSQL rows travel by COPY into a temporary table
and one `INSERT ... SELECT ... ON CONFLICT DO NOTHING RETURNING` (or `UPDATE ... FROM`) applies them; on SQLite,
`INSERT ... ON CONFLICT DO NOTHING` row by row inside the transaction (sqlite3 runs each in microseconds; its `rowcount` says
which were new). SQLAlchemy's compiled multi-row INSERTs cost more to build and parse than the database spent
storing them (measured: 1.4 s of 3.7 s for 3,000 records on PostgreSQL).

Every method runs inside the caller's transaction on `connection` (a DBAPI connection).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone

_TEMP_PREFIX = "incoming_"


def sqlite_time(value: datetime | None) -> str | None:
    """A datetime as SQLAlchemy's SQLite dialect stores it (naive UTC text), so its reads and comparisons agree."""
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")


class SQLiteBatch:
    """The batch statements on sqlite3."""

    def __init__(self, connection):
        self.cursor = connection.cursor()

    def insert_ignore(self, table: str, columns: Sequence[str], rows: list[tuple], key: int = 0) -> set:
        """Insert rows whose key is new; the keys (column `key`) of the rows inserted."""
        statement = (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
                     f"ON CONFLICT DO NOTHING")
        inserted = set()
        for row in rows:
            self.cursor.execute(statement, [_sqlite_value(v) for v in row])
            if self.cursor.rowcount == 1:
                inserted.add(row[key])
        return inserted

    def select_rows(self, table: str, columns: Sequence[str], ids: list[str]) -> dict[str, tuple]:
        """Rows by id (the database is locked for writing already: this transaction wrote first)."""
        found = {}
        for start in range(0, len(ids), 500):
            part = ids[start:start + 500]
            self.cursor.execute(f"SELECT id, {', '.join(columns)} FROM {table} WHERE id IN "
                                f"({', '.join('?' * len(part))})", part)
            found.update((row[0], row[1:]) for row in self.cursor.fetchall())
        return found

    def update_rows(self, table: str, columns: Sequence[str], rows: list[tuple]) -> None:
        """Update `columns` of rows by id (each row: id first, then the columns' values)."""
        assignments = ", ".join(f"{c} = ?" for c in columns)
        self.cursor.executemany(f"UPDATE {table} SET {assignments} WHERE id = ?",
                                [[_sqlite_value(v) for v in row[1:]] + [row[0]]
                                 for row in rows])

    def upsert(self, table: str, columns: Sequence[str], rows: list[tuple], key: str, update: Sequence[str]) -> None:
        assignments = ", ".join(f"{c} = excluded.{c}" for c in update)
        self.cursor.executemany(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
            f"ON CONFLICT ({key}) DO UPDATE SET {assignments}",
            [[_sqlite_value(v) for v in row] for row in rows])


def _sqlite_value(value):
    if isinstance(value, datetime):
        return sqlite_time(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return value


class PostgresBatch:
    """The batch statements on psycopg 3: COPY into a temporary table, then one statement applies it."""

    def __init__(self, connection):
        self.connection = connection
        self.cursor = connection.cursor()
        self.staged: set[str] = set()

    def _stage(self, table: str, columns: Sequence[str], rows: list[tuple]) -> str:
        names = ", ".join(columns)
        temp = f"{_TEMP_PREFIX}{table}_{len(columns)}"
        if temp not in self.staged:
            # The columns' types and nothing else; ON COMMIT DELETE ROWS: emptied at every commit, kept for the
            # connection's life (one per pooled connection).
            self.cursor.execute(f"CREATE TEMP TABLE IF NOT EXISTS {temp} ON COMMIT DELETE ROWS AS "
                                f"SELECT {names} FROM {table} WITH NO DATA")
            self.staged.add(temp)
        self.cursor.execute(f"TRUNCATE {temp}")
        with self.cursor.copy(f"COPY {temp} ({names}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        return temp

    def insert_ignore(self, table: str, columns: Sequence[str], rows: list[tuple], key: int = 0) -> set:
        """Insert rows whose key is new (in key order: concurrent batches take locks in one order); their keys."""
        if not rows:
            return set()
        temp = self._stage(table, columns, rows)
        names = ", ".join(columns)
        self.cursor.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM {temp} ORDER BY {columns[key]} "
                            f"ON CONFLICT DO NOTHING RETURNING {columns[key]}")
        return {row[0] for row in self.cursor.fetchall()}

    def select_rows(self, table: str, columns: Sequence[str], ids: list[str]) -> dict[str, tuple]:
        """Rows by id, locked in id order until the commit: two collectors merging into one row take turns."""
        self.cursor.execute(f"SELECT id, {', '.join(columns)} FROM {table} WHERE id = ANY(%s) ORDER BY id "
                            f"FOR UPDATE", [ids])
        return {row[0]: row[1:] for row in self.cursor.fetchall()}

    def update_rows(self, table: str, columns: Sequence[str], rows: list[tuple]) -> None:
        if not rows:
            return
        temp = self._stage(table, ["id", *columns], rows)
        assignments = ", ".join(f"{c} = i.{c}" for c in columns)
        self.cursor.execute(f"UPDATE {table} t SET {assignments} FROM {temp} i WHERE t.id = i.id")

    def upsert(self, table: str, columns: Sequence[str], rows: list[tuple], key: str, update: Sequence[str]) -> None:
        from psycopg.types.json import Json

        assignments = ", ".join(f"{c} = excluded.{c}" for c in update)
        self.cursor.executemany(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))}) "
            f"ON CONFLICT ({key}) DO UPDATE SET {assignments}",
            [[Json(v) if isinstance(v, (dict, list)) else v for v in row] for row in rows])
