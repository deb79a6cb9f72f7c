"""Names of the compile targets and what each needs, without importing any converter.

The implementations live in `edgeship.tasks.compile` (one module per target family);
this table lets config validation and the device side know the names cheaply.
`hardware` says what a device needs to run the artifact: "cpu" runs on any agent
(and on the host), "apple" only where Core ML runs (a macOS agent), "nvidia" only
where TensorRT and a CUDA GPU are (a Jetson or GPU agent). Where that hardware is
absent the target is compiled and checked as far as the machine allows and reported
as not measured, never as a pass.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TargetInfo:
    name: str
    runtime: str  # the runtime that loads the artifact (device agent's name for it)
    precision: str
    module: str  # "package.module:Class" implementing the compile protocol
    hardware: str = "cpu"  # cpu, apple, nvidia: what a device needs to run it


_COMPILE = "edgeship.tasks.compile"

KNOWN_TARGETS: dict[str, TargetInfo] = {
    "onnx-fp32": TargetInfo("onnx-fp32", "onnxruntime", "fp32", f"{_COMPILE}.onnx:OnnxFp32"),
    "onnx-int8": TargetInfo("onnx-int8", "onnxruntime", "int8", f"{_COMPILE}.onnx:OnnxInt8"),
    "tflite-fp32": TargetInfo("tflite-fp32", "litert", "fp32", f"{_COMPILE}.litert:TfliteFp32"),
    "tflite-fp16": TargetInfo("tflite-fp16", "litert", "fp16", f"{_COMPILE}.litert:TfliteFp16"),
    "tflite-int8": TargetInfo("tflite-int8", "litert", "int8", f"{_COMPILE}.litert:TfliteInt8"),
    "coreml-fp16": TargetInfo("coreml-fp16", "coreml", "fp16", f"{_COMPILE}.coreml:CoremlFp16", "apple"),
    "coreml-w8a8": TargetInfo("coreml-w8a8", "coreml", "int8", f"{_COMPILE}.coreml:CoremlW8A8", "apple"),
    "tensorrt-fp16": TargetInfo("tensorrt-fp16", "tensorrt", "fp16", f"{_COMPILE}.tensorrt:TensorrtFp16", "nvidia"),
    "tensorrt-int8": TargetInfo("tensorrt-int8", "tensorrt", "int8", f"{_COMPILE}.tensorrt:TensorrtInt8", "nvidia"),
}

# The targets a detection release builds today: float ones, each with its post-processing (decode + NMS) chosen
# per runtime (README, "Detection on each target"). int8 detection comes with the PT2E quantization path.
DETECTION_TARGETS = frozenset(name for name, info in KNOWN_TARGETS.items() if info.precision in ("fp32", "fp16"))
