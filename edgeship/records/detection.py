"""Detection records: how a detector's outputs decode, and what a compiled detector's file outputs.

Both cross to devices (an evaluate job's request, a channel entry), so they are wire records:
unknown fields are ignored, new optional ones take their defaults.

A detection answer, wherever it is computed (torch, a runtime adapter, a device), is one packed
array per batch, (N, max_detections, 6): rows [x1, y1, x2, y2, score, class] in input pixels,
sorted by score, padded with rows whose class is -1 (edgeship.device.detections).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgeship.records.base import WireRecord


class NmsSettings(WireRecord):
    """The one NMS every stage and every target applies: per class, then the best `max_detections` per image."""

    score_threshold: float = 0.05  # detections scoring at or below it are dropped
    iou_threshold: float = 0.6
    max_detections: int = 100


class DetectionHead(WireRecord):
    """How a detector's raw outputs decode into boxes and class scores (params.yaml `detection:` plus the data)."""

    layout: Literal["concat", "separate"] = "concat"
    strides: tuple[int, ...] = (8, 16, 32)
    num_classes: int
    input_size: int  # square input, pixels
    box_format: Literal["cxcywh", "xyxy"] = "cxcywh"  # concat
    scores: Literal["probabilities", "logits"] = "probabilities"
    regression: Literal["exp", "linear"] = "exp"  # separate
    nms: NmsSettings = Field(default_factory=NmsSettings)

    @property
    def points(self) -> int:
        """Head points (anchors) the outputs hold: every stride's grid, one point per cell."""
        return sum((self.input_size // s) ** 2 for s in self.strides)


DetectionFormat = Literal["nms_flat", "nms_padded", "decoded", "vision"]


class DetectionOutputs(WireRecord):
    """What a compiled detector's file outputs, and what the runtime adapter does after it (on the device too).

    - nms_flat: NMS ran in the graph (ONNX NonMaxSuppression): `batch` (M,), `classes` (M,), `scores` (M,),
      `boxes` (M, 4) xyxy pixels, for all images of the batch at once.
    - nms_padded: NMS ran in the graph with padded outputs (TensorRT EfficientNMS_TRT): `count` (N, 1),
      `boxes` (N, K, 4), `scores` (N, K), `classes` (N, K).
    - decoded: the graph ends at decoded `boxes` (N, A, 4) xyxy pixels and `scores` (N, A, C); NMS runs in
      numpy after it (LiteRT, whose converter has no NMS for this graph).
    - vision: Core ML's NMS stage: `coordinates` (K, 4) normalized cx, cy, w, h and `confidence` (K, C).
    `outputs` maps each role to the file's tensor name.
    """

    format: DetectionFormat
    outputs: dict[str, str]
    num_classes: int
    input_size: int
    nms: NmsSettings = Field(default_factory=NmsSettings)
