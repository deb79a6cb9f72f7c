"""QDQ ONNX models as ONNX Runtime runs them: what computes in integer, how accurate, which layers stay float.

Shared by the quantization stages (`qat`, `ptq`, `sensitivity`): the op census of the
graph ONNX Runtime actually runs after its optimizations, top-1 accuracy on ONNX
Runtime, the mapping from an exported node back to the torch module (and layer) it came
from, turning chosen layers of a QDQ model back to float (`revert_layers`), and keeping
such float islands float (`keep_float_islands`).

    >>> ops = optimized_op_counts(Path("model_int8.onnx"))
    >>> integer_ops_of(ops), float_ops_of(ops)
    ({'QLinearConv': 30, 'QGemm': 1}, {'Conv': 1})
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

_INTEGER_OPS = {"ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "QGemm", "QAttention",
                "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QEmbedLayerNormalization", "QOrderedMatMul"}
# Ops that do a layer's arithmetic in float after ONNX Runtime's optimization (NCHWc convs show as Conv).
FLOAT_COMPUTE_OPS = {"Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}
_WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def optimized_op_counts(onnx_path: Path) -> dict[str, int]:
    """Op types and counts of the graph ONNX Runtime actually runs (after its extended graph optimizations)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized)
        options.log_severity_level = 3
        ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(optimized), load_external_data=False).graph
    return dict(sorted(Counter(node.op_type for node in graph.node).items()))


def integer_ops_of(op_counts: Mapping[str, int]) -> dict[str, int]:
    return {op: n for op, n in op_counts.items() if op.startswith("QLinear") or op in _INTEGER_OPS}


def float_ops_of(op_counts: Mapping[str, int]) -> dict[str, int]:
    return {op: n for op, n in op_counts.items() if op in FLOAT_COMPUTE_OPS}


def count_integer_ops(onnx_path: Path) -> dict[str, int]:
    """Integer kernels (QLinearConv, QGemm, ConvInteger, ...) in the graph ONNX Runtime actually runs.

    ONNX Runtime fuses DequantizeLinear -> op -> QuantizeLinear into integer kernels
    when it optimizes the graph; this saves its optimized graph and counts them, so
    a QDQ model that would silently run in float shows zero.
    """
    return integer_ops_of(optimized_op_counts(onnx_path))


def onnx_accuracy(onnx_path: Path, x: np.ndarray, y: np.ndarray, threads: int = 1) -> float:
    """Top-1 accuracy of an ONNX model on ONNX Runtime (CPU, all graph optimizations)."""
    from edgeship.device.runtimes import open_session
    from edgeship.tasks.host_check import run_batches

    if len(y) == 0:
        return float("nan")
    logits = run_batches(open_session("onnxruntime", onnx_path, threads=threads), x)
    return float((logits.argmax(axis=1) == np.asarray(y)).mean())


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
