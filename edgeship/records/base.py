"""The base of every record: immutable pydantic models; imports pydantic only, so the device side can use it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    """Base for records that stay inside the pipeline: immutable, and strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class WireRecord(BaseModel):
    """Base for records that cross the network between pipeline and device: immutable, and tolerant of skew.

    An agent and a pipeline of different releases talk to each other: a field one side does
    not know is ignored, and an optional field the other side does not send takes its default,
    so adding a field never makes an older peer see the other as broken. A change an older peer
    cannot read bumps `edgeship.records.wire.PROTOCOL` instead.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")
