"""Compile targets: one module per target, one protocol, one table (`edgeship.targets.KNOWN_TARGETS`).

A target turns the trained (and, where it needs it, quantized) model into one
artifact for one runtime. Adding a target means one module here, one row in
`edgeship/targets.py`, and its test.

    >>> target = get_target("onnx-int8")
    >>> artifact = target.compile(CompileInputs(trained=..., quantized=..., data=..., output_dir=...))
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from edgeship.errors import UnknownTarget
from edgeship.files import sha256_of  # noqa: F401  (re-exported for targets)
from edgeship.records import PreparedData, QuantizedModel, TrainedModel
from edgeship.targets import KNOWN_TARGETS


@dataclass(frozen=True)
class CompileInputs:
    """Everything a target may use; each target takes what it needs."""

    trained: TrainedModel
    data: PreparedData
    output_dir: Path
    quantized: QuantizedModel | None = None
    options: dict = field(default_factory=dict)  # this target's `compile:` entry in params.yaml (route, io)


class Target(Protocol):
    """The compile protocol."""

    name: str
    runtime: str  # key in edgeship.device.runtimes.RUNTIMES
    precision: str
    needs_quantized: bool  # whether compile() uses CompileInputs.quantized

    def compile(self, inputs: CompileInputs) -> "CompiledArtifact":  # noqa: F821
        """Produce the artifact in inputs.output_dir; raise CompileError with the converter's message."""


def get_target(name: str) -> Target:
    """Instantiate a registered target by name."""
    if name not in KNOWN_TARGETS:
        raise UnknownTarget(f"unknown target '{name}'; known targets: {sorted(KNOWN_TARGETS)}")
    module_name, _, cls_name = KNOWN_TARGETS[name].module.partition(":")
    return getattr(importlib.import_module(module_name), cls_name)()



def exportable_model(inputs: CompileInputs):
    """The float module a float target converts: what the task exports (a classifier as trained; a detector with
    its decode, ending at boxes and scores: edgeship.tasks.compile.detection adds the target's NMS)."""
    from edgeship.tasks.kinds import task_of

    return task_of(inputs.trained).exportable(inputs.trained)


def float_model_for(inputs: CompileInputs):
    """The float model a converter should start from, and which weights it holds.

    The QAT-finetuned float weights when the QAT stage left them (so int8 converters that
    calibrate themselves still get what QAT learned), else the trained fp32 weights.
    """
    import torch

    from edgeship.tasks.train import load_model

    model = load_model(inputs.trained)
    checkpoint = inputs.quantized.qat_float_checkpoint if inputs.quantized else None
    if checkpoint is not None and Path(checkpoint).is_file():
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        return model, "qat-finetuned"
    return model, "trained-fp32"


def plan_float_layers(inputs: CompileInputs) -> list[str]:
    """The layers the precision plan (and QAT) kept float: every int8 target leaves them float too."""
    return list(inputs.quantized.float_layers) if inputs.quantized and inputs.quantized.method == "qat" else []
