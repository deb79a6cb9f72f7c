"""Post-processing of a detector, per target: where decode + NMS run, and what the file then outputs.

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


def tensorrt_detector(inputs, path: Path) -> tuple[dict, DetectionOutputs]:
    """The tensorrt-fp16 detector: the decoded float graph made static (batch 1), folded, checked, linted and run
    on ONNX Runtime against the torch reference (decode + numpy NMS on both sides), then EfficientNMS_TRT appended
    and checked as far as a machine without TensorRT can."""
    import onnx
    from onnx.tools import update_model_dims

    from edgeship.errors import CompileError
    from edgeship.tasks.compile import exportable_model
    from edgeship.tasks.compile.onnx import INPUT_NAME, export_onnx
    from edgeship.tasks.compile.tensorrt import BUILD_BATCH, check_onnx, fold_constants, polygraphy_lint
    from edgeship.tasks.compile.tracing import TORCH_CAPTURE

    head, shape = inputs.trained.detection, inputs.trained.input_shape
    try:
        with TORCH_CAPTURE:
            export_onnx(exportable_model(inputs), shape, path, output_names=(BOXES, SCORES))
    except Exception as error:  # noqa: BLE001  (the exporter raises many types)
        raise CompileError(f"torch.onnx.export failed for '{inputs.trained.factory}': "
                           f"{type(error).__name__}: {error}") from error
    model = onnx.load(str(path))
    del model.graph.value_info[:]
    model = update_model_dims.update_inputs_outputs_dims(
        model, {INPUT_NAME: [BUILD_BATCH, *shape]},
        {BOXES: [BUILD_BATCH, head.points, 4], SCORES: [BUILD_BATCH, head.points, head.num_classes]})
    onnx.save(onnx.shape_inference.infer_shapes(model, strict_mode=True), str(path))
    notes = {"source": "trained fp32 detector with its decode, torch.onnx.export", "constant_folding":
             fold_constants(path)}
    notes.update(check_onnx(path, int8=False))
    notes["lint"] = polygraphy_lint(path)
    notes["onnxrt_vs_torch"] = _decoded_vs_torch(path, inputs)
    postprocess = add_efficient_nms(path, head)
    notes["nms"] = check_efficient_nms(path, head)
    return notes, postprocess


def _decoded_vs_torch(path: Path, inputs) -> dict:
    """The decoded graph on ONNX Runtime, then the one numpy NMS, against the fp32 torch reference on the test split."""
    from edgeship.device.detections import agreement, nms
    from edgeship.device.runtimes import OnnxRuntimeSession
    from edgeship.tasks.compile.tracing import TORCH_CAPTURE
    from edgeship.tasks.kinds import task_of

    task, head = task_of(inputs.trained), inputs.trained.detection
    from edgeship.tasks.data import load_split

    images, _ = load_split(inputs.data, "test")
    session = OnnxRuntimeSession(path, threads=1)
    packed = np.concatenate([nms(*(session.run_all(images[i:i + 1])[n] for n in (BOXES, SCORES)), head.nms)
                             for i in range(len(images))])
    with TORCH_CAPTURE:
        reference = task.reference(inputs.trained, inputs.data)
    matched, score_diff = agreement(packed, reference)
    return {"runner": "ONNX Runtime CPU, then numpy NMS in place of EfficientNMS_TRT", "images": int(len(images)),
            **task.score(packed, inputs.data), "matched_fraction": matched, "score_diff": score_diff}


def coreml_detector(target, inputs, output_dir: Path):
    """coreml-fp16 for a detector: the decoded ML Program (fp16), then Core ML's NonMaximumSuppression model, in one
    pipeline whose outputs are Vision's (`confidence` (K, C), `coordinates` (K, 4) normalized cx, cy, w, h), so
    Vision returns recognized objects. Checked here: conversion, the pipeline's spec and census; its mAP is the
    torch model's in float16 plus the numpy NMS, labelled as a proxy (Core ML runs on macOS only)."""
    import shutil

    import coremltools as ct
    import torch

    from edgeship.files import sha256_of
    from edgeship.records import CompiledArtifact
    from edgeship.tasks.compile import exportable_model
    from edgeship.tasks.compile.coreml import _quiet, _spec, census, zip_package
    from edgeship.tasks.compile.tracing import TORCH_CAPTURE

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
            from edgeship.errors import CompileError

            raise CompileError(f"the Core ML detector's pipeline holds {kinds}, not an ML Program then NMS")
        notes = {"weights": "trained-fp32", "route": "torch.export", "pipeline": kinds,
                 "census": census(spec.pipeline.models[0]),
                 "proxy": _fp16_proxy(decoded, inputs), "deployment_target": "iOS17 / macOS14 (mlprogram + NMS)"}
    path = zip_package(package, Path(output_dir) / "model_fp16.mlpackage.zip")
    shutil.rmtree(package, ignore_errors=True)
    description = spec.description
    return CompiledArtifact(target=target.name, path=path, sha256=sha256_of(path), bytes=path.stat().st_size,
                            precision=target.precision, runtime=target.runtime,
                            inputs=[_spec(f) for f in description.input],
                            outputs=[_spec(f) for f in description.output],
                            converter={"coremltools": ct.__version__, "torch": torch.__version__}, notes=notes,
                            postprocess=outputs_of(head, "vision", {"confidence": "confidence",
                                                                    "coordinates": "coordinates"}))


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

    from edgeship.tasks.compile.coreml import INPUT_NAME

    program = torch.export.export(module, (torch.zeros(1, *shape),)).run_decompositions({})
    return ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                      compute_precision=ct.precision.FLOAT16,
                      inputs=[ct.TensorType(name=INPUT_NAME, shape=(1, *shape), dtype=np.float32)],
                      outputs=[ct.TensorType(name="raw_confidence", dtype=np.float32),
                               ct.TensorType(name="raw_coordinates", dtype=np.float32)])


def _with_nms(program, head: DetectionHead, class_names: list[str], shape):
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
    from edgeship.tasks.compile.coreml import INPUT_NAME

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
