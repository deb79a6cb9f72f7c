"""Small detectors and data shared by the detection tests: the shapes set at 64 px, and random-weight detectors."""

from __future__ import annotations

from pathlib import Path

import torch

from edgeship.config import DataParams, parse_params
from edgeship.records import PreparedData, TrainedModel
from edgeship.tasks.detection.data import prepare_detection
from edgeship.tasks.detection.shapes import export_shapes
from edgeship.tasks.detection.train import build_detector


def shapes_data(root: Path, count: int = 24) -> PreparedData:
    export_shapes(root / "raw", count=count, size=64, seed=1)
    return prepare_detection(root / "raw", root / "prepared", DataParams(input_size=64, channels=3))


def untrained_detector(data: PreparedData, directory: Path, layout: str) -> TrainedModel:
    """A random-weight detector as a TrainedModel, its last layers scaled up so it detects plenty."""
    factory = {"concat": "yolo_detector", "separate": "split_head_detector"}[layout]
    params = parse_params({"task": "detection", "targets": ["onnx-fp32"],
                           "model": {"factory": f"edgeship.models.detectors:{factory}",
                                     "kwargs": {"width_mult": 0.25, "neck_channels": 16}},
                           "detection": {"layout": layout, "score_threshold": 0.3, "max_detections": 20}})
    torch.manual_seed(0)
    model, head = build_detector(params, data)
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        torch.nn.init.constant_(norm.weight, 2.0)  # untrained features fade layer by layer: keep them alive
    for branches, spread in ((model.class_branch, 0.02), (model.box_branch, 0.01)):  # scores that vary from point
        for branch in branches:                                                     # to point (many detections,
            torch.nn.init.normal_(branch[-1].weight, 0.0, spread)                   # no ties), boxes of sizes a
            torch.nn.init.zeros_(branch[-1].bias)                                   # trained detector gives
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / "model_fp32.pt")
    return TrainedModel(checkpoint=directory / "model_fp32.pt", factory=params.model.factory,
                        factory_kwargs=params.model.kwargs, num_classes=len(data.classes),
                        input_shape=data.input_shape, val_accuracy=0.0, test_accuracy=0.0, task="detection",
                        detection=head)


