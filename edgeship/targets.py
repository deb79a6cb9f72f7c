"""Names of the compile targets and what each needs, without importing any converter.

The implementations live in `edgeship.tasks.compile` (one module per target); this
table lets config validation and the device side know the names cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TargetInfo:
    name: str
    runtime: str  # the runtime that loads the artifact (device agent's name for it)
    precision: str
    module: str  # "package.module:Class" implementing the compile protocol


KNOWN_TARGETS: dict[str, TargetInfo] = {
    "onnx-fp32": TargetInfo("onnx-fp32", "onnxruntime", "fp32", "edgeship.tasks.compile.onnx:OnnxFp32"),
    "onnx-int8": TargetInfo("onnx-int8", "onnxruntime", "int8", "edgeship.tasks.compile.onnx:OnnxInt8"),
}
