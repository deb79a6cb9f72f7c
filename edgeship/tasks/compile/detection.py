"""Post-processing of a detector, per target: where decode + NMS run, and what the file then outputs.

This module holds the graph pieces; each target module puts them together (`tensorrt.tensorrt_detector`,
`coreml.coreml_detector`, and the ONNX and LiteRT targets inline).

Every detection target converts the same float module, the detector with its `Decode` (boxes (N, A, 4)
xyxy pixels, class probabilities (N, A, C)); what follows differs by runtime (README, "Detection on each
target"):

| target | NMS | outputs (DetectionOutputs.format) |
| --- | --- | --- |
| onnx-* | ONNX `NonMaxSuppression` appended to the graph, float | nms_flat: batch, classes, scores, boxes |
| tensorrt-* | the `EfficientNMS_TRT` plugin appended to the ONNX, built on the device | nms_padded: count, boxes, scores, classes |
| tflite-* | numpy on the device, in the runtime adapter (litert-torch lowers no NMS for this graph) | decoded: boxes, scores |
| coreml-* | Core ML's NonMaximumSuppression model after the ML Program, in one pipeline (Vision's objects) | vision: coordinates, confidence |

    >>> add_onnx_nms(path, trained.detection)          # then artifact.postprocess = onnx_outputs(trained.detection)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeship.records import DetectionHead, DetectionOutputs

BOXES, SCORES = "boxes", "scores"  # the decoded outputs every detection export starts from
ONNX_NMS_OUTPUTS = {"batch": "det_batch", "classes": "det_classes", "scores": "det_scores", "boxes": "det_boxes"}
TRT_NMS_OUTPUTS = {"count": "num_detections", "boxes": "detection_boxes", "scores": "detection_scores",
                   "classes": "detection_classes"}


def outputs_of(head: DetectionHead, format: str, names: dict[str, str]) -> DetectionOutputs:
    return DetectionOutputs(format=format, outputs=names, num_classes=head.num_classes, input_size=head.input_size,
                            nms=head.nms)


def add_onnx_nms(path: Path, head: DetectionHead) -> DetectionOutputs:
    """Append NonMaxSuppression (per class, the release's thresholds) and the gathers after it to an ONNX graph that
    ends at `boxes` and `scores`; the graph then outputs the kept detections of every image (nms_flat)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    graph = model.graph
    nms = head.nms
    constants = [
        helper.make_tensor("nms_max_per_class", TensorProto.INT64, [1], [nms.max_detections]),
        helper.make_tensor("nms_iou", TensorProto.FLOAT, [1], [nms.iou_threshold]),
        helper.make_tensor("nms_score", TensorProto.FLOAT, [1], [nms.score_threshold]),
        helper.make_tensor("nms_col_batch", TensorProto.INT64, [], [0]),
        helper.make_tensor("nms_col_class", TensorProto.INT64, [], [1]),
        helper.make_tensor("nms_col_box", TensorProto.INT64, [], [2]),
        helper.make_tensor("nms_axis1", TensorProto.INT64, [1], [1]),
    ]
    graph.initializer.extend(constants)
    names = ONNX_NMS_OUTPUTS
    graph.node.extend([
        # NonMaxSuppression reads boxes as [y1, x1, y2, x2]; IoU does not change when x and y swap, so xyxy is fine.
        helper.make_node("Transpose", [SCORES], ["nms_scores_by_class"], perm=[0, 2, 1]),
        helper.make_node("NonMaxSuppression", [BOXES, "nms_scores_by_class", "nms_max_per_class", "nms_iou",
                                               "nms_score"], ["nms_selected"], center_point_box=0),
        helper.make_node("Gather", ["nms_selected", "nms_col_batch"], [names["batch"]], axis=1),
        helper.make_node("Gather", ["nms_selected", "nms_col_class"], [names["classes"]], axis=1),
        helper.make_node("Gather", ["nms_selected", "nms_col_box"], ["nms_box_index"], axis=1),
        helper.make_node("GatherND", ["nms_scores_by_class", "nms_selected"], [names["scores"]]),
        helper.make_node("Unsqueeze", [names["batch"], "nms_axis1"], ["nms_batch_column"]),
        helper.make_node("Unsqueeze", ["nms_box_index", "nms_axis1"], ["nms_box_column"]),
        helper.make_node("Concat", ["nms_batch_column", "nms_box_column"], ["nms_box_address"], axis=1),
        helper.make_node("GatherND", [BOXES, "nms_box_address"], [names["boxes"]]),
    ])
    del graph.output[:]
    graph.output.extend([
        helper.make_tensor_value_info(names["batch"], TensorProto.INT64, ["detections"]),
        helper.make_tensor_value_info(names["classes"], TensorProto.INT64, ["detections"]),
        helper.make_tensor_value_info(names["scores"], TensorProto.FLOAT, ["detections"]),
        helper.make_tensor_value_info(names["boxes"], TensorProto.FLOAT, ["detections", 4]),
    ])
    onnx.save(model, str(path))
    return outputs_of(head, "nms_flat", dict(names))


def add_efficient_nms(path: Path, head: DetectionHead) -> DetectionOutputs:
    """Append TensorRT's EfficientNMS_TRT plugin (class-wise NMS, padded outputs) to a static-batch ONNX graph that
    ends at `boxes` and `scores`. ONNX Runtime cannot run the plugin; TensorRT's ONNX parser builds it on the device."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    graph = model.graph
    batch = graph.input[0].type.tensor_type.shape.dim[0].dim_value or 1
    k, names = head.nms.max_detections, TRT_NMS_OUTPUTS
    graph.node.append(helper.make_node(
        "EfficientNMS_TRT", [BOXES, SCORES], [names["count"], names["boxes"], names["scores"], names["classes"]],
        name="efficient_nms", domain="", plugin_version="1", background_class=-1, max_output_boxes=k,
        score_threshold=float(head.nms.score_threshold), iou_threshold=float(head.nms.iou_threshold),
        score_activation=0, class_agnostic=0, box_coding=0))
    del graph.output[:]
    graph.output.extend([
        helper.make_tensor_value_info(names["count"], TensorProto.INT32, [batch, 1]),
        helper.make_tensor_value_info(names["boxes"], TensorProto.FLOAT, [batch, k, 4]),
        helper.make_tensor_value_info(names["scores"], TensorProto.FLOAT, [batch, k]),
        helper.make_tensor_value_info(names["classes"], TensorProto.INT32, [batch, k]),
    ])
    onnx.save(model, str(path))
    return outputs_of(head, "nms_padded", dict(names))


def check_efficient_nms(path: Path, head: DetectionHead) -> dict:
    """What can be checked of the EfficientNMS_TRT graph without a GPU: one plugin node wired to the decoded outputs
    with the release's thresholds (the graph before it passed the full check already: tensorrt_detector)."""
    import onnx

    from edgeship.errors import CompileError

    model = onnx.load(str(path))
    plugins = [node for node in model.graph.node if node.op_type == "EfficientNMS_TRT"]
    if len(plugins) != 1 or list(plugins[0].input) != [BOXES, SCORES]:
        raise CompileError(f"{path.name}: expected one EfficientNMS_TRT node on ({BOXES}, {SCORES}), found "
                           f"{[(n.op_type, list(n.input)) for n in plugins]}")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in plugins[0].attribute}
    wanted = {"max_output_boxes": head.nms.max_detections, "class_agnostic": 0}
    wrong = {k: attributes.get(k) for k, v in wanted.items() if attributes.get(k) != v}
    if wrong or abs(attributes["iou_threshold"] - head.nms.iou_threshold) > 1e-6:
        raise CompileError(f"{path.name}: EfficientNMS_TRT attributes {attributes} do not match the release's NMS "
                           f"{head.nms.model_dump()}")
    # No onnx.checker here: it has no schema for a plugin op (TensorRT's parser finds the plugin by its op type).
    return {"plugin": "EfficientNMS_TRT v1", "attributes": {k: (round(v, 6) if isinstance(v, float) else v)
                                                             for k, v in attributes.items()},
            "measured": "not here: TensorRT builds and runs the plugin on an NVIDIA device only"}


