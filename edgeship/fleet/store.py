"""The fleet store: telemetry records and their rollups, update events, device states and rollout decisions.

SQLite by default (`sqlite:///fleet.db`), PostgreSQL in the real-services stack
(`postgresql://postgres@127.0.0.1:5432/fleet`, through psycopg 3). Records arrive in batches
(`add_batch`): one transaction stores the new ones (`INSERT ... ON CONFLICT DO NOTHING`, keyed by
`record_id`), their events, and what they add to the rollups (edgeship.fleet.rollup), so a redelivered
record changes nothing and the rollups always sum exactly the stored records. Readers (the controller,
`fleet status`, the drift check) read rollups only (`snapshot`); raw records are kept for
`fleet.retention_days` (edgeship.fleet.retention) and `replay()` rebuilds the rollups from them.

    >>> store = FleetStore("sqlite:///fleet.db")
    >>> store.add_batch(records)              # [True, False, ...]: False for a redelivery
    >>> snapshot = store.snapshot("stable", "onnx-int8", since=rollout_start, versions=["7", "8"])
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone

from sqlalchemy import create_engine, delete, event, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from edgeship.errors import ConfigError
from edgeship.fleet import retention
from edgeship.fleet.batch_sql import PostgresBatch, SQLiteBatch
from edgeship.fleet.aggregate import FleetSnapshot, snapshot_of
from edgeship.fleet.rollup import ROLLUP_VERSION, ClassKey, DeviceKey, DeviceSums, Rollups, Sums, bucket_of
from edgeship.fleet.tables import (Base, ClassRollupRow, DecisionRow, DeviceRollupRow, DeviceStateRow, EventRow,
                                   MetaRow, RecordRow)
from edgeship.records.telemetry import TelemetryRecord

_CHUNK = 500   # rows per statement (well under both databases' limits on bound parameters)
_RECORD_COLUMNS = ("record_id", "window_end", "device_id", "sequence", "channel", "target", "model_name",
                   "device_class", "active_version", "shadow_version", "received_at", "payload")
_EVENT_COLUMNS = ("device_id", "sequence", "channel", "target", "device_class", "at", "kind", "version", "slot",
                  "reason")
_CLASS_COLUMNS = ("id", "channel", "target", "version", "device_class", "bucket", "state")
_DEVICE_COLUMNS = ("id", "channel", "target", "version", "device_id", "device_class", "state", "first_seen",
                   "last_seen")


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands datetimes back naive; every time here is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def _parse_time(value) -> datetime | None:
    """A datetime read back by a driver: psycopg's (aware), or SQLite's text."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return _utc(value)


