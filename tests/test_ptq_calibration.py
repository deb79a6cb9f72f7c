"""ONNX Runtime PTQ does what params.yaml says: entropy calibration really is entropy (not MinMax under another name,
as quantize_static's default bins make it on ONNX Runtime 1.31), and a graph with Resize is pre-processed without
symbolic shape inference (said in the log) instead of silently quantized unprocessed.

(percentile is ONNX Runtime's own, unchanged: on this random-weight detector its histogram fails with "Too many bins
for data range", which the release reports as the target's CompileError.)"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgeship.models.detectors import yolo_detector
from edgeship.tasks.compile.onnx import export_onnx
from edgeship.tasks.ptq import quantize_onnx


@pytest.fixture(scope="module")
def detector_onnx(tmp_path_factory):
    """A small detector with an FPN neck (nearest upsampling: Resize in ONNX), exported as float ONNX."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ptq") / "detector.onnx"
    export_onnx(yolo_detector(4, 3, 64, width_mult=0.25).eval(), (3, 64, 64), path)
    assert "Resize" in {node.op_type for node in onnx.load(str(path)).graph.node}
    return path


def activation_scales(path) -> dict[str, float]:
    """Scale of every activation QuantizeLinear (weights are DequantizeLinear-only in QDQ), by tensor name."""
    model = onnx.load(str(path))
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    return {node.input[0]: float(constants[node.input[1]]) for node in model.graph.node
            if node.op_type == "QuantizeLinear" and node.input[1] in constants and constants[node.input[1]].size == 1}


def test_entropy_calibration_is_not_minmax_and_resize_graphs_are_preprocessed(detector_onnx, tmp_path, caplog,
                                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)  # where ONNX Runtime's symbolic shape inference would leave its temporary model
    calibration = np.random.default_rng(0).random((8, 3, 64, 64), dtype=np.float32)
    scales = {}
    with caplog.at_level(logging.INFO, logger="edgeship.tasks.ptq"):
        for method in ("minmax", "entropy"):
            scales[method] = activation_scales(quantize_onnx(detector_onnx, calibration, tmp_path / f"{method}.onnx",
                                                             method))
    assert "the graph has Resize" in caplog.text and "skipping it" in caplog.text
    assert set(scales["minmax"]) == set(scales["entropy"]) and len(scales["minmax"]) > 20
    assert not list(tmp_path.glob("sym_shape_infer_temp*"))  # skipped, not tried and failed
    narrower = [name for name in scales["minmax"] if scales["entropy"][name] < 0.98 * scales["minmax"][name]]
    # KL calibration clips the tails MinMax keeps: most activations get a narrower range (a finer scale).
    assert len(narrower) > len(scales["minmax"]) / 2, len(narrower)
