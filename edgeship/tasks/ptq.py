"""The PTQ baseline: ONNX Runtime's static quantization of the fp32 model, no training.

The trained float model is exported to ONNX, pre-processed (shape inference, BatchNorm
folding), and quantized by `onnxruntime.quantization.quantize_static` to QDQ format:
per-channel symmetric int8 weights, uint8 activations with ranges calibrated on the
calibration split. It is what a user gets without quantization-aware training, kept
as a comparison row so the release shows what QAT bought.

The same QDQ model serves the cost side of sensitivity analysis: `revert_layers`
turns chosen layers back to float inside it (their weights dequantized, their
activations' Q/DQ kept as the island's boundaries), which is what a mixed-precision
plan looks like to ONNX Runtime.

    >>> baseline = post_training_quantize(trained, data, PtqParams(), Path("build/ptq"))
    >>> baseline.onnx_test_accuracy, baseline.integer_ops
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np

from edgeship.config import PtqParams
from edgeship.errors import CompileError
from edgeship.records import PreparedData, QuantizedModel, TrainedModel
from edgeship.tasks.data import load_split

ONNX_NAME = "model_int8_ptq.onnx"
FP32_NAME = "model_fp32.onnx"
_WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def post_training_quantize(trained: TrainedModel, data: PreparedData, ptq_params: PtqParams, out_dir: Path,
                           fp32_onnx: Path | None = None) -> QuantizedModel:
    """Export (unless `fp32_onnx` is given), quantize statically, and measure on ONNX Runtime.

    Raises:
        CompileError: the model does not export, or ONNX Runtime's quantizer fails on it.
    """
    from edgeship.tasks.qat import float_ops_of, integer_ops_of, onnx_accuracy, optimized_op_counts

    out_dir = Path(out_dir)
    fp32_onnx = Path(fp32_onnx) if fp32_onnx else export_fp32(trained, out_dir / FP32_NAME)
    calibration, _ = load_split(data, "calibration")
    path = quantize_onnx(fp32_onnx, calibration, out_dir / ONNX_NAME, ptq_params.calibration_method,
                         ptq_params.per_channel)
    ops = optimized_op_counts(path)
    x_val, y_val = load_split(data, "val")
    x_test, y_test = load_split(data, "test")
    val, test = onnx_accuracy(path, x_val, y_val), onnx_accuracy(path, x_test, y_test)
    return QuantizedModel(onnx_path=path, val_accuracy=val, test_accuracy=test, integer_ops=integer_ops_of(ops),
                          float_ops=float_ops_of(ops), onnx_val_accuracy=val, onnx_test_accuracy=test, method="ptq")


def export_fp32(trained: TrainedModel, path: Path) -> Path:
    """The trained float model as ONNX (edgeship's conventions: input "input", output "logits")."""
    from edgeship.tasks.compile.onnx import export_onnx
    from edgeship.tasks.train import load_model

    try:
        return export_onnx(load_model(trained), trained.input_shape, Path(path))
    except Exception as error:  # noqa: BLE001  (the exporter raises many types; its message is the news)
        raise CompileError(f"torch.onnx.export failed for '{trained.factory}': {type(error).__name__}: {error}"
                           ) from error


def quantize_onnx(fp32_onnx: Path, calibration: np.ndarray, out_path: Path, method: str = "minmax",
                  per_channel: bool = True) -> Path:
    """ONNX Runtime static QDQ quantization: int8 weights (per channel), uint8 activations.

    uint8 activations with int8 weights is the combination ONNX Runtime's x86 kernels are
    fastest at (ONNX Runtime 1.31's own default, int8 activations, left 15 of MobileNetV2's
    52 convs unfused here and ran at 0.5x the speed).
    """
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Batches(CalibrationDataReader):
        def __init__(self, images: np.ndarray, batch_size: int = 16):
            self._batches = iter([{"input": images[i:i + batch_size].astype(np.float32)}
                                  for i in range(0, len(images), batch_size)])

        def get_next(self):
            return next(self._batches, None)

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgeship-ptq-") as tmp:
        source = Path(tmp) / "preprocessed.onnx"
        try:
            quant_pre_process(str(fp32_onnx), str(source))
        except Exception as error:  # noqa: BLE001  (shape inference fails on some graphs; quantizing still works)
            warnings.warn(f"ONNX Runtime's quantization pre-processing failed ({type(error).__name__}: {error}); "
                          f"quantizing the model as exported", stacklevel=2)
            source = Path(fp32_onnx)
        try:
            quantize_static(str(source), str(out_path), _Batches(calibration), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=methods[method])
        except Exception as error:  # noqa: BLE001
            raise CompileError(f"ONNX Runtime's static quantization failed: {type(error).__name__}: {error}"
                               ) from error
    return out_path


def node_module(node_name: str) -> str:
    """The torch module a node came from, from the exporter's scope name.

    "/features/features.3/conv/conv.1/conv.1.0/Conv" -> "features.3.conv.1.0" (each scope
    segment repeats its parent's attribute name); "" for a node without a scope.
    """
    segments = [s for s in node_name.split("/") if s][:-1]
    if not segments:
        return ""
    name = segments[0]
    for segment in segments[1:]:
        name += "." + segment.split(".")[-1]
    return name


def layer_of_module(module: str, members: dict[str, str]) -> str | None:
    """The layer (by `members`: module name -> layer name) that holds `module`, or None."""
    while module:
        if module in members:
            return members[module]
        module = module.rpartition(".")[0]
    return None


def revert_layers(qdq_path: Path, layers: Iterable[str], members: dict[str, str], out_path: Path) -> Path:
    """A copy of a QDQ model in which the named layers compute in float.

    Their weights and biases are dequantized into float initializers; the Q/DQ pairs on their
    activations stay, as the boundaries of a float island (what the FX export of a plan looks like).
    """
    import onnx
    from onnx import numpy_helper

    layers = set(layers)
    model = onnx.load(str(qdq_path))
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    producer = {output: node for node in graph.node for output in node.output}
    dropped = []
    for node in graph.node:
        if node.op_type not in _WEIGHTED_OPS or layer_of_module(node_module(node.name), members) not in layers:
            continue
        for position in range(1, len(node.input)):
            source = producer.get(node.input[position])
            if source is None or source.op_type != "DequantizeLinear" or source.input[0] not in initializers:
                continue
            value = _dequantize(source, initializers, numpy_helper)
            name = f"{node.input[position]}_float"
            graph.initializer.append(numpy_helper.from_array(value, name))
            node.input[position] = name
            dropped.append(source)
    used = {name for node in graph.node for name in node.input}
    for source in dropped:
        if source.output[0] not in used and source in graph.node:
            graph.node.remove(source)
    used = {name for node in graph.node for name in node.input}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)
    keep_float_islands(model)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_path))
    return out_path


