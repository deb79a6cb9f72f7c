"""Compile targets: one module per target, one protocol, one table (`edgeship.targets.KNOWN_TARGETS`).

A target turns the trained (and, where it needs it, quantized) model into one
artifact for one runtime. Adding a target means one module here, one row in
`edgeship/targets.py`, and its test.

    >>> target = get_target("onnx-int8")
    >>> artifact = target.compile(CompileInputs(trained=..., quantized=..., data=..., output_dir=...))
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
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

