"""Channel descriptors: which model version a release channel ships, per target.

A channel ("stable", "canary") is one JSON file in the OTA repository,
`channels/<channel>.json`. It is a TUF target like the models themselves, so
the targets key signs it and a device trusts it only after verification. For
each compile target ("onnx-int8", "tflite-int8", ...) it names the model file
to run now and the one before it:

    {"channel": "stable", "model_name": "digits", "rollout_fraction": 0.25,
     "targets": {"onnx-int8": {"version": "7", "target_path": "models/digits/7/onnx-int8/model.onnx",
                               "sha256": "...", "bytes": 81234, "runtime": "onnxruntime",
                               "inputs": [...], "previous": {"version": "6", ...}}}}

A device inside the rollout cohort takes `version`; one outside it stays on
`previous`. Rolling back is publishing a descriptor whose entries are the old
`previous`. This module imports pydantic only, so the device updater shares it.

    >>> descriptor = ChannelDescriptor.from_bytes(data)
    >>> descriptor.targets["onnx-int8"].version
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from edgeship.records import TensorSpec

# Names that become path components on the device (versions/<version>/...) or
# in the repository (channels/<channel>.json): no separators, no dot-dot.
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"


class _Wire(BaseModel):
    # Frozen like edgeship's records, but unknown fields are ignored rather than
    # refused: devices in the field must keep reading descriptors that a newer
    # pipeline wrote with fields they do not know yet.
    model_config = ConfigDict(frozen=True, extra="ignore")


class ReleasedModel(_Wire):
    """One model file of one version, for one target, as published in the repository."""

    version: str = Field(pattern=SAFE_NAME, description="the MLflow model version")
    target_path: str = Field(description="TUF target path of the model file")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)
    runtime: str = Field(description="runtime that loads it, e.g. onnxruntime")
    inputs: list[TensorSpec]

    @property
    def filename(self) -> str:
        """The model file's name (the last part of its target path)."""
        return self.target_path.rpartition("/")[2]


class ChannelEntry(ReleasedModel):
    """What a channel ships for one target: the current model and the one before it."""

    previous: ReleasedModel | None = None

    def without_previous(self) -> ReleasedModel:
        """This entry as a plain released model (what becomes the next entry's `previous`)."""
        return ReleasedModel(**self.model_dump(exclude={"previous"}))


class ChannelDescriptor(_Wire):
    """A release channel: per target the model version to run, and how widely to roll it out."""

    channel: str = Field(pattern=SAFE_NAME)
    model_name: str
    released_at: datetime
    rollout_fraction: float = Field(default=1.0, ge=0.0, le=1.0)
    targets: dict[str, ChannelEntry]

    @staticmethod
    def target_path(channel: str) -> str:
        """The TUF target path of a channel's descriptor."""
        return f"channels/{channel}.json"

    def to_bytes(self) -> bytes:
        """The descriptor as published (indented JSON)."""
        return self.model_dump_json(indent=2).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ChannelDescriptor":
        """Parse a published descriptor; pydantic.ValidationError when it is not one."""
        return cls.model_validate_json(data)


def cohort_position(device_id: str, model_name: str, version: str) -> float:
    """A device's stable place in [0, 1) for one release.

    A device is in a release's rollout cohort when its position is below the
    rollout fraction, so widening a rollout (0.1 -> 0.5) keeps the devices that
    already have it. The release is part of the hash so that each release
    starts on a different slice of the fleet rather than always the same canaries.
    """
    digest = hashlib.sha256(f"{model_name}/{version}/{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