def _dequantize(node, initializers, numpy_helper) -> np.ndarray:
    """The float value of DequantizeLinear(int initializer, scale, zero point), per axis when per channel."""
    q = numpy_helper.to_array(initializers[node.input[0]]).astype(np.float32)
    scale = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
    zero = (numpy_helper.to_array(initializers[node.input[2]]).astype(np.float32)
            if len(node.input) > 2 and node.input[2] in initializers else np.zeros_like(scale))
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((q - zero) * scale).astype(np.float32)


def keep_float_islands(model) -> list[str]:
    """Stop ONNX Runtime from quantizing a float layer behind the plan's back; return the nodes it protected.

    ONNX Runtime (1.20 and later, `WeightBiasQuantization`) quantizes the float weights of any
    Conv, ConvTranspose or Gemm whose input comes from a per-tensor DequantizeLinear, to per-tensor
    int8: a float island between int8 layers would silently become a worse int8 layer. Feeding
    such a node from its own per-channel DequantizeLinear (the same scale repeated per channel:
    the same numbers) keeps it float. Edits `model` (an onnx.ModelProto) in place.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    constants = {node.output[0]: node for node in graph.node if node.op_type == "Constant"}
    producer = {output: node for node in graph.node for output in node.output}

    def value(name):
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        if name in constants:
            return numpy_helper.to_array(next(a.t for a in constants[name].attribute if a.name == "value"))
        return None

    protected = []
    for node in list(graph.node):
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 2:
            continue
        source = producer.get(node.input[0])
        weight = value(node.input[1])
        if source is None or source.op_type != "DequantizeLinear" or weight is None or weight.dtype != np.float32:
            continue
        scale = value(source.input[1])
        zero = value(source.input[2]) if len(source.input) > 2 and source.input[2] else None
        if scale is None or scale.size != 1:
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            channels = weight.shape[1] * attributes.get("group", 1)
        elif node.op_type == "ConvTranspose":
            channels = weight.shape[0]
        else:
            channels = weight.shape[1] if attributes.get("transB", 0) else weight.shape[0]
        stem = f"{node.input[0]}_float_island_{len(protected)}"
        inputs = [source.input[0], f"{stem}_scale"]
        graph.initializer.append(numpy_helper.from_array(np.full(channels, float(scale.ravel()[0]), np.float32),
                                                         f"{stem}_scale"))
        if zero is not None:
            graph.initializer.append(numpy_helper.from_array(np.full(channels, zero.ravel()[0], zero.dtype),
                                                             f"{stem}_zero_point"))
            inputs.append(f"{stem}_zero_point")
        dequantize = helper.make_node("DequantizeLinear", inputs, [stem], name=f"{stem}_DequantizeLinear", axis=1)
        graph.node.insert(list(graph.node).index(node), dequantize)
        node.input[0] = stem
        protected.append(node.name)
    used = {name for node in graph.node for name in node.input}
    for node in list(graph.node):
        if node.op_type == "DequantizeLinear" and node.output[0] not in used and node.output[0] not in {
                o.name for o in graph.output}:
            graph.node.remove(node)
    return protected
