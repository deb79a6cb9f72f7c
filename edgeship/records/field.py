"""Field samples: what a channel asks its devices to keep of their inputs, and what one kept sample holds.

A channel opts in (params.yaml `rollout.channels.<channel>.field_samples`, off by default); publishing signs
`FieldSampling` into each of the channel's entries (`ChannelEntry.field_sampling`), the updater keeps it in the
state directory, and `edgeship-device serve` samples and uploads by it (edgeship.device.field_samples).
`edgeship data field` (edgeship.tasks.field_data) pulls the samples into the data set.

A sample is one answered request, as an .npz: `x` (the inputs as the model got them), `outputs` (the answer),
`labels` (the application's true class per image, -1 where none came with it) and `meta` (JSON:
`SampleMeta`). A label that arrives after the sample was kept travels as `<sample>.label.json` beside it.
"""

from __future__ import annotations

from pydantic import Field

from edgeship.records.base import WireRecord
from edgeship.records.telemetry import DeviceIdentity


class FieldSampling(WireRecord):
    """How a device samples its inputs and where it uploads them (signed into the channel entry)."""

    upload_url: str = Field(description="s3://bucket/prefix the devices upload to (the OTA bucket's field "
                                        "prefix; device credentials may only put objects under it)")
    endpoint_url: str | None = Field(default=None, description="an S3-compatible endpoint; none: AWS")
    budget_bytes_per_day: int = Field(default=2_000_000, ge=0, description="bytes of samples one device keeps "
                                      "(and so uploads) per UTC day; also the most it holds while offline")
    sample_rate: float = Field(default=0.01, ge=0, le=1, description="share of ordinary answers kept")
    random_share: float = Field(default=0.5, ge=0, le=1, description="share of the day's budget ordinary "
                                "samples may use; the rest waits for preferred ones (low confidence, "
                                "disagreement with the compared model, feedback)")
    low_confidence: float = Field(default=0.5, ge=0, le=1, description="answers with top-1 confidence below "
                                  "this are always kept (within the budget)")
    recent_inputs: int = Field(default=256, ge=0, description="inputs held in memory (at most 16 MB of them) so "
                               "that one whose label arrives later can still be kept")
    upload_every_s: float = Field(default=60.0, gt=0, description="how often the device uploads what it kept")


class SampleMeta(DeviceIdentity):
    """What a sample says about itself (the `meta` entry of its .npz): who answered, when, and why it was kept."""

    sample_id: str
    request_id: str
    version: str | None = None
    answered_at: float                    # seconds since the epoch
    reason: str                           # why kept: low_confidence | disagreement | feedback | sampled
    confidence: list[float] = Field(default_factory=list)   # top-1 confidence per image


class SampleLabel(WireRecord):
    """A label that arrived after its sample was kept (`<sample>.label.json`)."""

    sample_id: str
    labels: list[int]
    labelled_at: float
