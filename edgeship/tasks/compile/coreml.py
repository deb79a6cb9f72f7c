"""Core ML targets: `coreml-fp16` and `coreml-w8a8`, ML Programs for iOS 17 / macOS 14 and later.

- coreml-fp16: `torch.export` (falling back to `torch.jit.trace`) -> `coremltools.convert` with
  float16 compute and explicit float32 input/output (without it Core ML gives fp16 I/O).
- coreml-w8a8: int8 weights and activations through `coremltools.optimize.torch`'s
  LinearQuantizer (symmetric), its observers calibrated on the calibration split, then
  finalized, traced and converted; Core ML runs int8-int8 on the Neural Engine from A17 Pro/M4.
  Weights: the QAT stage's fine-tuned float weights when the QuantizedModel carries them
  (`qat_float_checkpoint`), else the trained fp32 weights.

What runs on Linux, and so in every release: conversion, loading the spec
(`MLModel(..., skip_model_load=True)`), an op and dtype census that must hold
(w8a8 has quantize/dequantize ops; fp16 computes nothing in fp32), size, and the
accuracy of a torch-side proxy, recorded in `artifact.notes["proxy"]` and labelled as
a proxy (in `notes['proxy']`, which the host check reports, labelled). Running the model needs Core ML, i.e. macOS: the
"coreml" runtime adapter in `edgeship.device.runtimes` unzips and loads it there.
The artifact is the .mlpackage directory zipped (entries sorted, fixed timestamps).

    >>> artifact = CoremlW8A8().compile(CompileInputs(trained=trained, data=data, output_dir=Path("build")))
    >>> artifact.notes["census"]["ops"]["quantize"], artifact.notes["proxy"]["accuracy"]
"""

from __future__ import annotations

import logging
import shutil
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

from edgeship.errors import CompileError
from edgeship.files import sha256_of
from edgeship.records import CompiledArtifact, TensorSpec
from edgeship.tasks.compile import CompileInputs
from edgeship.tasks.compile.tracing import TORCH_CAPTURE
from edgeship.tasks.compile import float_model_for, plan_float_layers

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
# Ops whose float32 output is expected in an fp16 program: the I/O casts and constants.
_FP32_ALLOWED = {"cast", "const"}
_CALIBRATION_BATCH = 16


