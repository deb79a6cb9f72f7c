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

import glob
import importlib.metadata
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import weakref
import zipfile
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from edgeship.errors import EdgeshipError, ModelLoadError
from edgeship.records import RuntimeOption, TensorSpec


class Session(Protocol):
    """A loaded model, ready to run."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dynamic_batch: bool  # whether the first input accepts any batch size
    options: dict[str, RuntimeOption]  # the adapter's options in effect (what a result reports)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch through the model and return the first output."""

    def run_all(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch (of the model's own batch size, when fixed) and return every output by name."""


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
        self.options: dict[str, RuntimeOption] = {}
        self.dynamic_batch = not isinstance(self._session.get_inputs()[0].shape[0], int)
        self.inputs = [TensorSpec(name=i.name, shape=_concrete(i.shape), dtype=_ort_dtype(i.type))
                       for i in self._session.get_inputs()]
        self.outputs = [TensorSpec(name=o.name, shape=_concrete(o.shape), dtype=_ort_dtype(o.type))
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


class LiteRTSession:
    """The LiteRT (TFLite) interpreter from ai-edge-litert, with the XNNPACK delegate unless turned off.

    An int8 model with int8 input/output is fed float32 images quantized with its
    input's scale and zero point, and its output is dequantized, so callers of `run` always
    see float32 in and out. `inputs` describes what `run` takes. For timing, `run` is
    `finish(invoke(prepare(batch)))`: `invoke` is the runtime's own work (set the input
    tensor, invoke, read the output), `prepare`/`finish` the numpy I/O conversion
    (`converts_io` says whether there is any), which the benchmark reports beside it.
    """

    name = "litert"

    def __init__(self, path: str | Path, threads: int = 0, xnnpack: bool | None = None):
        try:
            from ai_edge_litert.interpreter import Interpreter, OpResolverType
        except ImportError:
            raise ModelLoadError("the LiteRT runtime is not installed here; install it with "
                                 "pip install 'edgeship[litert]' (the ai-edge-litert package)") from None
        if xnnpack is None:
            xnnpack = os.environ.get("EDGESHIP_LITERT_XNNPACK", "1").strip().lower() not in ("0", "false", "no", "off")
        resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            self._interpreter = Interpreter(model_path=str(path), num_threads=threads if threads > 0 else None,
                                            experimental_op_resolver_type=resolver)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as error:
            raise ModelLoadError(f"LiteRT cannot load {Path(path).name}: {error}") from None
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self._batch = int(self._input["shape"][0]) if len(self._input["shape"]) else 1
        self.inputs = [TensorSpec(name=i["name"], shape=_concrete(i["shape"].tolist()), dtype="float32")
                       for i in self._interpreter.get_input_details()]
        self.outputs = [TensorSpec(name=o["name"], shape=_concrete(o["shape"].tolist()), dtype="float32")
                        for o in self._interpreter.get_output_details()]
        self.dynamic_batch = False  # litert-torch exports a fixed batch; `run` splits larger batches
        ops = self._interpreter._get_ops_details()  # noqa: SLF001  (the only place the interpreter tells)
        # A delegate that took over nodes shows as a DELEGATE node in the graph.
        self.delegate_partitions = sum(1 for op in ops if op["op_name"] == "DELEGATE")
        self.xnnpack = bool(xnnpack and self.delegate_partitions)
        self.options: dict[str, RuntimeOption] = {"xnnpack": self.xnnpack}  # False: XNNPACK took no node
        self.file_inputs = [TensorSpec(name=self._input["name"], shape=_concrete(self._input["shape"].tolist()),
                                       dtype=np.dtype(self._input["dtype"]).name)]

    def run(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) == self._batch:
            return self.finish(self.invoke(self.prepare(batch)))
        return np.concatenate([self.finish(self.invoke(self.prepare(batch[start:start + self._batch])))
                               for start in range(0, len(batch), self._batch)])

    @property
    def converts_io(self) -> bool:
        """Whether `run` quantizes the input or dequantizes the output (an integer-I/O model)."""
        return any(np.dtype(d["dtype"]).kind in "iu" for d in (self._input, self._output))

    def prepare(self, batch: np.ndarray) -> np.ndarray:
        """float32 images -> the input tensor's dtype (quantized with its scale and zero point)."""
        return _quantize(batch, self._input)

    def invoke(self, prepared: np.ndarray) -> np.ndarray:
        """The runtime's own work on a prepared input: set the tensor, invoke, read the output tensor."""
        self._interpreter.set_tensor(self._input["index"], prepared)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output["index"])

    def finish(self, output: np.ndarray) -> np.ndarray:
        """The output tensor -> float32 logits (dequantized when integer)."""
        return _dequantize(output, self._output)

    def run_all(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every output tensor of one invocation (a batch of the model's size), dequantized when integer."""
        self._interpreter.set_tensor(self._input["index"], self.prepare(batch))
        self._interpreter.invoke()
        return {detail["name"]: _dequantize(self._interpreter.get_tensor(detail["index"]), detail)
                for detail in self._interpreter.get_output_details()}


def _quantize(values: np.ndarray, detail: dict) -> np.ndarray:
    """float32 -> the tensor's dtype, with its scale and zero point when it is an integer tensor."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return values.astype(dtype, copy=False)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(values / scale) + zero_point, info.min, info.max).astype(dtype)


def _dequantize(values: np.ndarray, detail: dict) -> np.ndarray:
    """The tensor's values as float32 (integer tensors through their scale and zero point)."""
    if np.dtype(detail["dtype"]).kind == "f":
        return values.astype(np.float32, copy=True)
    scale, zero_point = detail["quantization"]
    return ((values.astype(np.float32) - zero_point) * scale).astype(np.float32)


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
        specs = {name: TensorSpec(name=name, shape=_concrete(list(engine.get_tensor_shape(name))),
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


def nvidia_gpu_present() -> bool:
    """Whether this machine exposes an NVIDIA GPU (desktop/server driver nodes, or a Jetson's integrated GPU).

    Checked by device nodes, without loading CUDA: TensorRT's Python package
    crashes the process on a machine without a GPU (shared/notes/environment.md).
    """
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/nvhost-ctrl-gpu")
                or os.path.exists("/dev/nvgpu/igpu0"))


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
