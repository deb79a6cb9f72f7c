"""params.yaml's `task` and `detection` sections: what the model predicts, and how a detector's outputs decode.

`task: classification` (the default) is an image classifier: class folders, cross-entropy, top-1 accuracy.
`task: detection` is an object detector: COCO or YOLO annotations, mAP@0.5:0.95 from pycocotools, and
the `detection:` section says how the model's outputs are laid out, so a detector written elsewhere plugs
in without code changes (edgeship.tasks.detection.decode reads it):

    detection:
      layout: concat          # one tensor (N, 4 + classes, A): boxes in input pixels then class scores
                              #   (what Ultralytics exports for YOLOv8/YOLO11); or `separate`:
                              #   (box regression (N, A, 4), class logits (N, A, C)), decoded outside the model
      strides: [8, 16, 32]    # A = sum over strides of (input_size / stride)^2 points, stride by stride, row-major
      score_threshold: 0.05
      iou_threshold: 0.6      # NMS, per class
      max_detections: 100
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from edgeship.config.section import Section

TaskName = Literal["classification", "detection"]


class DetectionParams(Section):
    """How a detector's outputs decode, and the NMS every stage and every target shares."""

    layout: Literal["concat", "separate"] = Field(
        default="concat", description="concat: one (N, 4 + C, A) tensor, boxes in pixels then class scores (YOLO "
                                      "export); separate: (box regression (N, A, 4), class logits (N, A, C))")
    strides: list[int] = Field(default_factory=lambda: [8, 16, 32], min_length=1,
                               description="feature strides of the head's points, in the model's output order")
    box_format: Literal["cxcywh", "xyxy"] = Field(default="cxcywh", description="concat: how boxes are written "
                                                  "(input pixels)")
    scores: Literal["probabilities", "logits"] | None = Field(
        default=None, description="what the class outputs are; null: probabilities for concat, logits for separate")
    regression: Literal["exp", "linear"] = Field(
        default="exp", description="separate: box regression is left/top/right/bottom distances in stride units, "
                                   "exp(x) (exp) or x (linear)")
    score_threshold: float = Field(default=0.05, ge=0, lt=1, description="detections at or below it are dropped")
    iou_threshold: float = Field(default=0.6, gt=0, le=1, description="NMS IoU, per class")
    max_detections: int = Field(default=100, ge=1, le=1000, description="per image, after NMS")

    @field_validator("strides")
    @classmethod
    def _positive(cls, strides: list[int]) -> list[int]:
        if any(s < 1 for s in strides):
            raise ValueError(f"strides must be positive integers, got {strides}")
        return strides
