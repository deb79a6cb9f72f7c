"""LiteRT (TFLite) targets: `tflite-int8`, `tflite-fp16`, and `tflite-fp32` as the float reference.

Route: litert-torch 0.10 (torch.export -> StableHLO -> LiteRT flatbuffer), chosen by
measurement over ONNX -> onnx2tf -> TensorFlow's TFLiteConverter, which breaks
onnx2tf's exact pins and downloads sample data from the network. int8 is PT2E static
quantization with litert-torch's own quantizer (symmetric, per-channel weights, int8
activations), calibrated on the calibration split; fp16 stores float16 weights.

litert-torch cannot live in the pipeline's environment (its converter pins
xdsl==0.28.0, which caps typing-extensions below 4.13; pydantic 2.14 needs 4.16), so
the conversion runs in a child process with the converter's own Python, found by
`converter_python()`. The pipeline hands it a `torch.export` program (same torch
version on both sides) and, for int8, the calibration images; `litert_convert.py`
does the rest. The artifact is then loaded here with the LiteRT interpreter
(ai-edge-litert, which does install beside the pipeline) to describe its tensors.

Weights: the QAT stage's fine-tuned float weights when the QuantizedModel carries them
(`qat_float_checkpoint`, a state dict for the model factory), else the trained fp32
weights; `artifact.notes["weights"]` says which. I/O stays float32 NCHW for float
models; int8 models take int8 input, which the runtime adapter quantizes.

    >>> artifact = TfliteInt8().compile(CompileInputs(trained=trained, data=data, output_dir=Path("build")))
    >>> artifact.notes["weights"], artifact.converter["litert-torch"]
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from edgeship.errors import CompileError
from edgeship.files import sha256_of
from edgeship.records import CompiledArtifact, TensorSpec
from edgeship.tasks.compile import CompileInputs
from edgeship.tasks.compile.tracing import TORCH_CAPTURE
from edgeship.tasks.compile import float_model_for, plan_float_layers

CONVERTER_ENV = ".venv/litert-converter"  # the converter's own environment, inside the (git-ignored) .venv
CONVERTER_REQUIREMENTS = "requirements/litert-converter.txt"
CONVERT_TIMEOUT_S = 1800
_WORKER = Path(__file__).with_name("litert_convert.py")


def converter_python() -> Path:
    """The Python that runs litert-torch.

    In order: $EDGESHIP_LITERT_PYTHON; this interpreter, when litert_torch imports here;
    `.venv/litert-converter/bin/python` in the working directory or beside the edgeship checkout.

    Raises:
        CompileError: none of them exists, with the command that creates one.
    """
    if "EDGESHIP_LITERT_PYTHON" not in os.environ and importlib.util.find_spec("litert_torch") is not None:
        return Path(sys.executable)
    found = environment_python("EDGESHIP_LITERT_PYTHON", CONVERTER_ENV, "litert-torch")
    if found:
        return found
    raise CompileError(
        f"the LiteRT converter (litert-torch) is not installed: it needs its own environment because its pins "
        f"conflict with the pipeline's. Create it with `python3 -m venv {CONVERTER_ENV} && {CONVERTER_ENV}/bin/pip "
        f"install -r {CONVERTER_REQUIREMENTS}` in the project root, or set EDGESHIP_LITERT_PYTHON")


def environment_python(variable: str, env_dir: str, holds: str) -> Path | None:
    """A converter environment's Python: $`variable`, else `env_dir`/bin/python in the working directory or beside
    the edgeship checkout; None when neither exists.

    Raises:
        CompileError: $`variable` names a file that does not exist.
    """
    configured = os.environ.get(variable)
    if configured:
        if not Path(configured).is_file():
            raise CompileError(f"{variable}={configured} does not exist; point it at the Python of an environment "
                               f"with {holds}, or unset it")
        return Path(configured)
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        candidate = root / env_dir / "bin" / "python"
        if candidate.is_file():
            return candidate
    return None


class _Tflite:
    """A LiteRT target of one precision; subclasses name it."""

    name: str
    precision: str
    runtime = "litert"
    needs_quantized = False  # int8 uses the QAT weights when given, the trained weights otherwise

    def compile(self, inputs: CompileInputs) -> CompiledArtifact:
        """Convert the model to `output_dir/model_<precision>.tflite` by the target's route and describe it.

        Route (`compile.<target>.route`): litert-torch; tf (ONNX -> onnx2tf -> TFLiteConverter, `compile_with_tf`);
        auto (default): litert-torch, and TensorFlow's converter when litert-torch fails and its environment exists.
        """
        output_dir = Path(inputs.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / f"model_{self.precision}.tflite"
        route = inputs.options.get("route", "auto")
        if route == "tf":
            return compile_with_tf(self, inputs, path)
        try:
            return self._litert_torch(inputs, path)
        except CompileError as error:
            if route == "auto" and tf_available():
                return compile_with_tf(self, inputs, path, fallback_from=str(error))
            raise

    def _litert_torch(self, inputs: CompileInputs, path: Path) -> CompiledArtifact:
        with tempfile.TemporaryDirectory(prefix="edgeship-litert-") as tmp:
            weights = export_program(inputs, Path(tmp) / "model.pt2")
            job = {"program": str(Path(tmp) / "model.pt2"), "output": str(path), "precision": self.precision}
            if self.precision == "int8":
                job["calibration"] = str(calibration_file(inputs, Path(tmp) / "calibration.npy"))
                job["float_layers"] = plan_float_layers(inputs)  # the precision plan's, as onnx-int8 has them
            answer = run_converter(job, Path(tmp) / "job.json")
        notes = {**answer.get("notes", {}), "weights": weights, "layout": "NCHW"}
        artifact = describe(self, path, answer.get("versions", {}), notes)
        if inputs.trained.detection is not None:  # NMS on the device in numpy: say which outputs it reads
            from edgeship.tasks.compile.detection import litert_postprocess

            artifact = artifact.model_copy(update={"postprocess": litert_postprocess(artifact, inputs)})
        return artifact


class TfliteFp32(_Tflite):
    """The float model as LiteRT, the reference the quantized LiteRT targets are read against."""

    name = "tflite-fp32"
    precision = "fp32"


class TfliteFp16(_Tflite):
    """float16 weights (half the size); XNNPACK computes in fp32 on CPUs without fp16 arithmetic."""

    name = "tflite-fp16"
    precision = "fp16"


class TfliteInt8(_Tflite):
    """Full-integer int8 (PT2E static quantization calibrated on the calibration split)."""

    name = "tflite-int8"
    precision = "int8"


def export_program(inputs: CompileInputs, path: Path) -> str:
    """Save the model as a batch-1 `torch.export` program for the converter; return which weights it holds."""
    import torch

    model, weights = float_model_for(inputs)
    if inputs.trained.detection is not None:  # a detector converts with its decode (NMS follows on the device)
        from edgeship.tasks.detection.decode import DecodedDetector

        model = DecodedDetector(model, inputs.trained.detection)
    try:
        with TORCH_CAPTURE:
            program = torch.export.export(model.eval(), (torch.zeros(1, *inputs.trained.input_shape),))
            torch.export.save(program, str(path))
    except Exception as error:  # noqa: BLE001  (export raises many types; its message is the news)
        raise CompileError(f"torch.export failed for '{inputs.trained.factory}', so litert-torch cannot convert "
                           f"it: {type(error).__name__}: {error}") from error
    return weights


def calibration_file(inputs: CompileInputs, path: Path) -> Path:
    import numpy as np

    from edgeship.tasks.data import load_split

    images, _ = load_split(inputs.data, "calibration")
    if len(images) == 0:
        raise CompileError("the calibration split is empty; tflite-int8 needs calibration images "
                           "(data.calibration_size in params.yaml)")
    np.save(path, images.astype(np.float32, copy=False))
    return path


def run_converter(job: dict, job_path: Path, python: Path | None = None, worker: Path = _WORKER,
                  what: str = "litert-torch") -> dict:
    """Run a converter worker (`litert_convert.py` by default) on one job with its environment's Python; its
    answer, or CompileError with the converter's words."""
    job_path.write_text(json.dumps(job))
    python = python or converter_python()
    # -I: the worker's own directory (which holds onnx.py, tensorrt.py) must not shadow real packages.
    command = [str(python), "-I", str(worker), str(job_path)]
    try:
        process = subprocess.run(command, capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise CompileError(f"the LiteRT conversion ran past {CONVERT_TIMEOUT_S} s and was stopped") from None
    except OSError as error:
        raise CompileError(f"cannot start the LiteRT converter {python}: {error}") from None
    try:
        answer = json.loads(process.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        answer = None
    if process.returncode != 0 or not isinstance(answer, dict) or "error" in answer:
        reason = answer.get("error") if isinstance(answer, dict) else None
        tail = process.stderr.strip()[-2000:]
        raise CompileError(f"{what} failed ({job['precision']}): {reason or f'exit status {process.returncode}'}"
                           + (f"\nconverter stderr (last lines): {tail}" if tail and not reason else ""))
    return answer


def describe(target, path: Path, versions: dict[str, str], notes: dict) -> CompiledArtifact:
    """Load the .tflite with the LiteRT interpreter here and describe it as a CompiledArtifact."""
    import numpy as np

    from edgeship.device.runtimes import LiteRTSession
    from edgeship.errors import ModelLoadError

    try:
        session = LiteRTSession(path, threads=1)
    except ModelLoadError as error:
        raise CompileError(f"{path.name} was written but does not load in the LiteRT interpreter: {error}") from error
    interpreter = session._interpreter  # noqa: SLF001  (same package family; the session hides it from callers)
    tensors = {"inputs": interpreter.get_input_details(), "outputs": interpreter.get_output_details()}
    specs = {kind: [TensorSpec(name=d["name"], shape=tuple(int(x) for x in d["shape"]), dtype=np.dtype(d["dtype"]).name)
                    for d in details] for kind, details in tensors.items()}
    quantization = {d["name"]: {"scale": float(d["quantization"][0]), "zero_point": int(d["quantization"][1])}
                    for details in tensors.values() for d in details if np.dtype(d["dtype"]).kind in "iu"}
    ops: dict[str, int] = {}
    for op in interpreter._get_ops_details():  # noqa: SLF001
        if op["op_name"] != "DELEGATE":
            ops[op["op_name"]] = ops.get(op["op_name"], 0) + 1
    notes = {**notes, "ops": dict(sorted(ops.items())), "xnnpack_partitions": session.delegate_partitions}
    if quantization:
        notes["io_quantization"] = quantization
    return CompiledArtifact(target=target.name, path=path, sha256=sha256_of(path), bytes=path.stat().st_size,
                            precision=target.precision, runtime=target.runtime, inputs=specs["inputs"],
                            outputs=specs["outputs"], converter=versions, notes=notes)


# The second route: ONNX -> TensorFlow (onnx2tf) -> tf.lite.TFLiteConverter, in its own environment.
# The second LiteRT route: ONNX -> TensorFlow (onnx2tf) -> `tf.lite.TFLiteConverter`, in its own environment.
#
# Used for a LiteRT target whose `compile.<target>.route` is `tf`, or (route `auto`) when litert-torch fails
# and the environment exists. The model is the same float model the other targets start from (the QAT-
# finetuned weights when the QAT stage left them), exported to ONNX; int8 is TensorFlow's full-integer
# post-training quantization with a representative dataset from the calibration split and int8 or uint8
# input/output (`compile.tflite-int8.io`; uint8 is what the Coral Edge TPU compiler takes). It does not
# follow the precision plan's float layers (TFLiteConverter has no per-layer opt-out outside its debugger);
# litert-torch's route does.
#
# onnx2tf 1.29 pins tensorflow 2.19, onnx 1.19, onnxruntime 1.23 and numpy 1.26 exactly, all older than the
# pipeline's, so it lives in `.venv/tf-converter` (requirements/tf-converter.txt; about 2.6 GB, 6.5 minutes to
# install on the 2-core CI machine, so infra/install.sh builds it only with EDGESHIP_TF_CONVERTER=1).
#

TF_ENV = ".venv/tf-converter"
TF_REQUIREMENTS = "requirements/tf-converter.txt"
_TF_WORKER = Path(__file__).with_name("tf_convert.py")


def tf_converter_python() -> Path:
    """The Python of TensorFlow's converter environment: $EDGESHIP_TF_PYTHON, else `.venv/tf-converter` in the
    working directory or beside the edgeship checkout.

    Raises:
        CompileError: none exists, with the command that creates one.
    """
    found = environment_python("EDGESHIP_TF_PYTHON", TF_ENV, "tensorflow and onnx2tf")
    if found:
        return found
    raise CompileError(f"TensorFlow's converter (onnx2tf + tensorflow) is not installed: its pins conflict with the "
                       f"pipeline's, so it has its own environment. Create it with `EDGESHIP_TF_CONVERTER=1 bash "
                       f"infra/install.sh`, or `python3 -m venv {TF_ENV} && {TF_ENV}/bin/pip install -r "
                       f"{TF_REQUIREMENTS}`, or set EDGESHIP_TF_PYTHON")


def tf_available() -> bool:
    try:
        tf_converter_python()
    except CompileError:
        return False
    return True


def compile_with_tf(target, inputs: CompileInputs, path: Path, fallback_from: str | None = None) -> CompiledArtifact:
    """Convert by TensorFlow's route to `path` and describe the artifact (as litert.describe does)."""
    from edgeship.tasks.compile.onnx import export_onnx
    from edgeship.tasks.compile.tensorrt import make_static

    if inputs.trained.detection is not None:
        raise CompileError("TensorFlow's LiteRT route does not take detectors yet; use route: litert-torch (the "
                           "default) for detection targets")
    python = tf_converter_python()
    model, weights = float_model_for(inputs)
    with tempfile.TemporaryDirectory(prefix="edgeship-tf-") as tmp:
        onnx_path = export_onnx(model, inputs.trained.input_shape, Path(tmp) / "model.onnx")
        make_static(onnx_path, inputs.trained.input_shape, inputs.trained.num_classes)  # onnx2tf mislays a dynamic batch
        job = {"onnx": str(onnx_path), "output": str(path), "precision": target.precision, "workdir": tmp}
        if target.precision == "int8":
            job["calibration"] = str(calibration_file(inputs, Path(tmp) / "calibration.npy"))
            job["io"] = inputs.options.get("io") or "int8"
        answer = run_converter(job, Path(tmp) / "job.json", python=python, worker=_TF_WORKER,
                               what="TensorFlow's converter (onnx2tf + TFLiteConverter)")
    notes = {**answer.get("notes", {}), "weights": weights}
    if fallback_from:
        notes["fallback_from"] = fallback_from[:1000]  # why litert-torch was not used
    return describe(target, path, answer.get("versions", {}), notes)
