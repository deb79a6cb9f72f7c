"""Runtime adapters: load a compiled model and run a batch, the same way on host and device.

One adapter per runtime, registered in RUNTIMES by the name that compile targets
declare (`CompiledArtifact.runtime`). Adapters import their runtime lazily, so a
device installs only the runtimes it uses. No torch, TensorFlow, MLflow or Prefect.

    >>> session = open_session("onnxruntime", "model.onnx", threads=1)
    >>> logits = session.run(batch)          # batch: float32 NCHW numpy array
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from edgeship.errors import ModelLoadError
from edgeship.records import TensorSpec


class Session(Protocol):
    """A loaded model, ready to run."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dynamic_batch: bool  # whether the first input accepts any batch size

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch through the model and return the first output."""


def _concrete(shape) -> tuple[int, ...]:
    """Replace symbolic dimensions (batch) with 1."""
    return tuple(d if isinstance(d, int) and d > 0 else 1 for d in shape)


class OnnxRuntimeSession:
    """ONNX Runtime on the CPU execution provider, graph optimisations on."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # ORT raises its own Fail/InvalidGraph/... types
            raise ModelLoadError(f"ONNX Runtime cannot load {Path(path).name}: {error}") from None
        self._input_name = self._session.get_inputs()[0].name
        self.dynamic_batch = not isinstance(self._session.get_inputs()[0].shape[0], int)
        self.inputs = [TensorSpec(name=i.name, shape=_concrete(i.shape), dtype=_ort_dtype(i.type))
                       for i in self._session.get_inputs()]
        self.outputs = [TensorSpec(name=o.name, shape=_concrete(o.shape), dtype=_ort_dtype(o.type))
                        for o in self._session.get_outputs()]

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input_name: batch})[0]


def _ort_dtype(type_name: str) -> str:
    """'tensor(float)' -> 'float32', 'tensor(int64)' -> 'int64'."""
    name = type_name.removeprefix("tensor(").removesuffix(")")
    return {"float": "float32", "double": "float64", "float16": "float16"}.get(name, name)


RUNTIMES: dict[str, tuple[str, Callable[..., Session]]] = {
    # runtime name -> (distribution that provides it, adapter)
    "onnxruntime": ("onnxruntime", OnnxRuntimeSession),
}


def open_session(runtime: str, path: str | Path, threads: int = 0) -> Session:
    """Load a model file with the named runtime; ModelLoadError if it cannot."""
    if runtime not in RUNTIMES:
        raise ModelLoadError(f"unknown runtime '{runtime}'; this build knows {sorted(RUNTIMES)}")
    _, adapter = RUNTIMES[runtime]
    return adapter(path, threads=threads)


def available_runtimes() -> dict[str, str]:
    """Runtimes installed here, with their versions (what a device reports in /info)."""
    found = {}
    for name, (distribution, _) in RUNTIMES.items():
        try:
            found[name] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def predict_classes(session: Session, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Top-1 class of each image, run in batches (or one by one for fixed-batch models)."""
    step = batch_size if session.dynamic_batch else session.inputs[0].shape[0]
    predictions = []
    for start in range(0, len(images), step):
        chunk = images[start:start + step].astype(np.float32, copy=False)
        predictions.append(np.argmax(session.run(chunk), axis=1))
    return np.concatenate(predictions) if predictions else np.zeros(0, dtype=np.int64)
