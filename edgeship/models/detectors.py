"""Zoo detectors: anchor-free, MobileNetV2-style backbones, for 128-320 px inputs on edge devices.

Two output layouts over the same network, so their int8 behaviour can be compared on equal terms:

- `yolo_detector`: YOLO-style, exported as Ultralytics exports YOLOv8/YOLO11: ONE tensor (N, 4 + C, A),
  boxes decoded inside the model (cx, cy, w, h in input pixels) then class probabilities. Box pixels
  and probabilities share one tensor (one int8 scale where it is quantized): the layout that loses
  most mAP under plain post-training quantization.
- `split_head_detector`: SSD-lite/FCOS-style separate heads: box regression (N, A, 4) as log distances
  in stride units and class logits (N, A, C), decoded outside the model, in float.

Backbone: inverted residuals (edgeship.models.zoo) to strides 8, 16 and 32; an FPN-lite neck (1x1
laterals, nearest upsampling, depthwise-separable smoothing); per level a box and a class branch.
Points as edgeship.tasks.detection.decode orders them (params.yaml `detection: {strides: [8, 16, 32]}`).

    >>> model = yolo_detector(num_classes=4, in_channels=3, input_size=128, width_mult=0.5)
    >>> model(torch.zeros(1, 3, 128, 128)).shape      # (1, 8, 336)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgeship.models.zoo import ConvBNReLU, InvertedResidual, _make_divisible

STRIDES = (8, 16, 32)
_PRIOR = 0.01  # initial class probability (focal loss's prior): background dominates at the start


def _separable(channels: int) -> nn.Sequential:
    return nn.Sequential(ConvBNReLU(channels, channels, groups=channels), ConvBNReLU(channels, channels, kernel=1))


class Backbone(nn.Module):
    """Inverted residual stages; returns the stride 8, 16 and 32 feature maps."""

    def __init__(self, in_channels: int, width_mult: float):
        super().__init__()
        c = [_make_divisible(v * width_mult) for v in (16, 16, 24, 48, 96)]
        self.stem = ConvBNReLU(in_channels, c[0], stride=2)
        self.stage4 = InvertedResidual(c[0], c[1], 2, 1)
        self.stage8 = nn.Sequential(InvertedResidual(c[1], c[2], 2, 4), InvertedResidual(c[2], c[2], 1, 4))
        self.stage16 = nn.Sequential(InvertedResidual(c[2], c[3], 2, 4), InvertedResidual(c[3], c[3], 1, 4))
        self.stage32 = nn.Sequential(InvertedResidual(c[3], c[4], 2, 4), InvertedResidual(c[4], c[4], 1, 4))
        self.channels = (c[2], c[3], c[4])

    def forward(self, x):
        p8 = self.stage8(self.stage4(self.stem(x)))
        p16 = self.stage16(p8)
        return p8, p16, self.stage32(p16)


class Detector(nn.Module):
    """Backbone, FPN-lite neck and per-level heads; `layout` picks the outputs (see the module docstring)."""

    def __init__(self, num_classes: int, in_channels: int = 3, input_size: int = 128, width_mult: float = 0.5,
                 neck_channels: int = 32, layout: str = "concat"):
        super().__init__()
        if layout not in ("concat", "separate"):
            raise ValueError(f"layout must be concat or separate, got {layout!r}")
        if input_size % STRIDES[-1]:
            raise ValueError(f"input_size must be a multiple of {STRIDES[-1]}, got {input_size}")
        self.layout, self.num_classes = layout, num_classes
        self.backbone = Backbone(in_channels, width_mult)
        self.lateral = nn.ModuleList(nn.Sequential(nn.Conv2d(c, neck_channels, 1, bias=False),
                                                   nn.BatchNorm2d(neck_channels))
                                     for c in self.backbone.channels)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.smooth = nn.ModuleList(_separable(neck_channels) for _ in STRIDES)
        self.box_branch = nn.ModuleList(nn.Sequential(_separable(neck_channels), nn.Conv2d(neck_channels, 4, 1))
                                        for _ in STRIDES)
        self.class_branch = nn.ModuleList(nn.Sequential(_separable(neck_channels),
                                                        nn.Conv2d(neck_channels, num_classes, 1)) for _ in STRIDES)
        for module in self.modules():  # as the zoo's MobileNetV2: PyTorch's default init shrinks the signal per layer
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
        for branch in (*self.class_branch, *self.box_branch):  # heads start small: boxes of about a stride
            nn.init.normal_(branch[-1].weight, 0.0, 0.01)
            nn.init.zeros_(branch[-1].bias)
        for branch in self.class_branch:
            nn.init.constant_(branch[-1].bias, -math.log((1 - _PRIOR) / _PRIOR))
        if layout == "concat":  # the decode lives inside the model, as in Ultralytics' exports
            from edgeship.records import DetectionHead
            from edgeship.tasks.detection.decode import anchor_points

            points, strides = anchor_points(DetectionHead(num_classes=num_classes, input_size=input_size,
                                                          strides=STRIDES))
            self.register_buffer("points", points.T[None], persistent=False)  # (1, 2, A)
            self.register_buffer("point_strides", strides[None, None], persistent=False)  # (1, 1, A)

    def forward(self, x):
        l8, l16, l32 = (lateral(f) for lateral, f in zip(self.lateral, self.backbone(x)))
        p32 = l32
        p16 = l16 + self.upsample(p32)
        p8 = l8 + self.upsample(p16)
        levels = [smooth(p) for smooth, p in zip(self.smooth, (p8, p16, p32))]
        regression = torch.cat([branch(p).flatten(2) for branch, p in zip(self.box_branch, levels)], dim=2)
        classes = torch.cat([branch(p).flatten(2) for branch, p in zip(self.class_branch, levels)], dim=2)
        if self.layout == "separate":
            return regression.transpose(1, 2), classes.transpose(1, 2)
        distances = torch.exp(regression.clamp(-10, 10)) * self.point_strides  # left, top, right, bottom
        top_left, bottom_right = self.points - distances[:, :2], self.points + distances[:, 2:]
        boxes = torch.cat([(top_left + bottom_right) / 2, bottom_right - top_left], dim=1)  # cx, cy, w, h
        return torch.cat([boxes, torch.sigmoid(classes)], dim=1)


def yolo_detector(num_classes: int, in_channels: int, input_size: int, **kwargs) -> nn.Module:
    """YOLO-style: one (N, 4 + C, A) output, boxes in pixels and class probabilities (params: layout: concat).
    kwargs: width_mult, neck_channels."""
    return Detector(num_classes, in_channels, input_size, layout="concat", **kwargs)


def split_head_detector(num_classes: int, in_channels: int, input_size: int, **kwargs) -> nn.Module:
    """SSD-lite/FCOS-style separate heads: (box regression (N, A, 4), class logits (N, A, C)) (params: layout:
    separate). kwargs: width_mult, neck_channels."""
    return Detector(num_classes, in_channels, input_size, layout="separate", **kwargs)
