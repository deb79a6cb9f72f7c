"""The fleet store: telemetry records, update events, device states and rollout decisions (SQLAlchemy 2).

SQLite by default (`sqlite:///fleet.db`), PostgreSQL in the real-services stack
(`postgresql://postgres@127.0.0.1:5432/fleet`, through psycopg 3). Writes are idempotent: a record is keyed by
its `record_id` and an event by (device, sequence), so MQTT QoS 1 redeliveries change nothing.

    >>> store = FleetStore("sqlite:///fleet.db")
    >>> store.add_record(record)              # False when it was a duplicate
    >>> records = store.records(channel="stable", target="onnx-int8", since=stage_start)
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, String, Text, create_engine, event, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from edgeship.records.telemetry import TelemetryEvent, TelemetryRecord


class Base(DeclarativeBase):
    pass


class RecordRow(Base):
    __tablename__ = "telemetry_records"
    record_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(120), index=True)
    sequence: Mapped[int] = mapped_column(Integer)
    channel: Mapped[str] = mapped_column(String(80), index=True)
    target: Mapped[str] = mapped_column(String(80), index=True)
    model_name: Mapped[str] = mapped_column(String(120))
    device_class: Mapped[str] = mapped_column(String(80))
    active_version: Mapped[str | None] = mapped_column(String(80), index=True)
    shadow_version: Mapped[str | None] = mapped_column(String(80))
    window_end: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    payload: Mapped[str] = mapped_column(Text)


class EventRow(Base):
    __tablename__ = "update_events"
    device_id: Mapped[str] = mapped_column(String(120), primary_key=True)
    sequence: Mapped[int] = mapped_column(Integer, primary_key=True)
    channel: Mapped[str] = mapped_column(String(80), index=True)
    target: Mapped[str] = mapped_column(String(80))
    device_class: Mapped[str] = mapped_column(String(80))
    at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    kind: Mapped[str] = mapped_column(String(40))
    version: Mapped[str | None] = mapped_column(String(80))
    slot: Mapped[str | None] = mapped_column(String(40))
    reason: Mapped[str | None] = mapped_column(String(400))


class DeviceStateRow(Base):
    __tablename__ = "device_states"
    device_id: Mapped[str] = mapped_column(String(120), primary_key=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    payload: Mapped[dict] = mapped_column(JSON)


class DecisionRow(Base):
    __tablename__ = "rollout_decisions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    channel: Mapped[str] = mapped_column(String(80))
    target: Mapped[str] = mapped_column(String(80))
    version: Mapped[str | None] = mapped_column(String(80))
    action: Mapped[str] = mapped_column(String(40))
    fraction_before: Mapped[float] = mapped_column(Float)
    fraction_after: Mapped[float] = mapped_column(Float)
    applied: Mapped[bool] = mapped_column(Boolean, default=False)
    reasons: Mapped[list] = mapped_column(JSON)
    evidence: Mapped[dict] = mapped_column(JSON)


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands datetimes back naive; every time here is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


class FleetStore:
    """Reads and writes the fleet tables; creates them on first use."""

    def __init__(self, url: str = "sqlite:///fleet.db"):
        # A bare postgresql:// means SQLAlchemy's psycopg2 driver; the driver installed with edgeship is psycopg 3.
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://") if url.startswith("postgresql://") else url
        self.url = url
        sqlite = url.startswith("sqlite")
        self.engine = create_engine(url, future=True, pool_pre_ping=True,
                                    connect_args={"timeout": 30} if sqlite else {})
        if sqlite:
            # WAL: the controller's reads never block the collector's writes (nor the other way round).
            event.listen(self.engine, "connect", lambda connection, _: connection.execute("PRAGMA journal_mode=WAL"))
        Base.metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def add_record(self, record: TelemetryRecord) -> bool:
        """Store one record and its events; False when the record was already stored (a redelivery)."""
        with Session(self.engine) as session:
            if session.get(RecordRow, record.record_id) is not None:
                return False
            session.add(RecordRow(
                record_id=record.record_id, device_id=record.device_id, sequence=record.sequence,
                channel=record.channel, target=record.target, model_name=record.model_name,
                device_class=record.device_class, active_version=record.versions.active,
                shadow_version=record.versions.shadow, window_end=record.window_end,
                received_at=datetime.now(timezone.utc), payload=record.model_dump_json()))
            try:
                session.commit()
            except IntegrityError:  # another collector stored it between our read and write
                return False
        for event in record.events:
            self._add_event(record, event)
        return True

    def _add_event(self, record: TelemetryRecord, event: TelemetryEvent) -> None:
        with Session(self.engine) as session:
            if session.get(EventRow, (record.device_id, event.sequence)) is not None:
                return
            session.add(EventRow(device_id=record.device_id, sequence=event.sequence, channel=record.channel,
                                 target=event.target or record.target, device_class=record.device_class,
                                 at=event.at, kind=event.kind, version=event.version, slot=event.slot,
                                 reason=event.reason))
            try:
                session.commit()
            except IntegrityError:
                pass

    def set_device_state(self, device_id: str, payload: dict) -> None:
        with Session(self.engine) as session:
            row = session.get(DeviceStateRow, device_id)
            if row is None:
                session.add(DeviceStateRow(device_id=device_id, updated_at=datetime.now(timezone.utc),
                                           payload=payload))
            else:
                row.payload, row.updated_at = payload, datetime.now(timezone.utc)
            session.commit()

    def records(self, channel: str | None = None, target: str | None = None,
                since: datetime | None = None) -> list[TelemetryRecord]:
        """Stored records, oldest window first, optionally for one channel/target and after `since`."""
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
            return len(session.scalars(select(RecordRow.record_id)).all())

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

    def decisions(self, channel: str | None = None, target: str | None = None) -> list[dict]:
        query = select(DecisionRow).order_by(DecisionRow.id)
        if channel:
            query = query.where(DecisionRow.channel == channel)
        if target:
            query = query.where(DecisionRow.target == target)
        with Session(self.engine) as session:
            return [{"at": _utc(r.at), "channel": r.channel, "target": r.target, "version": r.version,
                     "action": r.action, "fraction_before": r.fraction_before, "fraction_after": r.fraction_after,
                     "applied": r.applied, "reasons": r.reasons, "evidence": r.evidence}
                    for r in session.scalars(query)]
