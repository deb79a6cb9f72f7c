"""ONNX targets: `onnx-fp32` (the trained float model) and `onnx-int8` (the QAT model as QDQ ONNX).

Both are loaded by ONNX Runtime. Every ONNX file edgeship writes has one input
"input" (float32 NCHW) and one output "logits", with a dynamic batch axis, and
passes `onnx.checker.check_model(full_check=True)`.

    >>> artifact = OnnxFp32().compile(CompileInputs(trained=trained, data=data, output_dir=Path("build")))
    >>> artifact.sha256, artifact.inputs[0].shape
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from edgeship.errors import CompileError
from edgeship.files import sha256_of
from edgeship.records import CompiledArtifact, TensorSpec
from edgeship.tasks.compile import CompileInputs
from edgeship.tasks.compile.tracing import TORCH_CAPTURE

if TYPE_CHECKING:
    from torch import nn

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def export_onnx(model: "nn.Module", input_shape: tuple[int, int, int], path: Path, opset: int = OPSET,
                output_names: tuple[str, ...] = (OUTPUT_NAME,)) -> Path:
    """Export a torch module (float, or converted/fake-quant int8) with edgeship's ONNX conventions (a detector's
    decoded outputs: `output_names` ("boxes", "scores")).

    The TorchScript exporter (`dynamo=False`) is used on purpose: the dynamo exporter fails
    on quantized graphs in torch 2.13 (shared/notes/environment.md).
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with TORCH_CAPTURE:  # torch's tracing is process-wide; other targets compile in parallel threads
            torch.onnx.export(model, (torch.zeros(1, *input_shape),), str(path), input_names=[INPUT_NAME],
                              output_names=list(output_names), opset_version=opset, dynamo=False,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in output_names}})
    finally:
        model.train(was_training)
    return path


class OnnxFp32:
    """The trained float model exported to ONNX."""

    name = "onnx-fp32"
    runtime = "onnxruntime"
    precision = "fp32"
    needs_quantized = False

    def compile(self, inputs: CompileInputs) -> CompiledArtifact:
        """Export `inputs.trained` to `output_dir/model_fp32.onnx` and check it (a detector: decode and
        NonMaxSuppression in the graph, float)."""
        from edgeship.tasks.compile import exportable_model
        from edgeship.tasks.compile.detection import BOXES, SCORES, add_onnx_nms

        path = Path(inputs.output_dir) / "model_fp32.onnx"
        model = exportable_model(inputs)  # a ModelLoadError says itself what is wrong
        head = inputs.trained.detection
        try:
            export_onnx(model, inputs.trained.input_shape, path, output_names=(BOXES, SCORES) if head else
                        (OUTPUT_NAME,))
        except Exception as error:  # noqa: BLE001  (the exporter raises many types; its message is the news)
            raise CompileError(f"torch.onnx.export failed for '{inputs.trained.factory}': "
                               f"{type(error).__name__}: {error}") from error
        postprocess = add_onnx_nms(path, head) if head else None
        return _artifact(self, path).model_copy(update={"postprocess": postprocess})


class OnnxInt8:
    """The quantization-aware-trained model, already exported as QDQ ONNX by the qat stage."""

    name = "onnx-int8"
    runtime = "onnxruntime"
    precision = "int8"
    needs_quantized = True

    def compile(self, inputs: CompileInputs) -> CompiledArtifact:
        """Copy `inputs.quantized.onnx_path` to `output_dir/model_int8.onnx` and check it."""
        if inputs.quantized is None:
            raise CompileError("onnx-int8 needs the quantization-aware-trained model; run the qat stage first")
        source = Path(inputs.quantized.onnx_path)
        if not source.is_file():
            raise CompileError(f"{source} not found; run the qat stage again")
        path = Path(inputs.output_dir) / "model_int8.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        if source.resolve() != path.resolve():
            shutil.copyfile(source, path)
        precision = "mixed" if inputs.quantized.float_layers else self.precision
        return _artifact(self, path, precision)


def _artifact(target: "OnnxFp32 | OnnxInt8", path: Path, precision: str | None = None) -> CompiledArtifact:
    """Check an ONNX file and describe it as a CompiledArtifact."""
    import onnx
    import torch

    try:
        onnx.checker.check_model(str(path), full_check=True)
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as error:  # noqa: BLE001  (ValidationError, InferenceError, DecodeError)
        raise CompileError(f"{path.name} fails the ONNX checker: {type(error).__name__}: {error}") from error
    return CompiledArtifact(target=target.name, path=path, sha256=sha256_of(path), bytes=path.stat().st_size,
                            precision=precision or target.precision, runtime=target.runtime,
                            inputs=_specs(graph.input, graph), outputs=_specs(graph.output, graph),
                            converter={"torch": torch.__version__, "onnx": onnx.__version__})


def _specs(values, graph) -> list[TensorSpec]:
    """TensorSpecs of graph inputs/outputs, with the symbolic batch axis set to 1."""
    from onnx import helper

    initializers = {init.name for init in graph.initializer}
    specs = []
    for value in values:
        if value.name in initializers:  # old exporters list weights as inputs too
            continue
        tensor = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tensor.shape.dim)
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        specs.append(TensorSpec(name=value.name, shape=shape, dtype=dtype))
    return specs
