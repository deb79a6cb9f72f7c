"""Decoding a detector's outputs (torch): the head points, `Decode` to boxes and scores, and the model a target exports.

A detector's outputs are declared in params.yaml (`detection:`, edgeship.config.task) and read here into a
`DetectionHead`. `Decode` turns them into boxes (N, A, 4) xyxy in input pixels and class probabilities
(N, A, C), in float; training's loss, the fp32 reference and every exported target use this one module,
and NMS (edgeship.device.detections.nms, or the runtime's own in the graph) follows it.

    concat:   (N, 4 + C, A): boxes (cx, cy, w, h or x1, y1, x2, y2, in input pixels) then class scores
    separate: (box regression (N, A, 4): left, top, right, bottom distances from the point in stride units,
              class scores (N, A, C))

Points are ordered stride by stride, each stride's grid row-major, at cell centres ((j + 0.5) * stride), as
Ultralytics' exports order them.

    >>> head = detection_head(params.detection, num_classes=4, input_size=128)
    >>> boxes, scores = Decode(head)(model(images))
"""

from __future__ import annotations

import torch
from torch import nn

from edgeship.config import DetectionParams
from edgeship.errors import ModelLoadError
from edgeship.records import DetectionHead, NmsSettings


def detection_head(params: DetectionParams, num_classes: int, input_size: int) -> DetectionHead:
    """params.yaml's `detection:` section with the data's classes and input size."""
    scores = params.scores or ("probabilities" if params.layout == "concat" else "logits")
    return DetectionHead(layout=params.layout, strides=tuple(params.strides), num_classes=num_classes,
                         input_size=input_size, box_format=params.box_format, scores=scores,
                         regression=params.regression,
                         nms=NmsSettings(score_threshold=params.score_threshold, iou_threshold=params.iou_threshold,
                                         max_detections=params.max_detections))


def anchor_points(head: DetectionHead) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's points (A, 2) as (x, y) cell centres in input pixels, and each point's stride (A,)."""
    points, strides = [], []
    for stride in head.strides:
        cells = head.input_size // stride
        ys, xs = torch.meshgrid(torch.arange(cells), torch.arange(cells), indexing="ij")
        points.append(torch.stack([xs.flatten(), ys.flatten()], dim=1).float().add(0.5).mul(stride))
        strides.append(torch.full((cells * cells,), float(stride)))
    return torch.cat(points), torch.cat(strides)


class Decode(nn.Module):
    """Raw detector outputs -> (boxes (N, A, 4) xyxy input pixels, class probabilities (N, A, C)), in float."""

    def __init__(self, head: DetectionHead):
        super().__init__()
        self.head = head
        points, strides = anchor_points(head)
        self.register_buffer("points", points, persistent=False)
        self.register_buffer("strides", strides[:, None], persistent=False)

    def forward(self, outputs):
        head = self.head
        if head.layout == "concat":
            boxes, scores = outputs[:, :4].transpose(1, 2), outputs[:, 4:].transpose(1, 2)
            if head.box_format == "cxcywh":
                centre, size = boxes[..., :2], boxes[..., 2:]
                boxes = torch.cat([centre - size / 2, centre + size / 2], dim=-1)
        else:
            regression, scores = outputs
            distances = torch.exp(regression.clamp(-10, 10)) if head.regression == "exp" else regression
            distances = distances * self.strides
            boxes = torch.cat([self.points - distances[..., :2], self.points + distances[..., 2:]], dim=-1)
        if head.scores == "logits":
            scores = torch.sigmoid(scores)
        return boxes, scores


class DecodedDetector(nn.Module):
    """The model a detection target exports: the detector and `Decode`, ending at boxes and scores (NMS follows,
    in the graph where the runtime has it)."""

    def __init__(self, model: nn.Module, head: DetectionHead):
        super().__init__()
        self.model, self.decode = model, Decode(head)

    def forward(self, images):
        return self.decode(self.model(images))


def check_outputs(model: nn.Module, head: DetectionHead, factory: str, channels: int) -> None:
    """One forward pass on zeros: the outputs have the layout params.yaml declares (else one error saying how)."""
    size, classes, points = head.input_size, head.num_classes, head.points
    if any(size % s for s in head.strides):
        raise ModelLoadError(f"data.input_size {size} is not a multiple of every detection stride {head.strides}; "
                             f"use a multiple of {max(head.strides)}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(torch.zeros(2, channels, size, size))
    except Exception as error:  # any layer can refuse a shape, each in its own words
        raise ModelLoadError(f"detector '{factory}' cannot take images of shape ({channels}, {size}, {size}): "
                             f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
    finally:
        model.train(was_training)
    if head.layout == "concat":
        expected = "one tensor (2, %d, %d)" % (4 + classes, points)
        ok = isinstance(outputs, torch.Tensor) and tuple(outputs.shape) == (2, 4 + classes, points)
    else:
        expected = f"a pair of tensors (2, {points}, 4) and (2, {points}, {classes})"
        ok = (isinstance(outputs, (tuple, list)) and len(outputs) == 2
              and tuple(outputs[0].shape) == (2, points, 4) and tuple(outputs[1].shape) == (2, points, classes))
    if not ok:
        got = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else \
            [tuple(o.shape) for o in outputs] if isinstance(outputs, (tuple, list)) else type(outputs).__name__
        raise ModelLoadError(f"detector '{factory}' returns {got} for a batch of 2; detection.layout '{head.layout}' "
                             f"with strides {list(head.strides)} at input {size} and {classes} classes wants "
                             f"{expected} ({points} points); fix detection: in params.yaml or the model's head")
