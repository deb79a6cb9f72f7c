"""The base of every record: immutable pydantic models; imports pydantic only, so the device side can use it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    """Base for records that stay inside the pipeline: immutable, and strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")
