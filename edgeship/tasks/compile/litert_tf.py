"""The second LiteRT route: ONNX -> TensorFlow (onnx2tf) -> `tf.lite.TFLiteConverter`, in its own environment.

Used for a LiteRT target whose `compile.<target>.route` is `tf`, or (route `auto`) when litert-torch fails
and the environment exists. The model is the same float model the other targets start from (the QAT-
finetuned weights when the QAT stage left them), exported to ONNX; int8 is TensorFlow's full-integer
post-training quantization with a representative dataset from the calibration split and int8 or uint8
input/output (`compile.tflite-int8.io`; uint8 is what the Coral Edge TPU compiler takes). It does not
follow the precision plan's float layers (TFLiteConverter has no per-layer opt-out outside its debugger);
litert-torch's route does.

onnx2tf 1.29 pins tensorflow 2.19, onnx 1.19, onnxruntime 1.23 and numpy 1.26 exactly, all older than the
pipeline's, so it lives in `.venv/tf-converter` (requirements/tf-converter.txt; about 2.6 GB, 6.5 minutes to
install on the 2-core CI machine, so infra/install.sh builds it only with EDGESHIP_TF_CONVERTER=1).

    >>> artifact = compile_with_tf(TfliteInt8(), CompileInputs(..., options={"route": "tf", "io": "uint8"}), path)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from edgeship.errors import CompileError
from edgeship.records import CompiledArtifact
from edgeship.tasks.compile import CompileInputs, float_model_for

TF_ENV = ".venv/tf-converter"
TF_REQUIREMENTS = "requirements/tf-converter.txt"
_WORKER = Path(__file__).with_name("tf_convert.py")


def tf_converter_python() -> Path:
    """The Python of TensorFlow's converter environment: $EDGESHIP_TF_PYTHON, else `.venv/tf-converter` in the
    working directory or beside the edgeship checkout.

    Raises:
        CompileError: none exists, with the command that creates one.
    """
    from edgeship.tasks.compile.litert import environment_python

    found = environment_python("EDGESHIP_TF_PYTHON", TF_ENV, "tensorflow and onnx2tf")
    if found:
        return found
    raise CompileError(f"TensorFlow's converter (onnx2tf + tensorflow) is not installed: its pins conflict with the "
                       f"pipeline's, so it has its own environment. Create it with `EDGESHIP_TF_CONVERTER=1 bash "
                       f"infra/install.sh`, or `python3 -m venv {TF_ENV} && {TF_ENV}/bin/pip install -r "
                       f"{TF_REQUIREMENTS}`, or set EDGESHIP_TF_PYTHON")


def available() -> bool:
    try:
        tf_converter_python()
    except CompileError:
        return False
    return True


def compile_with_tf(target, inputs: CompileInputs, path: Path, fallback_from: str | None = None) -> CompiledArtifact:
    """Convert by TensorFlow's route to `path` and describe the artifact (as litert.describe does)."""
    from edgeship.tasks.compile.litert import calibration_file, describe, run_converter
    from edgeship.tasks.compile.onnx import export_onnx
    from edgeship.tasks.compile.tensorrt import make_static

    python = tf_converter_python()
    model, weights = float_model_for(inputs)
    with tempfile.TemporaryDirectory(prefix="edgeship-tf-") as tmp:
        onnx_path = export_onnx(model, inputs.trained.input_shape, Path(tmp) / "model.onnx")
        make_static(onnx_path, inputs.trained.input_shape, inputs.trained.num_classes)  # onnx2tf mislays a dynamic batch
        job = {"onnx": str(onnx_path), "output": str(path), "precision": target.precision, "workdir": tmp}
        if target.precision == "int8":
            job["calibration"] = str(calibration_file(inputs, Path(tmp) / "calibration.npy"))
            job["io"] = inputs.options.get("io") or "int8"
        answer = run_converter(job, Path(tmp) / "job.json", python=python, worker=_WORKER,
                               what="TensorFlow's converter (onnx2tf + TFLiteConverter)")
    notes = {**answer.get("notes", {}), "weights": weights}
    if fallback_from:
        notes["fallback_from"] = fallback_from[:1000]  # why litert-torch was not used
    return describe(target, path, answer.get("versions", {}), notes)
