"""Build a TensorRT engine from an ONNX file, on the NVIDIA device that will run it.

Engines are tied to the GPU and the TensorRT version, so the pipeline ships a checked
ONNX file (edgeship.tasks.compile.tensorrt) and the device builds the engine:
1. parse the ONNX with TensorRT's parser (static shapes; QDQ nodes mean explicit int8),
2. set builder flags for the precision (fp16: FP16; int8: INT8 and FP16, so layers
   without Q/DQ fall back to fp16), a workspace limit, and this device's timing cache,
3. build and serialize the engine, save the timing cache back (later builds reuse its
   kernel timings), and answer the engine's sha256, size, TensorRT version, device name,
   build time and the builder's log.

    >>> build = build_engine(Path("model_int8.onnx"), Path("model_int8.engine"), precision="int8")
    >>> build["sha256"], build["tensorrt_version"], build["log"][-3:]

Or from a shell (what an agent's build job runs in a child process):

    $ python -m edgeship.device.tensorrt_build model.onnx model.engine --precision int8

No torch, TensorFlow, MLflow or Prefect here: this runs on the device.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from edgeship.errors import DeviceJobFailed

PRECISIONS = ("fp16", "int8", "fp32")
_LOG_LINES = 400  # the builder's log lines kept in the answer (the last ones)


def build_engine(onnx_path: str | Path, engine_path: str | Path, precision: str = "fp16",
                 timing_cache: str | Path | None = None, workspace_mb: int = 1024) -> dict:
    """Build and save a serialized engine for `onnx_path`; return what was built and the builder's log.

    Raises:
        DeviceJobFailed: TensorRT is missing, the parser rejects the ONNX, or the builder fails
            (the message carries TensorRT's own errors).
    """
    if precision not in PRECISIONS:
        raise DeviceJobFailed(f"unknown TensorRT precision '{precision}'; use one of {list(PRECISIONS)}")
    try:
        import tensorrt as trt
    except ImportError:
        raise DeviceJobFailed("TensorRT is not installed on this device (the tensorrt Python package; JetPack "
                              "provides it on a Jetson)") from None
    log: list[str] = []
    logger = _logger(trt, log)
    started = time.perf_counter()
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise DeviceJobFailed(f"TensorRT {trt.__version__} cannot parse {Path(onnx_path).name}: " + "; ".join(errors))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: scales come from the Q/DQ nodes
    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(trt.__version__)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DeviceJobFailed(f"TensorRT {trt.__version__} could not build an engine for {Path(onnx_path).name}: "
                              + " | ".join(line for line in log if line.startswith(("[E]", "[F]")))[-4000:])
    engine = bytes(serialized)
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(engine)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {
        "engine_path": str(engine_path),
        "sha256": hashlib.sha256(engine).hexdigest(),
        "bytes": len(engine),
        "precision": precision,
        "tensorrt_version": trt.__version__,
        "device": gpu_name(),
        "build_s": round(time.perf_counter() - started, 2),
        "timing_cache": str(cache_path),
        "log": log[-_LOG_LINES:],
    }


def default_timing_cache(tensorrt_version: str) -> Path:
    """This device's timing cache: one file per GPU and TensorRT version, under $EDGESHIP_TRT_CACHE_DIR."""
    root = Path(os.environ.get("EDGESHIP_TRT_CACHE_DIR", Path.home() / ".cache" / "edgeship" / "tensorrt"))
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{gpu_name()}-trt{tensorrt_version}").strip("-")
    return root / f"{slug}.timing-cache"


def gpu_name() -> str:
    """The GPU's name (nvidia-smi), or the Jetson's model (device tree), or 'unknown-gpu'."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip().splitlines()
        if names:
            return names[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return Path("/proc/device-tree/model").read_text().strip("\x00\n ")
    except OSError:
        return "unknown-gpu"


def _network_flags(trt) -> int:
    # TensorRT 8 needs EXPLICIT_BATCH for ONNX; in 10 it is the only mode and the flag is deprecated.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    return 0 if flag is None or int(trt.__version__.split(".")[0]) >= 10 else 1 << int(flag)


def _logger(trt, sink: list[str]):
    """A TensorRT logger that keeps every message (as '[W] text') for the build log."""
    marks = {trt.ILogger.Severity.INTERNAL_ERROR: "F", trt.ILogger.Severity.ERROR: "E",
             trt.ILogger.Severity.WARNING: "W", trt.ILogger.Severity.INFO: "I", trt.ILogger.Severity.VERBOSE: "V"}

    class _Capturing(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, message):
            sink.append(f"[{marks.get(severity, '?')}] {message}")

    return _Capturing()


def main(argv: list[str] | None = None) -> int:
    """CLI: build an engine and print the build record as JSON (exit 1 with {"error": ...} when it fails)."""
    parser = argparse.ArgumentParser(prog="python -m edgeship.device.tensorrt_build", description=__doc__.split("\n")[0])
    parser.add_argument("onnx", type=Path)
    parser.add_argument("engine", type=Path)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16")
    parser.add_argument("--timing-cache", type=Path, default=None)
    parser.add_argument("--workspace-mb", type=int, default=1024)
    args = parser.parse_args(argv)
    try:
        answer, status = build_engine(args.onnx, args.engine, args.precision, args.timing_cache, args.workspace_mb), 0
    except DeviceJobFailed as error:
        answer, status = {"error": str(error)}, 1
    print(json.dumps(answer))
    return status


if __name__ == "__main__":
    sys.exit(main())
