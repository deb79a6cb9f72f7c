"""The Core ML adapter: macOS only; takes a zipped or plain .mlpackage."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import weakref
import zipfile
from pathlib import Path

import numpy as np

from edgeship.errors import ModelLoadError
from edgeship.records import RuntimeOption, TensorSpec


COREML_COMPUTE_UNITS = ("ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY")


class CoreMLSession:
    """Core ML on macOS: unzips a .mlpackage.zip (or takes an .mlpackage) and loads it with MLModel.

    `compute_units` picks where Core ML may run the model (ALL, CPU_AND_NE,
    CPU_AND_GPU, CPU_ONLY); on an agent, EDGESHIP_COREML_COMPUTE_UNITS sets it.
    Core ML chooses its own threads, so `threads` is ignored.
    """

    name = "coreml"

    def __init__(self, path: str | Path, threads: int = 0, compute_units: str | None = None):
        if sys.platform != "darwin":
            raise ModelLoadError("Core ML prediction needs macOS: send coreml targets to a macOS agent "
                                 "(on Linux they are converted and their spec checked, not run)")
        try:
            import coremltools as ct
        except ImportError:
            raise ModelLoadError("coremltools is not installed here; pip install 'edgeship[coreml]'") from None
        units = (compute_units or os.environ.get("EDGESHIP_COREML_COMPUTE_UNITS") or "ALL").upper()
        if units not in COREML_COMPUTE_UNITS:
            raise ModelLoadError(f"unknown Core ML compute units '{units}'; use one of {list(COREML_COMPUTE_UNITS)}")
        package = _unpacked_mlpackage(Path(path), self)
        try:
            self._model = ct.models.MLModel(str(package), compute_units=ct.ComputeUnit[units])
        except Exception as error:  # noqa: BLE001  (Core ML raises RuntimeError, Exception from its proxy)
            raise ModelLoadError(f"Core ML cannot load {Path(path).name}: {error}") from None
        self.compute_units = units
        self.options: dict[str, RuntimeOption] = {"compute_units": units}
        description = self._model.get_spec().description
        self.inputs = [_coreml_spec(feature) for feature in description.input]
        self.outputs = [_coreml_spec(feature) for feature in description.output]
        self._input_name, self._output_name = self.inputs[0].name, self.outputs[0].name
        self._batch = self.inputs[0].shape[0] if self.inputs[0].shape else 1
        self.dynamic_batch = False

    def run(self, batch: np.ndarray) -> np.ndarray:
        outputs = [self._model.predict({self._input_name: batch[start:start + self._batch]})[self._output_name]
                   for start in range(0, len(batch), self._batch)]
        return np.concatenate([np.asarray(o, dtype=np.float32) for o in outputs])

    def run_all(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        answer = self._model.predict({self._input_name: batch})
        return {name: np.asarray(value, dtype=np.float32) for name, value in answer.items()}


def _unpacked_mlpackage(path: Path, owner: object) -> Path:
    """An .mlpackage directory for `path`: itself, or a zip's contents in a temporary directory kept while `owner` lives."""
    if path.is_dir():
        return path
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path.name} is neither an .mlpackage directory nor a zipped one")
    target = Path(tempfile.mkdtemp(prefix="edgeship-coreml-"))
    weakref.finalize(owner, shutil.rmtree, target, True)
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if member.startswith("/") or ".." in Path(member).parts:
                raise ModelLoadError(f"{path.name} holds an unsafe path '{member}'; refusing to unpack it")
        archive.extractall(target)
    packages = sorted(target.glob("*.mlpackage"))
    if len(packages) != 1:
        raise ModelLoadError(f"{path.name} must hold exactly one .mlpackage at its top level, found {len(packages)}")
    return packages[0]


def _coreml_spec(feature) -> TensorSpec:
    array = feature.type.multiArrayType
    dtypes = {65568: "float32", 65552: "float16", 131104: "int32", 65600: "float64"}  # ArrayDataType values
    return TensorSpec(name=feature.name, shape=tuple(int(d) for d in array.shape) or (1,),
                      dtype=dtypes.get(array.dataType, "float32"))
