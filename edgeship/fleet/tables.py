"""The fleet store's tables (SQLAlchemy 2): raw records and events (kept for a retention period), rollups (what
decisions read), device states and rollout decisions.

On PostgreSQL the raw records are partitioned by day of `window_end` (edgeship.fleet.retention creates the
partitions and drops those past the retention); a record is keyed by (record_id, window_end), the partition
key being part of every unique key there, and a redelivery carries the same window_end.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, DateTime, Float, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class RecordRow(Base):
    __tablename__ = "telemetry_records"
    __table_args__ = {"postgresql_partition_by": "RANGE (window_end)"}
    record_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    window_end: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True, index=True)
    device_id: Mapped[str] = mapped_column(String(120), index=True)
    sequence: Mapped[int] = mapped_column(Integer)
    channel: Mapped[str] = mapped_column(String(80))
    target: Mapped[str] = mapped_column(String(80))
    model_name: Mapped[str] = mapped_column(String(120))
    device_class: Mapped[str] = mapped_column(String(80))
    active_version: Mapped[str | None] = mapped_column(String(80))
    shadow_version: Mapped[str | None] = mapped_column(String(80))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    payload: Mapped[str] = mapped_column(Text)


class EventRow(Base):
    __tablename__ = "update_events"
    device_id: Mapped[str] = mapped_column(String(120), primary_key=True)
    sequence: Mapped[int] = mapped_column(Integer, primary_key=True)
    channel: Mapped[str] = mapped_column(String(80), index=True)
    target: Mapped[str] = mapped_column(String(80))
    device_class: Mapped[str] = mapped_column(String(80))
    at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    kind: Mapped[str] = mapped_column(String(40))
    version: Mapped[str | None] = mapped_column(String(80))
    slot: Mapped[str | None] = mapped_column(String(40))
    reason: Mapped[str | None] = mapped_column(String(400))


class ClassRollupRow(Base):
    """Sums per (channel, target, version, device class, time bucket): edgeship.fleet.rollup.ClassKey."""

    __tablename__ = "rollup_classes"
    __table_args__ = (Index("ix_rollup_classes_scope", "channel", "target", "bucket"),)
    id: Mapped[str] = mapped_column(String(500), primary_key=True)
    channel: Mapped[str] = mapped_column(String(80))
    target: Mapped[str] = mapped_column(String(80))
    version: Mapped[str] = mapped_column(String(80))
    device_class: Mapped[str] = mapped_column(String(80))
    bucket: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    state: Mapped[str] = mapped_column(Text)


class DeviceRollupRow(Base):
    """Sums per (channel, target, version, device, device class): edgeship.fleet.rollup.DeviceKey."""

    __tablename__ = "rollup_devices"
    __table_args__ = (Index("ix_rollup_devices_scope", "channel", "target", "version", "last_seen"),)
    id: Mapped[str] = mapped_column(String(500), primary_key=True)
    channel: Mapped[str] = mapped_column(String(80))
    target: Mapped[str] = mapped_column(String(80))
    version: Mapped[str] = mapped_column(String(80))
    device_id: Mapped[str] = mapped_column(String(120))
    device_class: Mapped[str] = mapped_column(String(80))
    first_seen: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_seen: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    state: Mapped[str] = mapped_column(Text)


class MetaRow(Base):
    """What the rollups were built with (ROLLUP_VERSION, bucket width): a mismatch asks for a replay."""

    __tablename__ = "fleet_meta"
    key: Mapped[str] = mapped_column(String(80), primary_key=True)
    value: Mapped[str] = mapped_column(String(400))


class DeviceStateRow(Base):
    __tablename__ = "device_states"
    device_id: Mapped[str] = mapped_column(String(120), primary_key=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    payload: Mapped[dict] = mapped_column(JSON)


class DecisionRow(Base):
    __tablename__ = "rollout_decisions"
    __table_args__ = (Index("ix_rollout_decisions_scope", "channel", "target", "version"),)
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
