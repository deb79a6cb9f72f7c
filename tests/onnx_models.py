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


def write_tiny_classifier(path: str | Path, **kwargs) -> Path:
    """Write `tiny_classifier(**kwargs)` to `path` and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(tiny_classifier(**kwargs), str(path))
    return path
