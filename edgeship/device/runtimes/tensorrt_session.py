"""The TensorRT adapter: an engine (or an ONNX file built into one here) on the local NVIDIA GPU."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np

from edgeship.device.runtimes.session import concrete_shape
from edgeship.errors import ModelLoadError
from edgeship.records import RuntimeOption, TensorSpec


def nvidia_gpu_present() -> bool:
    """Whether this machine exposes an NVIDIA GPU (desktop/server driver nodes, or a Jetson's integrated GPU).

    Checked by device nodes, without loading CUDA: TensorRT's Python package
    crashes the process on a machine without a GPU (shared/notes/environment.md).
    """
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/nvhost-ctrl-gpu")
                or os.path.exists("/dev/nvgpu/igpu0"))


class TensorRTSession:
    """A TensorRT engine on the local NVIDIA GPU (through Polygraphy's runner, which manages CUDA memory).

    Takes a serialized engine (.engine, .plan), or an ONNX file, which it first builds
    into an engine here with `edgeship.device.tensorrt_build` (timing cache per device).
    """

    name = "tensorrt"

    def __init__(self, path: str | Path, threads: int = 0, precision: str = "auto"):
        if not nvidia_gpu_present():
            raise ModelLoadError("TensorRT needs the tensorrt package and a CUDA GPU; this machine has no NVIDIA "
                                 "GPU: send tensorrt targets to a Jetson or GPU agent")
        try:
            import tensorrt as trt
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        except ImportError as error:
            raise ModelLoadError(f"TensorRT needs the tensorrt and polygraphy packages ({error}); on a Jetson "
                                 f"TensorRT comes with JetPack, elsewhere pip install 'edgeship[tensorrt]'") from None
        path = Path(path)
        self.options: dict[str, RuntimeOption] = {}
        if path.suffix == ".onnx":
            from edgeship.device.tensorrt_build import build_engine
            from edgeship.errors import DeviceJobFailed

            if precision == "auto":  # Q/DQ nodes in the file: explicit int8; otherwise fp16
                precision = "int8" if b"QuantizeLinear" in path.read_bytes() else "fp16"
            engine_path = Path(tempfile.mkdtemp(prefix="edgeship-trt-")) / (path.stem + ".engine")
            weakref.finalize(self, shutil.rmtree, engine_path.parent, True)
            try:
                self.build = build_engine(path, engine_path, precision=precision)
            except DeviceJobFailed as error:
                raise ModelLoadError(str(error)) from None
            path = engine_path
            self.options = {"precision": precision}
        try:
            engine = EngineFromBytes(path.read_bytes())()
            self._runner = TrtRunner(engine)
            self._runner.activate()
        except Exception as error:  # noqa: BLE001  (TensorRT reports a bad engine in many ways)
            raise ModelLoadError(f"TensorRT cannot load {path.name}: {error}") from None
        weakref.finalize(self, self._runner.deactivate)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        specs = {name: TensorSpec(name=name, shape=concrete_shape(list(engine.get_tensor_shape(name))),
                                  dtype=np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name) for name in names}
        self.inputs = [specs[n] for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [specs[n] for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._batch = self.inputs[0].shape[0]
        self.dynamic_batch = False

    def run(self, batch: np.ndarray) -> np.ndarray:
        name, dtype = self.inputs[0].name, np.dtype(self.inputs[0].dtype)
        outputs = [self._runner.infer({name: np.ascontiguousarray(batch[start:start + self._batch], dtype=dtype)})
                   [self.outputs[0].name] for start in range(0, len(batch), self._batch)]
        return np.concatenate([np.asarray(o, dtype=np.float32) for o in outputs])

    def run_all(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        name, dtype = self.inputs[0].name, np.dtype(self.inputs[0].dtype)
        answer = self._runner.infer({name: np.ascontiguousarray(batch, dtype=dtype)})
        return {spec.name: np.asarray(answer[spec.name]) for spec in self.outputs}
