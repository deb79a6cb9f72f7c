"""Runtime adapters: load a compiled model and run a batch, the same way on host and device.

One adapter per runtime, registered in RUNTIMES by the name that compile targets
declare (`CompiledArtifact.runtime`). Adapters import their runtime lazily, so a
device installs only the runtimes it uses. No torch, TensorFlow, MLflow or Prefect.

Every adapter takes the pipeline's batches as they are (float32 NCHW) and returns
float32 logits from `run` (the first output) and every output by name from `run_all` (a detector's boxes,
scores, classes: edgeship.device.detections turns them into detections): an adapter whose model wants something else (int8 input with a
scale and zero point, a zipped .mlpackage) does the conversion itself, so the
host check and the device agent measure the same thing.

| runtime | artifact | where it runs | options (keyword, or environment on an agent) |
| --- | --- | --- | --- |
| onnxruntime | .onnx | anywhere | - |
| litert | .tflite | anywhere ai-edge-litert installs | xnnpack (EDGESHIP_LITERT_XNNPACK=0 turns it off) |
| coreml | .mlpackage.zip | macOS only | compute_units: ALL, CPU_AND_NE, CPU_AND_GPU, CPU_ONLY (EDGESHIP_COREML_COMPUTE_UNITS) |
| tensorrt | .engine/.plan, or .onnx (built here first) | an NVIDIA GPU with TensorRT | precision for an .onnx: auto, fp16, int8 |

RUNTIME_OPTIONS holds that table's options; `check_runtime_options` refuses any other (a
benchmark job's `runtime_options`, params.yaml's `benchmark.runtime_options`), and each
session's `options` says what was in effect (LiteRT: whether XNNPACK really took the graph).

    >>> session = open_session("onnxruntime", "model.onnx", threads=1)
    >>> logits = session.run(batch)          # batch: float32 NCHW numpy array
    >>> open_session("coreml", "model.mlpackage.zip", compute_units="CPU_AND_NE")   # on macOS
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgeship.device.runtimes.coreml_session import COREML_COMPUTE_UNITS, CoreMLSession
from edgeship.device.runtimes.litert_session import LiteRTSession
from edgeship.device.runtimes.onnx_session import OnnxRuntimeSession
from edgeship.device.runtimes.session import Session, concrete_shape
from edgeship.device.runtimes.tensorrt_session import TensorRTSession, nvidia_gpu_present
from edgeship.errors import EdgeshipError, ModelLoadError
from edgeship.records import RuntimeOption

__all__ = [
    "COREML_COMPUTE_UNITS", "RUNTIMES", "RUNTIME_OPTIONS", "CoreMLSession", "LiteRTSession", "OnnxRuntimeSession",
    "RuntimeOptionError", "RuntimeOptionSpec", "Session", "TensorRTSession", "available_runtimes",
    "check_runtime_options", "concrete_shape", "nvidia_gpu_present", "open_session", "predict_classes",
    "unavailable_reason",
]


RUNTIMES: dict[str, tuple[str, Callable[..., Session]]] = {
    # runtime name -> (distribution that provides it, adapter)
    "onnxruntime": ("onnxruntime", OnnxRuntimeSession),
    "litert": ("ai-edge-litert", LiteRTSession),
    "coreml": ("coremltools", CoreMLSession),
    "tensorrt": ("tensorrt", TensorRTSession),
}

# Runtimes that run only on some machines, whatever is installed: the reason when they do not.
_RUNS_ONLY_WHERE: dict[str, tuple[Callable[[], bool], str]] = {
    "coreml": (lambda: sys.platform == "darwin", "Core ML prediction needs macOS"),
    "tensorrt": (nvidia_gpu_present, "TensorRT needs the tensorrt package and a CUDA GPU"),
}


@dataclass(frozen=True)
class RuntimeOptionSpec:
    """One keyword option a runtime adapter takes."""

    kind: type  # bool, int, float or str
    choices: tuple[str, ...] = ()  # allowed values of a str option (matched ignoring case)
    help: str = ""

    def describe(self) -> str:
        return f"{self.kind.__name__}" + (f" one of {list(self.choices)}" if self.choices else "")


# What each adapter's constructor takes besides the path and threads: the one list a job's
# `runtime_options` is checked against, on the agent and in params.yaml.
RUNTIME_OPTIONS: dict[str, dict[str, RuntimeOptionSpec]] = {
    "onnxruntime": {},
    "litert": {"xnnpack": RuntimeOptionSpec(bool, help="the XNNPACK delegate (default on)")},
    "coreml": {"compute_units": RuntimeOptionSpec(str, COREML_COMPUTE_UNITS, "where Core ML may run the model")},
    "tensorrt": {"precision": RuntimeOptionSpec(str, ("auto", "fp16", "int8"),
                                                "for an .onnx built on load: the engine's precision")},
}


class RuntimeOptionError(EdgeshipError, ValueError):
    """A runtime option the runtime's adapter does not take, or a value it does not accept."""


