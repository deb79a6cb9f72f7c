"""Build a TensorRT engine from an ONNX file, on the NVIDIA device that will run it.

Engines are tied to the GPU and the TensorRT version, so the pipeline ships a checked
ONNX file (edgeship.tasks.compile.tensorrt) and the device builds the engine:
1. parse the ONNX with TensorRT's parser (static shapes; QDQ nodes mean explicit int8),
2. set builder flags for the precision (fp16: FP16; int8: INT8 and FP16, so layers
   without Q/DQ fall back to fp16), a workspace limit, the optimization level, sparse
   weights when asked, and this device's timing cache,
3. build and serialize the engine, save the timing cache back (later builds reuse its
   kernel timings), and answer the engine's sha256, size, TensorRT version, device name,
   build time and the builder's log.

    >>> build = build_engine(Path("model_int8.onnx"), Path("model_int8.engine"), precision="int8")
    >>> build["sha256"], build["tensorrt_version"], build["log"][-3:]

Or from a shell:

    $ python -m edgeship.device.tensorrt_build model.onnx model.engine --precision int8

An agent's `POST /jobs/tensorrt-build` runs `build_engine` in a job's child process (a crashing
builder ends only that process) and keeps what it built in its `EngineCache`, keyed by the ONNX's
sha256, the build options, the TensorRT version and the GPU, for later jobs to name by the engine's sha256.

No torch, TensorFlow, MLflow or Prefect here: this runs on the device.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from edgeship.errors import DeviceJobFailed

PRECISIONS = ("fp16", "int8", "fp32")
_LOG_LINES = 400  # the builder's log lines kept in the answer (the last ones)


def build_engine(onnx_path: str | Path, engine_path: str | Path, precision: str = "fp16",
                 timing_cache: str | Path | None = None, workspace_mb: int = 1024, *,
                 optimization_level: int | None = None, sparse_weights: bool = False,
                 use_timing_cache: bool = True) -> dict:
    """Build and save a serialized engine for `onnx_path`; return what was built and the builder's log.

    `optimization_level` (0-5, TensorRT 8.6 and later) trades build time for engine speed; None keeps
    TensorRT's default. `use_timing_cache=False` builds without reading or writing the timing cache.

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
    if sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if optimization_level is not None:
        if not hasattr(config, "builder_optimization_level"):
            raise DeviceJobFailed(f"TensorRT {trt.__version__} has no builder optimization level (8.6 and later "
                                  "do); leave optimization_level unset for this device")
        config.builder_optimization_level = optimization_level
    cache_path = (Path(timing_cache) if timing_cache else default_timing_cache(trt.__version__)) \
        if use_timing_cache else None
    if cache_path is not None:
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
    if cache_path is not None:
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
        "timing_cache": str(cache_path) if cache_path is not None else None,
        "log": log[-_LOG_LINES:],
    }


def cache_root() -> Path:
    """Where this device keeps TensorRT timing caches and built engines: $EDGESHIP_TRT_CACHE_DIR."""
    return Path(os.environ.get("EDGESHIP_TRT_CACHE_DIR", Path.home() / ".cache" / "edgeship" / "tensorrt"))


def default_timing_cache(tensorrt_version: str) -> Path:
    """This device's timing cache: one file per GPU and TensorRT version, under $EDGESHIP_TRT_CACHE_DIR."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{gpu_name()}-trt{tensorrt_version}").strip("-")
    return cache_root() / f"{slug}.timing-cache"


@functools.lru_cache(maxsize=1)
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


class EngineCache:
    """Engines this device built, so a benchmark job can name one by sha256 and the pipeline can fetch it.

    One directory (mode 0700): `<engine sha256>.engine` with its build record `<engine sha256>.json`,
    and `<key>.key` naming the engine built for a key (`engine_key`: the ONNX's sha256, the build
    options, the TensorRT version and the GPU, since an engine is tied to all of them). Past
    `max_bytes`, the engines used least recently go first. Thread-safe.
    """

    def __init__(self, root: str | Path, max_bytes: int = 4 << 30):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def find(self, key: str) -> dict | None:
        """The build record of the engine built for `key`, if it is still here."""
        try:
            engine_sha256 = (self.root / f"{key}.key").read_text().strip()
        except OSError:
            return None
        found = self.get(engine_sha256)
        return found[1] if found else None

    def get(self, engine_sha256: str) -> tuple[Path, dict] | None:
        """The engine file and its build record; None when absent (never built here, or evicted)."""
        if not re.fullmatch(r"[0-9a-f]{64}", engine_sha256):
            return None
        engine, record = self.root / f"{engine_sha256}.engine", self.root / f"{engine_sha256}.json"
        with self._lock:
            try:
                build = json.loads(record.read_text())
                os.utime(engine)  # used now: the last to be evicted
            except (OSError, ValueError):
                return None
        return engine, build

    def put(self, key: str, engine_file: str | Path, build: dict) -> Path:
        """Move a built engine in under its sha256 (`build["engine_sha256"]`), remember it for `key`; its path."""
        engine_sha256 = build["engine_sha256"]
        with self._lock:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            engine = self.root / f"{engine_sha256}.engine"
            shutil.move(str(engine_file), engine)
            _write_text(self.root / f"{engine_sha256}.json", json.dumps(build))
            _write_text(self.root / f"{key}.key", engine_sha256)
            self._evict(keep=engine)
        return engine

    def remove(self, engine_sha256: str) -> None:
        """Forget an engine (its key files go at the next `put`)."""
        with self._lock:
            (self.root / f"{engine_sha256}.engine").unlink(missing_ok=True)
            (self.root / f"{engine_sha256}.json").unlink(missing_ok=True)

    def _evict(self, keep: Path) -> None:
        engines = sorted(self.root.glob("*.engine"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in engines)
        for engine in engines:
            if total <= self.max_bytes:
                break
            if engine == keep:
                continue
            total -= engine.stat().st_size
            engine.unlink(missing_ok=True)
            engine.with_suffix(".json").unlink(missing_ok=True)
        for key_file in self.root.glob("*.key"):  # keys of evicted engines
            with open(key_file) as handle:
                if not (self.root / f"{handle.read().strip()}.engine").exists():
                    key_file.unlink(missing_ok=True)


def engine_key(onnx_sha256: str, options: dict, tensorrt_version: str, gpu: str) -> str:
    """What an engine is tied to, as one hex digest: the ONNX, the build options, TensorRT and the GPU."""
    identity = {"onnx": onnx_sha256, "options": options, "tensorrt": tensorrt_version, "gpu": gpu}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _write_text(path: Path, text: str) -> None:
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(text)
    os.replace(scratch, path)


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
    parser.add_argument("--optimization-level", type=int, choices=range(6), default=None)
    parser.add_argument("--sparse-weights", action="store_true")
    parser.add_argument("--no-timing-cache", action="store_true")
    args = parser.parse_args(argv)
    try:
        answer, status = build_engine(args.onnx, args.engine, args.precision, args.timing_cache, args.workspace_mb,
                                      optimization_level=args.optimization_level,
                                      sparse_weights=args.sparse_weights, use_timing_cache=not args.no_timing_cache), 0
    except DeviceJobFailed as error:
        answer, status = {"error": str(error)}, 1
    print(json.dumps(answer))
    return status


if __name__ == "__main__":
    sys.exit(main())