def match_outputs(outputs: dict[str, np.ndarray], boxes: np.ndarray, scores: np.ndarray) -> dict[str, str]:
    """Which of a converted file's outputs is `boxes` and which `scores`, by value against the torch module's own
    (converters rename and reorder outputs; values do not lie)."""
    from edgeship.errors import CompileError

    found = {}
    for role, expected in ((BOXES, boxes), (SCORES, scores)):
        close = [name for name, value in outputs.items()
                 if value.shape == expected.shape and np.allclose(value, expected, atol=1e-2, rtol=1e-2)]
        if len(close) != 1:
            raise CompileError(f"cannot tell the converted detector's {role} output among "
                               f"{ {n: v.shape for n, v in outputs.items()} } (matching by value: {close})")
        found[role] = close[0]
    return found


def litert_postprocess(artifact, inputs) -> DetectionOutputs:
    """A LiteRT detector's DetectionOutputs: its decoded outputs, told apart by running one test image through the
    file and the torch module; NMS then runs in numpy on the device (edgeship.device.detections)."""
    import torch

    from edgeship.device.runtimes import LiteRTSession
    from edgeship.tasks.compile import exportable_model
    from edgeship.tasks.data import load_split

    images, _ = load_split(inputs.data, "test")
    image = images[:1].astype(np.float32)
    with torch.no_grad():
        boxes, scores = (t.numpy() for t in exportable_model(inputs)(torch.from_numpy(image)))
    names = match_outputs(LiteRTSession(artifact.path, threads=1).run_all(image), boxes, scores)
    return outputs_of(inputs.trained.detection, "decoded", names)

