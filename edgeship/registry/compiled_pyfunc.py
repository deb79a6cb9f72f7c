"""A compiled model as an MLflow pyfunc model: the file, run by edgeship's own runtime adapter.

LiteRT, Core ML and TensorRT have no MLflow flavor, so their compiled files are logged as pyfunc
models whose loader is this module (`loader_module`): the model directory's `data/` holds the file
and its record (artifact.json), and loading opens the file with `edgeship.device.runtimes`, the
adapter the device runs. Batches go in as the pipeline's float32 NCHW arrays and logits come out,
whatever the file's own input type (the adapter converts).

    >>> model = mlflow.pyfunc.load_model("models:/m-...")     # needs edgeship[device] and the runtime
    >>> logits = model.predict(batch)

No MLflow import here: MLflow imports this module, not the other way round.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

RECORD_FILE = "artifact.json"


class CompiledModel:
    """A loaded compiled file: `predict(batch)` runs it on its runtime."""

    def __init__(self, directory: str | Path):
        from edgeship.device.runtimes import open_session
        from edgeship.records import CompiledArtifact

        directory = Path(directory)
        self.record = CompiledArtifact.model_validate(json.loads((directory / RECORD_FILE).read_text()))
        self.session = open_session(self.record.runtime, directory / self.record.path.name)

    def predict(self, model_input, params=None) -> np.ndarray:
        """Logits for a float32 NCHW batch: an array (or anything numpy turns into one), or {input name: array}
        as MLflow passes it when the signature names the input."""
        if isinstance(model_input, dict):
            model_input = model_input[self.record.inputs[0].name] if self.record.inputs[0].name in model_input \
                else next(iter(model_input.values()))
        return np.asarray(self.session.run(np.asarray(model_input, dtype=np.float32)))


def _load_pyfunc(data_path: str) -> CompiledModel:
    """MLflow's entry point (`mlflow.pyfunc.load_model`)."""
    return CompiledModel(data_path)