def _chunks(items: list, size: int = _CHUNK) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class FleetStore:
    """Reads and writes the fleet tables; creates them on first use.

    Args:
        url: SQLAlchemy URL (`postgresql://` means psycopg 3).
        bucket_s: width of the class rollups' time buckets; fixed for the life of the rollups (a change needs
            `replay()`).
        check: refuse rollups built by another definition or bucket width (False: for `replay`).
    """

    def __init__(self, url: str = "sqlite:///fleet.db", bucket_s: float = 300.0, check: bool = True):
        # A bare postgresql:// means SQLAlchemy's psycopg2 driver; the driver installed with edgeship is psycopg 3.
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://") if url.startswith("postgresql://") else url
        self.url, self.bucket_s = url, float(bucket_s)
        self.postgres = url.startswith("postgresql")
        sqlite = url.startswith("sqlite")
        self.engine = create_engine(url, future=True, pool_pre_ping=True,
                                    connect_args={"timeout": 30} if sqlite else {})
        if sqlite:
            # WAL: the controller's reads never block the collector's writes (nor the other way round).
            event.listen(self.engine, "connect", lambda connection, _: connection.execute("PRAGMA journal_mode=WAL"))
        Base.metadata.create_all(self.engine)
        self.partitions = retention.Partitions(self.engine) if self.postgres else None
        self._meta(check)

    def close(self) -> None:
        self.engine.dispose()

    def _insert(self, table):
        return (pg_insert if self.postgres else sqlite_insert)(table)

    def _meta(self, check: bool) -> None:
        wanted = {"rollup_version": str(ROLLUP_VERSION), "bucket_s": f"{self.bucket_s:g}"}
        with self.engine.begin() as connection:
            found = dict(connection.execute(select(MetaRow.key, MetaRow.value)).all())
            if not found:
                connection.execute(self._insert(MetaRow.__table__).values(
                    [{"key": k, "value": v} for k, v in wanted.items()]).on_conflict_do_nothing())
                return
        stale = {k: (found.get(k), v) for k, v in wanted.items() if found.get(k) != v}
        if stale and check:
            raise ConfigError(f"the fleet store's rollups were built with {', '.join(f'{k}={a}' for k, (a, _) in stale.items())}, "
                              f"this edgeship uses {', '.join(f'{k}={b}' for k, (_, b) in stale.items())}: stop the "
                              f"collectors and run `edgeship fleet replay` to rebuild them from the raw records")

    # --- ingest -------------------------------------------------------------------------

    def add_record(self, record: TelemetryRecord) -> bool:
        """Store one record; False when it was already stored (a redelivery)."""
        return self.add_batch([record])[0]

    def add_batch(self, records: list[TelemetryRecord], states: dict[str, dict] | None = None,
                  payloads: list[bytes] | None = None) -> list[bool]:
        """Store records, their events and rollups, and device states, in one transaction.

        `payloads`: the records as received (kept as the raw record, unknown fields and all, so a later
        edgeship can replay what this one ignored); default: the records serialised again.
        Returns, per record, whether it was new (False: already stored, e.g. a redelivery or a duplicate
        within the batch). Nothing is stored when it raises."""
        now = datetime.now(timezone.utc)
        unique = {r.record_id: r for r in records}
        raw = {r.record_id: p.decode() if isinstance(p, bytes) else p for r, p in zip(records, payloads or ())}
        if self.partitions is not None:
            self.partitions.ensure([r.window_end for r in unique.values()])
        with self.engine.begin() as connection:
            batch = self._batch(connection)
            rows = [(r.record_id, r.window_end, r.device_id, r.sequence, r.channel, r.target, r.model_name,
                     r.device_class, r.versions.active, r.versions.shadow, now,
                     raw.get(r.record_id) or r.model_dump_json()) for r in sorted(unique.values(),
                                                                                   key=lambda r: r.record_id)]
            new_ids = batch.insert_ignore(RecordRow.__tablename__, _RECORD_COLUMNS, rows)
            fresh = [unique[i] for i in sorted(new_ids)]
            events = {(r.device_id, e.sequence): (r.device_id, e.sequence, r.channel, e.target or r.target,
                                                  r.device_class, e.at, e.kind, e.version, e.slot,
                                                  e.reason[:400] if e.reason else None)
                      for r in fresh for e in r.events}
            if events:
                batch.insert_ignore(EventRow.__tablename__, _EVENT_COLUMNS, [events[k] for k in sorted(events)])
            rollups = Rollups(self.bucket_s).add_records(fresh)
            self._merge_classes(batch, rollups.classes)
            self._merge_devices(batch, rollups.devices)
            if states:
                batch.upsert(DeviceStateRow.__tablename__, ("device_id", "updated_at", "payload"),
                             [(d, now, states[d]) for d in sorted(states)], "device_id", ("updated_at", "payload"))
        seen: set[str] = set()
        result = []
        for record in records:
            result.append(record.record_id in new_ids and record.record_id not in seen)
            seen.add(record.record_id)
        return result

    def _batch(self, connection):
        driver = connection.connection.driver_connection
        return PostgresBatch(driver) if self.postgres else SQLiteBatch(driver)

    def _merge(self, batch, table: str, rows: dict[str, tuple], columns: tuple[str, ...], merge) -> None:
        """Add rows (id -> (id, key columns..., state Sums, ...)) to a rollup table: insert the new, merge the rest.

        `columns` are every column in row order; `merge(row, stored)` returns the merged (state, ...) values
        of the columns after the key columns, `stored` holding the same columns as read back."""
        mutable = columns[columns.index("state"):]
        for ids in _chunks(sorted(rows)):
            existing = batch.select_rows(table, mutable, ids)
            missing = [i for i in ids if i not in existing]
            if missing:
                values = [self._encoded(rows[i]) for i in missing]
                inserted = batch.insert_ignore(table, columns, values)
                raced = [i for i in missing if i not in inserted]   # another collector created it meanwhile
                if raced:
                    existing.update(batch.select_rows(table, mutable, raced))
            if existing:
                batch.update_rows(table, mutable, [(i, *merge(rows[i], existing[i])) for i in sorted(existing)])

    @staticmethod
    def _encoded(row: tuple) -> tuple:
        return tuple(v.to_json() if isinstance(v, Sums) else v for v in row)

    def _merge_classes(self, batch, classes: dict[ClassKey, Sums]) -> None:
        rows = {k.id: (k.id, k.channel, k.target, k.version, k.device_class, k.bucket, s) for k, s in classes.items()}

        def merge(row: tuple, stored: tuple) -> tuple:
            sums = Sums.from_json(stored[0])
            sums.add(row[-1])
            return (sums.to_json(),)

        self._merge(batch, ClassRollupRow.__tablename__, rows, _CLASS_COLUMNS, merge)

    def _merge_devices(self, batch, devices: dict[DeviceKey, DeviceSums]) -> None:
        rows = {k.id: (k.id, k.channel, k.target, k.version, k.device_id, k.device_class, d.sums, d.first_seen,
                       d.last_seen) for k, d in devices.items()}

        def merge(row: tuple, stored: tuple) -> tuple:
            merged = DeviceSums(Sums.from_json(stored[0]), _parse_time(stored[1]), _parse_time(stored[2]))
            merged.add(row[6], row[7], row[8])
            return merged.sums.to_json(), merged.first_seen, merged.last_seen

        self._merge(batch, DeviceRollupRow.__tablename__, rows, _DEVICE_COLUMNS, merge)

    def set_device_state(self, device_id: str, payload: dict) -> None:
        self.add_batch([], {device_id: payload})

    # --- rollups ------------------------------------------------------------------------

    def snapshot(self, channel: str | None, target: str | None = None, since: datetime | None = None,
                 versions: Iterable[str] | None = None, reference=None) -> FleetSnapshot:
        """The fleet from the rollups: class rows from the bucket holding `since`, device rows seen since then."""
        versions = [v for v in versions if v] if versions is not None else None
        classes, devices = ClassRollupRow.__table__, DeviceRollupRow.__table__
        class_query = select(classes.c.channel, classes.c.target, classes.c.version, classes.c.device_class,
                             classes.c.bucket, classes.c.state)
        device_query = select(devices.c.channel, devices.c.target, devices.c.version, devices.c.device_id,
                              devices.c.device_class, devices.c.first_seen, devices.c.last_seen, devices.c.state)
        for query_table in (classes, devices):
            where = []
            if channel:
                where.append(query_table.c.channel == channel)
            if target:
                where.append(query_table.c.target == target)
            if versions is not None:
                where.append(query_table.c.version.in_(versions))
            if query_table is classes:
                class_query = class_query.where(*where)
            else:
                device_query = device_query.where(*where)
        if since is not None:
            class_query = class_query.where(classes.c.bucket >= bucket_of(since, self.bucket_s))
            device_query = device_query.where(devices.c.last_seen >= since)
        with self.engine.connect() as connection:
            class_rows = [(ClassKey(c, t, v, k, _utc(b)), Sums.from_json(s))
                          for c, t, v, k, b, s in connection.execute(class_query)]
            device_rows = [(DeviceKey(c, t, v, d, k), DeviceSums(Sums.from_json(s), _utc(f), _utc(last), k))
                           for c, t, v, d, k, f, last, s in connection.execute(device_query)]
        return snapshot_of(class_rows, device_rows, reference, since)

    def latest_window(self, channel: str, target: str | None = None) -> datetime | None:
        """The newest window any device row has seen (a cheap 'has anything new arrived' for the controller)."""
        query = select(func.max(DeviceRollupRow.last_seen)).where(DeviceRollupRow.channel == channel)
        if target:
            query = query.where(DeviceRollupRow.target == target)
        with Session(self.engine) as session:
            return _utc(session.scalar(query))

    def replay(self, chunk: int = 2000, progress=None) -> int:
        """Rebuild every rollup from the raw records still kept (stop the collectors first); returns their count."""
        with self.engine.begin() as connection:
            connection.execute(delete(ClassRollupRow.__table__))
            connection.execute(delete(DeviceRollupRow.__table__))
            connection.execute(delete(MetaRow.__table__))
        self._meta(check=False)
        done = 0
        with self.engine.connect().execution_options(yield_per=chunk) as reader:
            result = reader.execute(select(RecordRow.payload).order_by(RecordRow.window_end, RecordRow.record_id))
            for part in result.partitions(chunk):
                rollups = Rollups(self.bucket_s).add_records(TelemetryRecord.model_validate_json(p) for (p,) in part)
                with self.engine.begin() as connection:
                    batch = self._batch(connection)
                    self._merge_classes(batch, rollups.classes)
                    self._merge_devices(batch, rollups.devices)
                done += len(part)
                if progress is not None:
                    progress(done)
        return done

    def prune(self, keep_records_s: float, keep_rollups_s: float, now: datetime | None = None) -> dict[str, int]:
        """Drop raw records and events older than `keep_records_s`, rollups older than `keep_rollups_s`."""
        return retention.prune(self, keep_records_s, keep_rollups_s, now or datetime.now(timezone.utc))

    # --- raw records, events, decisions ---------------------------------------------------

    def records(self, channel: str | None = None, target: str | None = None,
                since: datetime | None = None) -> list[TelemetryRecord]:
        """Stored raw records, oldest window first (for inspection and tests: decisions read `snapshot`)."""
        query = select(RecordRow.payload).order_by(RecordRow.window_end)
        if channel:
            query = query.where(RecordRow.channel == channel)
        if target:
            query = query.where(RecordRow.target == target)
        if since is not None:
            query = query.where(RecordRow.window_end >= since)
        with Session(self.engine) as session:
            return [TelemetryRecord.model_validate_json(p) for p in session.scalars(query)]

    def events(self, channel: str | None = None, since: datetime | None = None) -> list[dict]:
        """Stored update events as dicts (device_id, device_class, kind, version, reason, at, ...)."""
        query = select(EventRow).order_by(EventRow.at)
        if channel:
            query = query.where(EventRow.channel == channel)
        if since is not None:
            query = query.where(EventRow.at >= since)
        with Session(self.engine) as session:
            return [{"device_id": r.device_id, "sequence": r.sequence, "channel": r.channel, "target": r.target,
                     "device_class": r.device_class, "at": _utc(r.at), "kind": r.kind, "version": r.version,
                     "slot": r.slot, "reason": r.reason} for r in session.scalars(query)]

    def count_records(self) -> int:
        with Session(self.engine) as session:
            return session.scalar(select(func.count()).select_from(RecordRow))

    def record_ids(self) -> set[str]:
        with Session(self.engine) as session:
            return set(session.scalars(select(RecordRow.record_id)))

    def add_decision(self, *, channel: str, target: str, version: str | None, action: str, fraction_before: float,
                     fraction_after: float, reasons: list[str], evidence: dict, applied: bool,
                     at: datetime | None = None) -> None:
        with Session(self.engine) as session:
            session.add(DecisionRow(at=at or datetime.now(timezone.utc), channel=channel, target=target,
                                    version=version, action=action, fraction_before=fraction_before,
                                    fraction_after=fraction_after, applied=applied, reasons=reasons,
                                    evidence=json.loads(json.dumps(evidence, default=str))))
            session.commit()

    def decisions(self, channel: str | None = None, target: str | None = None, version: str | None = None,
                  evidence: bool = True, action: str | None = None) -> list[dict]:
        """Stored decisions, oldest first; `evidence=False` leaves the bulky evidence out (timelines)."""
        table = DecisionRow.__table__
        columns = [table.c.at, table.c.channel, table.c.target, table.c.version, table.c.action,
                   table.c.fraction_before, table.c.fraction_after, table.c.applied, table.c.reasons]
        query = select(*columns, *([table.c.evidence] if evidence else [])).order_by(table.c.id)
        for column, value in ((table.c.channel, channel), (table.c.target, target), (table.c.version, version),
                              (table.c.action, action)):
            if value:
                query = query.where(column == value)
        with self.engine.connect() as connection:
            return [{"at": _utc(r.at), "channel": r.channel, "target": r.target, "version": r.version,
                     "action": r.action, "fraction_before": r.fraction_before, "fraction_after": r.fraction_after,
                     "applied": r.applied, "reasons": r.reasons, "evidence": r.evidence if evidence else {}}
                    for r in connection.execute(query)]
