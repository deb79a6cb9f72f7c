"""Detection outputs: the one NMS, mAP from pycocotools on known boxes, the ONNX graph with NonMaxSuppression against
the numpy decode, a device agent's evaluate job answering detections, golden vectors, shadow agreement and telemetry.

The detectors here are untrained (random weights, a low score threshold so they detect plenty): what is compared
is the post-processing, which must give the same detections wherever it runs.
"""

from __future__ import annotations


import numpy as np
import pytest

from edgeship.config import parse_params
from edgeship.device.detections import agreement, empty, nms, open_model, unpack
from edgeship.errors import ModelLoadError
from edgeship.records import NmsSettings
from edgeship.tasks.detection.metric import mean_average_precision
from edgeship.tasks.detection.train import build_detector, predict_detections

from detection_models import shapes_data, untrained_detector

SETTINGS = NmsSettings(score_threshold=0.3, iou_threshold=0.5, max_detections=10)


def test_nms_keeps_the_best_of_overlapping_boxes_per_class_only():
    boxes = np.asarray([[[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]]], np.float32)
    scores = np.asarray([[[0.9, 0.0], [0.8, 0.7], [0.2, 0.6]]], np.float32)
    (kept_boxes, kept_scores, kept_classes), = unpack(nms(boxes, scores, SETTINGS))
    # class 0: box 1 overlaps box 0 (IoU 0.68) and goes; box 2 scores under the threshold. class 1: both kept.
    assert kept_classes.tolist() == [0, 1, 1] and kept_scores.tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert kept_boxes.tolist() == [[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]]


def _packed(rows_per_image, k=10):
    out = empty(len(rows_per_image), k)
    for i, rows in enumerate(rows_per_image):
        out[i, :len(rows)] = rows
    return out


def test_map_from_pycocotools_on_known_boxes():
    truth = [(np.asarray([[10, 10, 30, 30]], np.float32), np.asarray([0])),
             (np.asarray([[0, 0, 20, 20], [40, 40, 60, 60]], np.float32), np.asarray([1, 0]))]
    perfect = _packed([[[10, 10, 30, 30, 0.9, 0]], [[0, 0, 20, 20, 0.8, 1], [40, 40, 60, 60, 0.7, 0]]])
    assert mean_average_precision(perfect, truth, 2) == {"map": pytest.approx(1.0), "map50": pytest.approx(1.0)}
    # Every box shifted so its IoU with the truth is 0.77: a hit at IoU thresholds 0.50..0.75 (6 of 10), missed above.
    shifted = perfect.copy()
    for image, (boxes, _) in enumerate(truth):
        side = boxes[0, 2] - boxes[0, 0]
        shift = side * (1 - 0.77) / (1 + 0.77)  # (s - d) / (s + d) = 0.77 for a shift d along x
        shifted[image, :len(boxes), [0, 2]] += shift
    assert agreement(shifted, perfect)[0] == 1.0  # still IoU >= 0.5: matched
    scores = mean_average_precision(shifted, truth, 2)
    assert scores["map50"] == pytest.approx(1.0) and scores["map"] == pytest.approx(0.6, abs=1e-6)
    assert mean_average_precision(empty(2, 10), truth, 2) == {"map": 0.0, "map50": 0.0}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return shapes_data(tmp_path_factory.mktemp("shapes"))


@pytest.mark.parametrize("layout", ["concat", "separate"])
def test_the_onnx_graph_with_non_max_suppression_matches_the_numpy_decode(shapes, tmp_path, layout):
    from edgeship.tasks.compile import CompileInputs, get_target
    from edgeship.tasks.data import load_split
    from edgeship.tasks.host_check import host_check, reference_logits
    from edgeship.tasks.train import load_model

    trained = untrained_detector(shapes, tmp_path / "model", layout)
    artifact = get_target("onnx-fp32").compile(CompileInputs(trained=trained, data=shapes, output_dir=tmp_path))
    assert artifact.postprocess.format == "nms_flat"
    import onnx

    ops = {node.op_type for node in onnx.load(str(artifact.path)).graph.node}
    assert "NonMaxSuppression" in ops and "QuantizeLinear" not in ops  # float, in the graph
    images, _ = load_split(shapes, "test")
    in_graph = open_model("onnxruntime", artifact.path, postprocess=artifact.postprocess).run(images)
    numpy_decode = predict_detections(load_model(trained), trained.detection, images)
    assert (numpy_decode[..., 5] >= 0).sum() > 3 * len(images)  # the untrained detector does detect things
    matched, score_diff = agreement(in_graph, numpy_decode)
    assert matched == 1.0 and score_diff < 1e-4
    np.testing.assert_allclose(in_graph[..., :5], numpy_decode[..., :5], atol=1e-3)
    check = host_check(artifact, shapes, reference_logits(trained, shapes))
    assert check.error is None and check.metrics["matched_fraction"] == 1.0
    assert check.accuracy == pytest.approx(mean_average_precision(numpy_decode, *_truth(shapes))["map"], abs=1e-9)


def _truth(data):
    from edgeship.tasks.detection.data import load_targets

    return load_targets(data, "test")[1], len(data.classes)


