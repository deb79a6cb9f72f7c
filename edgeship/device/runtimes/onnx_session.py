"""The ONNX Runtime adapter (CPU execution provider)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeship.device.runtimes.session import concrete_shape
from edgeship.errors import ModelLoadError
from edgeship.records import RuntimeOption, TensorSpec


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
        self.options: dict[str, RuntimeOption] = {}
        self.dynamic_batch = not isinstance(self._session.get_inputs()[0].shape[0], int)
        self.inputs = [TensorSpec(name=i.name, shape=concrete_shape(i.shape), dtype=_ort_dtype(i.type))
                       for i in self._session.get_inputs()]
        self.outputs = [TensorSpec(name=o.name, shape=concrete_shape(o.shape), dtype=_ort_dtype(o.type))
                        for o in self._session.get_outputs()]

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input_name: batch})[0]

    def run_all(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        values = self._session.run(None, {self._input_name: batch})
        return {spec.name: value for spec, value in zip(self.outputs, values)}


def _ort_dtype(type_name: str) -> str:
    """'tensor(float)' -> 'float32', 'tensor(int64)' -> 'int64'."""
    name = type_name.removeprefix("tensor(").removesuffix(")")
    return {"float": "float32", "double": "float64", "float16": "float16"}.get(name, name)
