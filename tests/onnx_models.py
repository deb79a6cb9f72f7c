"""Tiny ONNX models for tests, built with onnx.helper (no torch needed).

    >>> path = write_tiny_classifier(tmp_path / "tiny.onnx")   # [N,1,8,8] -> Flatten -> Gemm -> [N,10]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9  # what ONNX Runtime 1.31 reads; newer onnx writes a newer IR by default


def tiny_classifier(size: int = 8, channels: int = 1, classes: int = 10, batch: int | str = "N",
                    seed: int = 0) -> onnx.ModelProto:
    """A linear classifier: input [batch, channels, size, size] float32 -> Flatten -> Gemm -> [batch, classes]."""
    rng = np.random.default_rng(seed)
    features = channels * size * size
    weight = numpy_helper.from_array(rng.standard_normal((classes, features)).astype(np.float32), "weight")
    bias = numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "bias")
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "weight", "bias"], ["logits"], transB=1),
        ],
        "tiny_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        initializer=[weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgeship-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def single_image_classifier(seed: int = 0) -> onnx.ModelProto:
    """A classifier whose file declares any batch [N, 1, 8, 8] but whose graph reshapes to one image: a batch of
    two passes every input check and then fails inside the runtime (the model's own fault)."""
    model = tiny_classifier(seed=seed)
    shape = numpy_helper.from_array(np.array([1, 64], dtype=np.int64), "one_image")
    model.graph.initializer.append(shape)
    model.graph.node[0].CopyFrom(helper.make_node("Reshape", ["input", "one_image"], ["flat"]))
    onnx.checker.check_model(model)
    return model


def memory_hog(gigabytes: float = 2.0) -> onnx.ModelProto:
    """The tiny classifier plus a ConstantOfShape of `gigabytes` of float32 zeros, summed into its logits (+0): a
    model that asks the runtime for that much memory."""
    model = tiny_classifier()
    count = numpy_helper.from_array(np.array([int(gigabytes * (1 << 30)) // 4], dtype=np.int64), "count")
    model.graph.initializer.append(count)
    model.graph.node.extend([
        helper.make_node("ConstantOfShape", ["count"], ["zeros"],
                         value=helper.make_tensor("value", TensorProto.FLOAT, [1], [0.0])),
        helper.make_node("ReduceSum", ["zeros"], ["nothing"], keepdims=0),
    ])
    model.graph.node[1].output[0] = "raw_logits"
    model.graph.node.append(helper.make_node("Add", ["raw_logits", "nothing"], ["logits"]))
    onnx.checker.check_model(model)
    return model


def deep_classifier(width: int = 1024, depth: int = 8, seed: int = 0) -> onnx.ModelProto:
    """A classifier with the tiny one's input and output whose middle is `depth` tanh(x @ W) layers of `width`: about
    2 * width^2 * depth FLOPs per image, for a batch that takes the runtime seconds."""
    rng = np.random.default_rng(seed)
    weights = [numpy_helper.from_array((rng.standard_normal((64, width)) / 8).astype(np.float32), "w_in"),
               numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), "w"),
               numpy_helper.from_array((rng.standard_normal((width, 10)) / np.sqrt(width)).astype(np.float32), "w_out"),
               numpy_helper.from_array(np.array([-1, 64], dtype=np.int64), "flat_shape")]
    nodes = [helper.make_node("Reshape", ["input", "flat_shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w_in"], ["h0"])]
    for layer in range(depth):
        nodes += [helper.make_node("MatMul", [f"h{layer}", "w"], [f"m{layer}"]),
                  helper.make_node("Tanh", [f"m{layer}"], [f"h{layer + 1}"])]
    nodes.append(helper.make_node("MatMul", [f"h{depth}", "w_out"], ["logits"]))
    graph = helper.make_graph(nodes, "deep_classifier",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                              initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgeship-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def write_tiny_classifier(path: str | Path, **kwargs) -> Path:
    """Write `tiny_classifier(**kwargs)` to `path` and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(tiny_classifier(**kwargs), str(path))
    return path