class _Coreml:
    """A Core ML target; subclasses build the torch model to convert and say what to check."""

    name: str
    precision: str
    runtime = "coreml"
    needs_quantized = False
    _suffix: str

    def compile(self, inputs: CompileInputs) -> CompiledArtifact:
        """Convert to `output_dir/model_<suffix>.mlpackage.zip`, check its spec, and measure the proxy."""
        import coremltools as ct
        import torch

        output_dir = Path(inputs.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        if inputs.trained.detection is not None:  # an ML Program and Core ML's NMS, one pipeline
            return coreml_detector(self, inputs, output_dir)
        package = output_dir / f"model_{self._suffix}.mlpackage"
        torch.manual_seed(0)
        with TORCH_CAPTURE, _quiet():  # tracing, coremltools' torch frontend and FX are not thread-safe
            model, notes = self._prepare(inputs)
            try:
                mlmodel, notes["route"] = _convert(model, inputs.trained.input_shape)
            except CompileError:
                raise
            except Exception as error:  # noqa: BLE001  (coremltools raises many types; its message is the news)
                raise CompileError(f"coremltools {ct.__version__} could not convert '{inputs.trained.factory}' "
                                   f"for {self.name}: {type(error).__name__}: {error}") from error
            shutil.rmtree(package, ignore_errors=True)
            mlmodel.save(str(package))
            spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
            notes["census"] = census(spec)
            self._check(notes["census"])
            # Inside the lock too: FX tracing in another thread patches nn.Module.__call__ process-wide,
            # and a forward pass meanwhile fails ("NameError: module is not installed as a submodule").
            notes["proxy"] = _proxy_metrics(self._proxy_logits, model, inputs, notes.pop("proxy_description"))
        notes["deployment_target"] = "iOS17 / macOS14 (mlprogram)"
        notes["torch_tested_by_coremltools"] = "up to 2.7"
        return packaged(self, package, output_dir / f"model_{self._suffix}.mlpackage.zip", spec, notes)

    def _prepare(self, inputs: CompileInputs):
        raise NotImplementedError

    def _check(self, census_: dict) -> None:
        raise NotImplementedError

    def _proxy_logits(self, model, x: np.ndarray) -> np.ndarray:
        """Logits of the torch-side stand-in for the Core ML model."""
        from edgeship.tasks.train import predict_logits

        return predict_logits(model, x)


class CoremlFp16(_Coreml):
    """The float model as an fp16 ML Program (float32 I/O)."""

    name = "coreml-fp16"
    precision = "fp16"
    _suffix = "fp16"

    def _prepare(self, inputs: CompileInputs):
        from edgeship.tasks.train import load_model

        return load_model(inputs.trained), {
            "weights": "trained-fp32",
            "proxy_description": "the torch model run in float16 on this CPU, standing in for Core ML's fp16",
        }

    def _proxy_logits(self, model, x: np.ndarray) -> np.ndarray:
        import copy

        import torch

        half = copy.deepcopy(model).half().eval()
        with torch.no_grad():
            return np.concatenate([half(torch.from_numpy(x[s:s + 256]).half()).float().numpy()
                                   for s in range(0, len(x), 256)])

    def _check(self, census_: dict) -> None:
        if census_["fp32_compute_ops"]:
            raise CompileError(f"coreml-fp16 computes in float32 in ops {census_['fp32_compute_ops']}; "
                               f"an fp16 program should cast only its input and output")


class CoremlW8A8(_Coreml):
    """int8 weights and activations (LinearQuantizer, calibrated), converted to an ML Program."""

    name = "coreml-w8a8"
    precision = "int8"
    _suffix = "w8a8"

    def _prepare(self, inputs: CompileInputs):
        quantized, weights = calibrated_linear_quantizer(inputs)
        return quantized, {
            "weights": weights,
            "quantization": "coremltools.optimize.torch LinearQuantizer, symmetric int8 weights and activations, "
                            "observers calibrated on the calibration split",
            "proxy_description": "the finalized coremltools.optimize.torch quantized model run in torch on this CPU "
                                 "(simulated int8), standing in for Core ML",
        }

    def _check(self, census_: dict) -> None:
        ops = census_["ops"]
        if not ops.get("quantize") or not ops.get("dequantize"):
            raise CompileError(f"coreml-w8a8 has no activation quantization (quantize: {ops.get('quantize', 0)}, "
                               f"dequantize: {ops.get('dequantize', 0)}); the converter dropped the int8 activations")


def calibrated_linear_quantizer(inputs: CompileInputs):
    """The model with int8 weights and activations from coremltools' LinearQuantizer, calibrated; and its weights' origin."""
    import copy

    import torch
    from coremltools.optimize.torch.quantization import (LinearQuantizer, LinearQuantizerConfig,
                                                         ModuleLinearQuantizerConfig)

    from edgeship.tasks.data import load_split

    model, weights = float_model_for(inputs)
    calibration, _ = load_split(inputs.data, "calibration")
    if len(calibration) == 0:
        raise CompileError("the calibration split is empty; coreml-w8a8 needs calibration images "
                           "(data.calibration_size in params.yaml)")
    calibration = torch.from_numpy(calibration)
    # Milestones: observers and fake quantization on from step 0, never frozen by the step count.
    # The plan's float layers (module_name_configs None) stay float, as in onnx-int8.
    config = LinearQuantizerConfig(global_config=ModuleLinearQuantizerConfig(
        quantization_scheme="symmetric", milestones=[0, 0, 10**9, 0]),
        module_name_configs={name: None for name in plan_float_layers(inputs)})
    try:
        quantizer = LinearQuantizer(copy.deepcopy(model), config)
        prepared = quantizer.prepare(example_inputs=(calibration[:1],), inplace=False)
        quantizer.step()
        prepared.eval()
        with torch.no_grad():
            for start in range(0, len(calibration), _CALIBRATION_BATCH):
                prepared(calibration[start:start + _CALIBRATION_BATCH])
        return quantizer.finalize(inplace=False).eval(), weights
    except Exception as error:  # noqa: BLE001  (FX tracing and the quantizer raise many types)
        raise CompileError(f"coremltools' LinearQuantizer could not quantize '{inputs.trained.factory}': "
                           f"{type(error).__name__}: {error}") from error


def _convert(model, input_shape: tuple[int, int, int]):
    """coremltools.convert from torch.export, or from torch.jit.trace when export does not take the model."""
    import coremltools as ct
    import torch

    example = torch.zeros(1, *input_shape)
    options = dict(convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                   compute_precision=ct.precision.FLOAT16,
                   inputs=[ct.TensorType(name=INPUT_NAME, shape=tuple(example.shape), dtype=np.float32)],
                   outputs=[ct.TensorType(name=OUTPUT_NAME, dtype=np.float32)])
    failures = []
    if not _has_quantized_ops(model):  # a finalized quantized model converts from TorchScript only
        try:
            program = torch.export.export(model.eval(), (example,)).run_decompositions({})
            return ct.convert(program, **options), "torch.export"
        except Exception as error:  # noqa: BLE001
            failures.append(f"torch.export: {type(error).__name__}: {error}")
    try:
        with torch.no_grad():
            traced = torch.jit.trace(model.eval(), example)
        return ct.convert(traced, **options), "torch.jit.trace"
    except Exception as error:  # noqa: BLE001
        failures.append(f"torch.jit.trace: {type(error).__name__}: {error}")
    raise CompileError("coremltools could not convert the model: " + "; ".join(failures))


def _has_quantized_ops(model) -> bool:
    graph = getattr(model, "graph", None)
    return graph is not None and any("quantize" in str(node.target) for node in graph.nodes)


def census(spec) -> dict:
    """Ops by type, output dtypes by op type, and the compute ops with float32 outputs, of an ML Program spec."""
    from coremltools.proto import MIL_pb2

    ops: Counter = Counter()
    dtypes: Counter = Counter()
    fp32_compute: Counter = Counter()

    def visit(block) -> None:
        for op in block.operations:
            ops[op.type] += 1
            for output in op.outputs:
                dtype = MIL_pb2.DataType.Name(output.type.tensorType.dataType)
                dtypes[f"{op.type}:{dtype}"] += 1
                if dtype == "FLOAT32" and op.type not in _FP32_ALLOWED:
                    fp32_compute[op.type] += 1
            for inner in op.blocks:
                visit(inner)

    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            visit(block)
    return {"ops": dict(sorted(ops.items())), "output_dtypes": dict(sorted(dtypes.items())),
            "fp32_compute_ops": dict(sorted(fp32_compute.items()))}


def _proxy_metrics(proxy_logits, model, inputs: CompileInputs, description: str) -> dict:
    """Accuracy, top-1 agreement and max logit difference of the torch-side proxy on the test split."""
    from edgeship.tasks.data import load_split
    from edgeship.tasks.train import load_model, predict_logits

    x, y = load_split(inputs.data, "test")
    reference = predict_logits(load_model(inputs.trained), x)
    logits = proxy_logits(model, x)
    predictions = logits.argmax(axis=1)
    return {"accuracy": float((predictions == y).mean()),
            "top1_agreement": float((predictions == reference.argmax(axis=1)).mean()),
            "max_abs_logit_diff": float(np.abs(logits.astype(np.float64) - reference).max()),
            "description": description}


def packaged(target, package: Path, path: Path, spec, notes: dict, postprocess=None) -> CompiledArtifact:
    """Zip the .mlpackage to `path` (removing the directory) and describe it as the target's CompiledArtifact."""
    import coremltools as ct
    import torch

    zip_package(package, path)
    shutil.rmtree(package, ignore_errors=True)
    description = spec.description
    return CompiledArtifact(target=target.name, path=path, sha256=sha256_of(path), bytes=path.stat().st_size,
                            precision=target.precision, runtime=target.runtime,
                            inputs=[_spec(f) for f in description.input],
                            outputs=[_spec(f) for f in description.output],
                            converter={"coremltools": ct.__version__, "torch": torch.__version__}, notes=notes,
                            postprocess=postprocess)


def zip_package(package: Path, path: Path) -> Path:
    """Zip an .mlpackage directory with sorted entries and fixed timestamps (the artifact that travels)."""
    path.unlink(missing_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(p for p in package.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(str(Path(package.name) / file.relative_to(package)), date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, file.read_bytes())
    return path


def _spec(feature) -> TensorSpec:
    from coremltools.proto import FeatureTypes_pb2

    array = feature.type.multiArrayType
    dtype = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array.dataType).lower()
    return TensorSpec(name=feature.name, shape=tuple(int(d) for d in array.shape),
                      dtype={"double": "float64"}.get(dtype, dtype))


class _quiet:
    """coremltools warns about the untested torch version and logs every pass; keep the release log readable."""

    def __enter__(self):
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        self._level = logging.getLogger("coremltools").level
        logging.getLogger("coremltools").setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        logging.getLogger("coremltools").setLevel(self._level)
        return self._warnings.__exit__(*exc)


def coreml_detector(target, inputs, output_dir: Path):
    """coreml-fp16 for a detector: the decoded ML Program (fp16), then Core ML's NonMaximumSuppression model, in one
    pipeline whose outputs are Vision's (`confidence` (K, C), `coordinates` (K, 4) normalized cx, cy, w, h), so
    Vision returns recognized objects. Checked here: conversion, the pipeline's spec and census; its mAP is the
    torch model's in float16 plus the numpy NMS, labelled as a proxy (Core ML runs on macOS only)."""
    import coremltools as ct

    from edgeship.tasks.compile import exportable_model
    from edgeship.tasks.compile.detection import outputs_of

    head, shape = inputs.trained.detection, inputs.trained.input_shape
    package = Path(output_dir) / "model_fp16.mlpackage"
    with TORCH_CAPTURE, _quiet():
        decoded = exportable_model(inputs)
        program = _coreml_program(_VisionOutputs(decoded, head.input_size).eval(), shape)
        pipeline = _with_nms(program, head, inputs.data.classes, shape)
        shutil.rmtree(package, ignore_errors=True)
        pipeline.save(str(package))
        spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
        kinds = [model.WhichOneof("Type") for model in spec.pipeline.models]
        if kinds != ["mlProgram", "nonMaximumSuppression"]:
            raise CompileError(f"the Core ML detector's pipeline holds {kinds}, not an ML Program then NMS")
        notes = {"weights": "trained-fp32", "route": "torch.export", "pipeline": kinds,
                 "census": census(spec.pipeline.models[0]),
                 "proxy": _fp16_proxy(decoded, inputs), "deployment_target": "iOS17 / macOS14 (mlprogram + NMS)"}
    return packaged(target, package, Path(output_dir) / "model_fp16.mlpackage.zip", spec, notes,
                    postprocess=outputs_of(head, "vision", {"confidence": "confidence", "coordinates": "coordinates"}))


class _VisionOutputs:
    """The decoded detector for one image, as Vision's NMS takes it: confidence (A, C), coordinates (A, 4) normalized
    cx, cy, w, h. (A torch module; defined lazily so importing this file needs no torch.)"""

    def __new__(cls, decoded, size: int):
        import torch

        class VisionOutputs(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.decoded = decoded

            def forward(self, images):
                boxes, scores = self.decoded(images)
                corners = boxes[0]
                centre, extent = (corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]
                return scores[0], torch.cat([centre, extent], dim=1) / size

        return VisionOutputs()


def _coreml_program(module, shape):
    import coremltools as ct
    import torch

    program = torch.export.export(module, (torch.zeros(1, *shape),)).run_decompositions({})
    return ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                      compute_precision=ct.precision.FLOAT16,
                      inputs=[ct.TensorType(name=INPUT_NAME, shape=(1, *shape), dtype=np.float32)],
                      outputs=[ct.TensorType(name="raw_confidence", dtype=np.float32),
                               ct.TensorType(name="raw_coordinates", dtype=np.float32)])


def _with_nms(program, head, class_names: list[str], shape):
    """The ML Program followed by Core ML's NonMaximumSuppression model (per class), as one pipeline."""
    import coremltools as ct
    from coremltools.models import datatypes
    from coremltools.models.pipeline import Pipeline

    float32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    nms = ct.proto.Model_pb2.Model()
    nms.specificationVersion = 5
    for name, width in (("raw_confidence", head.num_classes), ("raw_coordinates", 4)):
        feature = nms.description.input.add()
        feature.name, feature.type.multiArrayType.dataType = name, float32
        feature.type.multiArrayType.shape.extend([head.points, width])
    for name, width in (("confidence", head.num_classes), ("coordinates", 4)):
        feature = nms.description.output.add()
        feature.name, feature.type.multiArrayType.dataType = name, float32
        for lower, upper in ((0, -1), (width, width)):  # any number of objects, `width` columns
            size = feature.type.multiArrayType.shapeRange.sizeRanges.add()
            size.lowerBound, size.upperBound = lower, upper
    settings = nms.nonMaximumSuppression
    settings.confidenceInputFeatureName, settings.coordinatesInputFeatureName = "raw_confidence", "raw_coordinates"
    settings.confidenceOutputFeatureName, settings.coordinatesOutputFeatureName = "confidence", "coordinates"
    settings.iouThreshold, settings.confidenceThreshold = head.nms.iou_threshold, head.nms.score_threshold
    settings.pickTop.perClass = True
    settings.stringClassLabels.vector.extend(class_names)
    pipeline = Pipeline(input_features=[(INPUT_NAME, datatypes.Array(1, *shape))],
                        output_features=["confidence", "coordinates"])
    pipeline.add_model(program)
    pipeline.add_model(nms)
    spec = pipeline.spec
    spec.specificationVersion = max(program.get_spec().specificationVersion, 5)
    spec.description.input[0].CopyFrom(program.get_spec().description.input[0])
    for index in range(2):
        spec.description.output[index].CopyFrom(nms.description.output[index])
    return ct.models.MLModel(spec, weights_dir=program.weights_dir)


def _fp16_proxy(decoded, inputs) -> dict:
    """The torch detector in float16 on this CPU with the numpy NMS: mAP and agreement with fp32, as a proxy."""
    import copy

    import torch

    from edgeship.device.detections import agreement, nms
    from edgeship.tasks.data import load_split
    from edgeship.tasks.kinds import task_of

    head, task = inputs.trained.detection, task_of(inputs.trained)
    images, _ = load_split(inputs.data, "test")
    half = copy.deepcopy(decoded).half().eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(images), 64):
            boxes, scores = half(torch.from_numpy(images[start:start + 64]).half())
            chunks.append(nms(boxes.float().numpy(), scores.float().numpy(), head.nms))
    packed = np.concatenate(chunks)
    scores = task.score(packed, inputs.data)
    matched, score_diff = agreement(packed, task.reference(inputs.trained, inputs.data))
    return {"accuracy": scores.pop(task.metric), "metrics": {**scores, "matched_fraction": matched,
                                                             "score_diff": score_diff},
            "description": "the torch detector run in float16 on this CPU with the numpy NMS, standing in for "
                           "Core ML's fp16 program and NMS"}
