"""Detection post-processing on the targets a CPU machine can only compile and check: TensorRT (decode in the graph,
then the EfficientNMS_TRT plugin) and Core ML (an ML Program, then Core ML's NMS model, in one pipeline). Measured
where their hardware is: TensorRT's engine with its NMS on an NVIDIA GPU (skipped here with the reason)."""

from __future__ import annotations

import onnx
import pytest

from edgeship.device.runtimes import unavailable_reason
from edgeship.tasks.compile import CompileInputs, get_target

from detection_models import shapes_data, untrained_detector


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    data = shapes_data(root)
    return data, untrained_detector(data, root / "model", "concat"), root


def test_tensorrt_gets_decode_in_the_graph_and_efficient_nms_checked_as_far_as_a_cpu_can(detector):
    data, trained, root = detector
    artifact = get_target("tensorrt-fp16").compile(CompileInputs(trained=trained, data=data, output_dir=root / "trt"))
    assert artifact.postprocess.format == "nms_padded"
    graph = onnx.load(str(artifact.path)).graph
    plugin, = [node for node in graph.node if node.op_type == "EfficientNMS_TRT"]
    assert list(plugin.input) == ["boxes", "scores"]
    assert [o.name for o in graph.output] == ["num_detections", "detection_boxes", "detection_scores",
                                              "detection_classes"]
    notes = artifact.notes
    assert notes["nms"]["attributes"]["max_output_boxes"] == 20 and notes["lint"]["passing_nodes"] > 0
    assert notes["onnxrt_vs_torch"]["matched_fraction"] == 1.0  # the decoded graph on ORT + numpy NMS = torch
    assert notes["static_input_shape"] == [1, 3, 64, 64]


@pytest.mark.skipif(unavailable_reason("tensorrt") is not None, reason=str(unavailable_reason("tensorrt")))
def test_tensorrt_runs_the_detector_with_its_nms_on_the_gpu(detector):
    from edgeship.tasks.host_check import host_check, reference_logits

    data, trained, root = detector
    artifact = get_target("tensorrt-fp16").compile(CompileInputs(trained=trained, data=data, output_dir=root / "gpu"))
    check = host_check(artifact, data, reference_logits(trained, data))
    assert check.error is None and check.metrics["matched_fraction"] >= 0.9


def test_core_ml_gets_an_nms_stage_so_vision_returns_objects(detector):
    data, trained, root = detector
    artifact = get_target("coreml-fp16").compile(CompileInputs(trained=trained, data=data, output_dir=root / "cm"))
    assert artifact.postprocess.format == "vision"
    assert artifact.notes["pipeline"] == ["mlProgram", "nonMaximumSuppression"]
    assert {o.name for o in artifact.outputs} == {"confidence", "coordinates"}  # Vision's recognized objects
    proxy = artifact.notes["proxy"]
    assert proxy["metrics"]["matched_fraction"] >= 0.9 and "standing in for Core ML" in proxy["description"]
    assert not artifact.notes["census"]["fp32_compute_ops"]
