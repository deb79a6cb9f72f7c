"""Channel descriptors: which model versions a release channel ships, per target.

A channel ("stable", "canary") is one JSON file in the OTA repository,
`channels/<channel>.json`. It is a TUF target like the models themselves, so
the targets key signs it and a device trusts it only after verification. Each
compile target ("onnx-int8", "tflite-int8", ...) has an entry of its own, with
its own staged rollout:

    {"channel": "stable", "model_name": "digits",
     "targets": {"onnx-int8": {"base": {"version": "6", ...},        # what the whole fleet runs
                               "candidate": {"version": "7", ...},   # being rolled out
                               "fraction": 0.1,                      # of this target's devices
                               "rollout_state": "in_progress",
                               "fallback": {"version": "3", "model_name": "digits-tiny", ...},
                               "previous": {"version": "5", ...}}}}  # the base before `base`

A device inside the candidate's cohort (`cohort_position(...) < fraction`) runs
the candidate; every other device stays on the base, the last version that
reached 100% on this target. Touching one target's entry moves no device of
another. This module imports pydantic only, so the device updater shares it.

    >>> descriptor = ChannelDescriptor.from_bytes(data)
    >>> model, in_cohort = descriptor.targets["onnx-int8"].choose("device-17", "digits")
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SerializationInfo, model_serializer

from edgeship.records import DetectionOutputs, TensorSpec

# Names that become path components on the device (versions/<version>/...) or
# in the repository (channels/<channel>.json): no separators, no dot-dot.
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"

RolloutState = Literal["in_progress", "completed", "paused", "aborted"]
_LEGACY_FIELDS = {"version", "target_path", "sha256", "bytes", "runtime", "inputs"}


class _Wire(BaseModel):
    # Frozen like edgeship's records, but unknown fields are ignored rather than
    # refused: devices in the field must keep reading descriptors that a newer
    # pipeline wrote with fields they do not know yet.
    model_config = ConfigDict(frozen=True, extra="ignore")


class GoldenVectors(_Wire):
    """A few real inputs and the reference outputs the pipeline's host check got for them (one .npz target).

    The npz holds arrays `inputs` and `outputs`; the device runs `inputs` through the
    model it is about to install and requires every output within `atol` (plus
    `rtol` of the reference) and the same top-1 class where `top1` is set.
    """

    target_path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)
    atol: float = Field(default=0.05, ge=0)
    rtol: float = Field(default=0.05, ge=0)
    top1: bool = True
    count: int = 0
    # What the outputs are: "logits" (compared value by value, top-1 exactly), or a detector's "detections"
    # (IoU-matched: at least `min_matched` of them matched, matched scores within atol; edgeship.device.install)
    kind: Literal["logits", "detections"] = "logits"
    min_matched: float = Field(default=0.9, ge=0, le=1)


class ReleasedModel(_Wire):
    """One model file of one version, for one target, as published in the repository."""

    version: str = Field(pattern=SAFE_NAME, description="the MLflow model version")
    target_path: str = Field(description="TUF target path of the model file")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)
    runtime: str = Field(description="runtime that loads it, e.g. onnxruntime")
    inputs: list[TensorSpec]
    outputs: list[TensorSpec] = Field(default_factory=list)  # what the target declares (checked before a swap)
    model_name: str = ""
    latency_budget_ms: float | None = None  # the gate's p99 budget for this target
    golden: GoldenVectors | None = None
    postprocess: DetectionOutputs | None = None  # a detector: its outputs, and the NMS after them (where not in it)

    @property
    def filename(self) -> str:
        """The model file's name (the last part of its target path)."""
        return self.target_path.rpartition("/")[2]

    @property
    def label(self) -> str:
        return f"{self.model_name or 'model'} v{self.version}"


class ChannelEntry(_Wire):
    """What a channel ships for one target: a stable base, a candidate in staged rollout, a fallback."""

    base: ReleasedModel | None = None
    candidate: ReleasedModel | None = None
    fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    rollout_state: RolloutState = "completed"
    state_reason: str = ""
    previous: ReleasedModel | None = None  # the base before `base`: what a rollback returns to
    shadow: ReleasedModel | None = None
    shadow_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    shadow_sample_rate: float = Field(default=0.1, ge=0.0, le=1.0)
    fallback: ReleasedModel | None = None
    drift_reference: dict | None = None
    field_sampling: dict | None = None  # edgeship.records.field.FieldSampling: the channel asks for field samples
    allow_failed_gate: str | None = None  # the override reason when published with --allow-failed-gate

    @model_serializer(mode="wrap")
    def _with_legacy_fields(self, handler, info: SerializationInfo):
        # Updaters from before per-target rollouts read an entry as one released model
        # (version, target_path, ...) at the descriptor's rollout_fraction (default 1.0):
        # the base's fields at the top level make them follow the base, never a candidate.
        data = handler(self)
        if self.base is not None and isinstance(data, dict):
            legacy = self.base.model_dump(mode=info.mode, include=_LEGACY_FIELDS)
            data = {**legacy, **data}
        return data

    @property
    def golden(self) -> GoldenVectors | None:
        """The golden vectors of the newest release in this entry (candidate, else base)."""
        newest = self.candidate or self.base
        return newest.golden if newest else None

    @property
    def newest(self) -> ReleasedModel | None:
        return self.candidate or self.base

    def choose(self, device_id: str, model_name: str) -> tuple[ReleasedModel | None, bool]:
        """The release a device should run, and whether it is in the candidate's cohort.

        A paused rollout keeps its cohort (nobody new joins, nobody leaves); an
        aborted one has no candidate any more, so everyone is on the base.
        """
        if self.candidate is not None and self.rollout_state != "aborted":
            position = cohort_position(device_id, model_name, self.candidate.version)
            if position < self.fraction:
                return self.candidate, True
        return self.base, False


    def runs_shadow(self, device_id: str, model_name: str) -> bool:
        """Whether a device is in the shadow's cohort (a slice of its own, apart from the candidate's)."""
        return self.shadow is not None and \
            cohort_position(device_id, f"{model_name}/shadow", self.shadow.version) < self.shadow_fraction


class ChannelDescriptor(_Wire):
    """A release channel: per target a base, a candidate in staged rollout, and a fallback."""

    channel: str = Field(pattern=SAFE_NAME)
    model_name: str
    released_at: datetime
    targets: dict[str, ChannelEntry] = Field(default_factory=dict)
    source: str = ""  # how the last change came about ("alias production -> v7", "rollout 0.5")

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
