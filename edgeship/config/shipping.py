"""params.yaml's sections on registering and shipping: registry, ota (and its fallback model)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from edgeship.config.section import Section


class RegistryParams(Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_location: str | None = Field(default="mlartifacts",
                                          description="artifact root for a new experiment (local path or URI)")
    experiment: str = "edgeship-release"
    candidate_alias: str = "candidate"


class FallbackParams(Section):
    """A small, separately registered model every device keeps installed (per target it has an artifact for)."""

    model_name: str = Field(description="its registered model name, e.g. digits-tiny")
    alias: str | None = "production"
    version: str | None = None  # pin a version instead of the alias


class OtaParams(Section):
    repository: str = Field(default="ota-repo", description="local directory or s3://bucket/prefix")
    keystore: Path = Path(".edgeship/keys")
    channel: str = "stable"
    s3_endpoint_url: str | None = None
    lock: str | None = Field(default=None, description="where publishers take the writer lock: unset, the "
                             "repository's own storage (it must honour conditional writes: a local directory, AWS "
                             "S3); or a PostgreSQL URL (postgresql://user@host:5432/db) for an S3 endpoint that "
                             "does not (the local stack's); EDGESHIP_OTA_LOCK overrides it")
    metadata_expiry_days: int = Field(default=30, ge=1, description="targets metadata lifetime")
    snapshot_expiry_days: float = Field(default=7, gt=0)
    timestamp_expiry_hours: float = Field(default=24, gt=0, description="the freeze window: re-sign before it")
    resign_every_hours: float = Field(default=6, gt=0, description="schedule of the publish/resign deployment")
    fallback: FallbackParams | None = None
    golden_count: int = Field(default=8, ge=0, le=256, description="golden vectors signed with each release")
    golden_atol: float = Field(default=0.05, ge=0, description="int8 kernels differ a little across CPUs; "
                               "the top-1 class must match exactly")
    golden_rtol: float = Field(default=0.05, ge=0)