def check_runtime_options(runtime: str, options: dict[str, RuntimeOption]) -> dict[str, RuntimeOption]:
    """`options` as `runtime`'s adapter takes them (a str choice in the adapter's own spelling).

    Raises:
        RuntimeOptionError: an option the adapter does not take (the message names those it does),
            or a value of the wrong type or outside its choices.
    """
    if runtime not in RUNTIME_OPTIONS:
        raise RuntimeOptionError(f"unknown runtime '{runtime}'; this build knows {sorted(RUNTIME_OPTIONS)}")
    allowed = RUNTIME_OPTIONS[runtime]
    accepted = ", ".join(f"{name} ({spec.describe()})" for name, spec in allowed.items()) or "none"
    checked: dict[str, RuntimeOption] = {}
    for name, value in options.items():
        spec = allowed.get(name)
        if spec is None:
            raise RuntimeOptionError(f"runtime '{runtime}' takes no option '{name}'; it takes: {accepted}")
        if not _fits(spec.kind, value):
            raise RuntimeOptionError(f"runtime option {runtime}.{name} wants a {spec.kind.__name__}, got "
                                     f"{value!r} ({type(value).__name__})")
        if spec.choices:
            value = next((choice for choice in spec.choices if choice.lower() == value.lower()), None)
            if value is None:
                raise RuntimeOptionError(f"runtime option {runtime}.{name} must be one of {list(spec.choices)}, "
                                         f"got {options[name]!r}")
        checked[name] = value
    return checked


def _fits(kind: type, value: object) -> bool:
    """Whether `value` is a `kind`; bool is an int to Python, but an int option takes no True, a bool one no 1."""
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return type(value) is kind


def open_session(runtime: str, path: str | Path, threads: int = 0, **options: RuntimeOption) -> Session:
    """Load a model file with the named runtime; ModelLoadError if it cannot.

    `options` go to the adapter (litert: xnnpack; coreml: compute_units; tensorrt: precision),
    checked first against RUNTIME_OPTIONS (RuntimeOptionError names the ones it takes).
    """
    if runtime not in RUNTIMES:
        raise ModelLoadError(f"unknown runtime '{runtime}'; this build knows {sorted(RUNTIMES)}")
    _, adapter = RUNTIMES[runtime]
    return adapter(path, threads=threads, **check_runtime_options(runtime, options))


def available_runtimes() -> dict[str, str]:
    """Runtimes that can run models here, with their versions (what a device reports in /info).

    Core ML counts only on macOS and TensorRT only beside an NVIDIA GPU, even where
    their Python packages are installed (coremltools converts on Linux too).
    """
    found = {}
    for name, (distribution, _) in RUNTIMES.items():
        if name in _RUNS_ONLY_WHERE and not _RUNS_ONLY_WHERE[name][0]():
            continue
        version = _installed_version(distribution)
        if version is not None:
            found[name] = version
    return found


def unavailable_reason(runtime: str) -> str | None:
    """Why `runtime` cannot run models here (None when it can): what a "not measured" result says."""
    if runtime not in RUNTIMES:
        return f"unknown runtime '{runtime}'"
    if runtime in _RUNS_ONLY_WHERE and not _RUNS_ONLY_WHERE[runtime][0]():
        return _RUNS_ONLY_WHERE[runtime][1]
    distribution = RUNTIMES[runtime][0]
    if _installed_version(distribution) is None:
        return f"the {runtime} runtime is not installed here (Python package '{distribution}')"
    return None


def _installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, or of a module installed outside pip (JetPack's tensorrt)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        pass
    module = distribution.replace("-", "_")
    if distribution == "tensorrt" and (spec := importlib.util.find_spec(module)) is not None:
        # JetPack's module: read its __version__ without importing it (importing loads CUDA).
        try:
            found = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", Path(spec.origin).read_text(), re.M)
        except (OSError, TypeError):
            found = None
        return found.group(1) if found else "unknown (installed outside pip)"
    return None


def predict_classes(session: Session, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Top-1 class of each image, run in batches (or one by one for fixed-batch models)."""
    step = batch_size if session.dynamic_batch else session.inputs[0].shape[0]
    predictions = []
    for start in range(0, len(images), step):
        chunk = images[start:start + step].astype(np.float32, copy=False)
        predictions.append(np.argmax(session.run(chunk), axis=1))
    return np.concatenate(predictions) if predictions else np.zeros(0, dtype=np.int64)