def test_a_device_agent_evaluates_a_detector_and_the_pipeline_scores_its_detections(shapes, tmp_path):
    from edgeship.device.client import AgentClient, local_agents
    from edgeship.errors import DeviceJobFailed
    from edgeship.records import EvaluationRequest
    from edgeship.tasks.benchmark import validation_batch
    from edgeship.tasks.compile import CompileInputs, get_target
    from edgeship.tasks.detection.task import Detection
    from edgeship.tasks.host_check import host_check

    trained = untrained_detector(shapes, tmp_path / "model", "concat")
    artifact = get_target("onnx-fp32").compile(CompileInputs(trained=trained, data=shapes, output_dir=tmp_path))
    batch = validation_batch(shapes, tmp_path)
    with np.load(batch.path) as arrays:
        assert arrays.files == ["x"]  # the boxes stay with the pipeline
    with local_agents([{"name": "cam"}]) as (agent,), AgentClient(agent.url, agent.token) as client:
        result = client.evaluate(artifact.path, artifact.target, batch.path,
                                 EvaluationRequest(runtime="onnxruntime", postprocess=artifact.postprocess))
        with pytest.raises(DeviceJobFailed, match="onnxruntime failed on this model"):  # asked for top-1 classes
            client.evaluate(artifact.path, artifact.target, batch.path, EvaluationRequest(runtime="onnxruntime"))
    assert len(result.detections) == batch.samples and result.predictions == []
    scored = Detection().score_device(result, batch)
    assert scored["map"] == pytest.approx(host_check(artifact, shapes).accuracy, abs=1e-6)
    older = result.model_copy(update={"detections": None})  # an agent from before detection answers classes only
    assert "answered no detections" in Detection().score_device(older, batch)


def test_golden_vectors_and_the_shadow_compare_detections_iou_matched(shapes, tmp_path):
    from edgeship.device.install import Golden
    from edgeship.device.shadow import compare
    from edgeship.ota.channel import GoldenVectors
    from edgeship.tasks.data import load_split
    from edgeship.tasks.train import load_model

    trained = untrained_detector(shapes, tmp_path / "model", "separate")
    images, _ = load_split(shapes, "test")
    reference = predict_detections(load_model(trained), trained.detection, images[:6])
    spec = GoldenVectors(target_path="g.npz", sha256="0" * 64, bytes=1, kind="detections", atol=0.05)
    golden = Golden(images[:6], reference, spec)
    assert golden.mismatch(reference) is None
    nudged = reference.copy()
    nudged[..., :4] += 0.5  # sub-pixel moves and small score changes: the same detections
    nudged[..., 4] = np.where(nudged[..., 5] >= 0, nudged[..., 4] * 0.99, 0)
    assert golden.mismatch(nudged) is None
    assert "match the reference's on 0%" in golden.mismatch(np.where(reference[..., 5:] >= 0, reference + [
        [500, 500, 500, 500, 0, 0]], reference))  # every box moved far away
    agreements, samples, diff = compare(reference, reference, "detection")
    assert agreements == samples and diff == 0.0
    agreements, samples, _ = compare(empty(6, 20), reference, "detection")
    assert agreements < samples


def test_telemetry_of_a_detector_summarizes_its_answers_and_scores_drift(shapes, tmp_path):
    from edgeship.device.runtime import InferenceRecord
    from edgeship.device.telemetry import DeviceIdentity, DriftReference, WindowAggregator
    from edgeship.device.telemetry_detection import detection_drift_reference
    from edgeship.tasks.data import load_split
    from edgeship.tasks.train import load_model

    trained = untrained_detector(shapes, tmp_path / "model", "concat")
    images, _ = load_split(shapes, "test")
    packed = predict_detections(load_model(trained), trained.detection, images)
    reference = DriftReference.model_validate(detection_drift_reference(packed, num_classes=4, version="3"))
    aggregator = WindowAggregator(DeviceIdentity(device_id="cam-1"), reference=reference)
    for frame in packed:
        aggregator.on_inference(InferenceRecord(1.0, "active", "3", frame[None], True, task="detection"))
    same = aggregator.close_window()
    found = int((packed[..., 5] >= 0).sum())
    assert same.sums == {"detection.frames": len(images), "detection.detections": found, "detection.empty_frames": 0}
    assert sum(same.classes) == found and sum(same.confidence) == found and same.confidence_histogram.total == found
    per_frame, box_sizes = same.histograms["detection.per_frame"], same.histograms["detection.box_size_px"]
    assert per_frame.total == len(images) and box_sizes.total == found  # the fleet's rollups read these by name
    assert same.drift.score < 1e-6 and same.drift.per_frame_psi == 0 and same.drift.box_size_psi == 0
    for _ in range(len(images)):  # the camera went dark: no detections at all
        aggregator.on_inference(InferenceRecord(1.0, "active", "3", empty(1, 20), True, task="detection"))
    dark = aggregator.close_window()
    assert dark.sums["detection.empty_frames"] == dark.sums["detection.frames"] == len(images)
    assert dark.drift.per_frame_psi > 1 and dark.drift.score > 1


def test_a_detector_whose_outputs_do_not_match_the_declared_layout_is_refused_by_name(shapes):
    params = parse_params({"task": "detection", "targets": ["onnx-fp32"],
                           "model": {"factory": "edgeship.models.detectors:split_head_detector"},
                           "detection": {"layout": "concat"}})
    with pytest.raises(ModelLoadError, match=r"layout 'concat'.*wants one tensor \(2, 8, 84\)"):
        build_detector(params, shapes)


def test_detection_params_refuse_what_the_task_cannot_do_yet():
    from edgeship.errors import ConfigError

    with pytest.raises(ConfigError, match="float targets only for now.*onnx-int8"):
        parse_params({"task": "detection", "targets": ["onnx-fp32", "onnx-int8"]})
    with pytest.raises(ConfigError, match="gates on mAP@0.5:0.95 \\(max_map_drop\\); rename it"):
        parse_params({"task": "detection", "targets": ["onnx-fp32"], "gate": {"onnx-fp32": {"max_accuracy_drop": 1}}})
    with pytest.raises(ConfigError, match="top-1 accuracy"):
        parse_params({"targets": ["onnx-fp32"], "gate": {"onnx-fp32": {"max_map_drop": 1}}})
