"""Detections on the device: the one NMS, the packed answer, IoU matching, and the runtime adapter for detectors.

A detector's answer is one packed array per batch, (N, K, 6), K = `max_detections`: rows
[x1, y1, x2, y2, score, class] in input pixels, best score first, padded with rows of zeros whose
class is -1. Every runtime gives it in the same shape, whatever its file outputs
(`DetectionOutputs.format`): NMS in the graph (ONNX, TensorRT, Core ML) is only unpacked here; a graph
that ends at decoded boxes and scores (LiteRT) gets `nms` here, in numpy. The pipeline uses the same
functions for its fp32 reference, so training, host check, device evaluation and gate share one NMS.

    >>> detector = open_model("onnxruntime", "model.onnx", postprocess=artifact.postprocess, threads=1)
    >>> packed = detector.run(images)                      # (N, K, 6)
    >>> for boxes, scores, classes in unpack(packed): ...
    >>> matched_fraction, score_diff = agreement(packed, reference)

No torch, TensorFlow, MLflow or Prefect here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgeship.errors import ModelLoadError
from edgeship.records import DetectionOutputs, NmsSettings, RuntimeOption, TensorSpec

COLUMNS = 6  # x1, y1, x2, y2, score, class
MATCH_IOU = 0.5  # two detections of the same class agree when their boxes overlap at least this much


def empty(batch: int, max_detections: int) -> np.ndarray:
    packed = np.zeros((batch, max_detections, COLUMNS), dtype=np.float32)
    packed[..., 5] = -1
    return packed


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in `a` (n, 4) with every box in `b` (m, 4), xyxy: (n, m)."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _nms_one_class(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, limit: int) -> list[int]:
    """Greedy NMS as ONNX's NonMaxSuppression does it: best first, drop boxes overlapping a kept one > iou."""
    order = np.argsort(-scores, kind="stable")
    overlaps = iou(boxes[order], boxes[order]) > iou_threshold  # one matrix, then a cheap greedy pass
    removed = np.zeros(len(order), dtype=bool)
    keep: list[int] = []
    for i in range(len(order)):
        if removed[i]:
            continue
        keep.append(int(order[i]))
        if len(keep) == limit:
            break
        removed |= overlaps[i]
    return keep


def nms(boxes: np.ndarray, scores: np.ndarray, settings: NmsSettings) -> np.ndarray:
    """Decoded boxes (N, A, 4) xyxy and class scores (N, A, C) -> packed detections (N, K, 6).

    Per image and class: scores above `score_threshold`, greedy NMS at `iou_threshold` keeping at most
    `max_detections` per class (ONNX NonMaxSuppression's semantics); then the best `max_detections` overall.
    """
    boxes, scores = np.asarray(boxes, dtype=np.float32), np.asarray(scores, dtype=np.float32)
    packed = empty(len(boxes), settings.max_detections)
    for image in range(len(boxes)):
        rows = []
        for cls in range(scores.shape[2]):
            candidates = np.flatnonzero(scores[image, :, cls] > settings.score_threshold)
            if not len(candidates):
                continue
            kept = _nms_one_class(boxes[image, candidates], scores[image, candidates, cls],
                                  settings.iou_threshold, settings.max_detections)
            for index in candidates[kept]:
                rows.append((*boxes[image, index], scores[image, index, cls], cls))
        packed[image] = _pack_rows(rows, settings.max_detections)
    return packed


def _pack_rows(rows, max_detections: int) -> np.ndarray:
    """Rows [x1, y1, x2, y2, score, class] -> (K, 6): best score first (ties: lower class, then order), padded."""
    out = empty(1, max_detections)[0]
    if len(rows):
        rows = np.asarray(rows, dtype=np.float32).reshape(-1, COLUMNS)
        order = np.lexsort((np.arange(len(rows)), rows[:, 5], -rows[:, 4]))[:max_detections]
        out[:len(order)] = rows[order]
    return out


def unpack(packed: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image: boxes (k, 4), scores (k,), classes (k,) int, without the padding."""
    for rows in np.asarray(packed):
        rows = rows[rows[:, 5] >= 0]
        yield rows[:, :4], rows[:, 4], rows[:, 5].astype(np.int64)


def trimmed(packed: np.ndarray) -> list[list[list[float]]]:
    """Packed detections as lists without padding (what an evaluate job answers)."""
    return [np.asarray(rows[rows[:, 5] >= 0], dtype=np.float64).tolist() for rows in np.asarray(packed)]  # exact


def as_objects(packed: np.ndarray) -> list[list[dict]]:
    """Packed detections as what an application reads: per image [{"box": [x1, y1, x2, y2], "score", "class"}]."""
    return [[{"box": [round(float(v), 2) for v in box], "score": round(float(score), 4), "class": int(cls)}
             for box, score, cls in zip(boxes, scores, classes)] for boxes, scores, classes in unpack(packed)]


def repack(rows_per_image: list[list[list[float]]], max_detections: int) -> np.ndarray:
    """The inverse of `trimmed`."""
    if not rows_per_image:
        return empty(0, max_detections)
    return np.stack([_pack_rows(rows, max_detections) for rows in rows_per_image])


def match(a_boxes, a_scores, a_classes, b_boxes, b_scores, b_classes, threshold: float = MATCH_IOU
          ) -> list[tuple[int, int]]:
    """Greedy one-to-one matching of two detection sets: same class, IoU >= threshold, best pairs first."""
    if not len(a_boxes) or not len(b_boxes):
        return []
    overlaps = iou(a_boxes, b_boxes)
    overlaps[np.asarray(a_classes)[:, None] != np.asarray(b_classes)[None, :]] = 0.0
    pairs, used_a, used_b = [], set(), set()
    for flat in np.argsort(-overlaps, axis=None, kind="stable"):
        i, j = divmod(int(flat), overlaps.shape[1])
        if overlaps[i, j] < threshold:
            break
        if i not in used_a and j not in used_b:
            pairs.append((i, j))
            used_a.add(i)
            used_b.add(j)
    return pairs


def frame_agreement(mine: np.ndarray, theirs: np.ndarray, threshold: float = MATCH_IOU
                    ) -> tuple[int, int, float]:
    """One image's packed rows against another's: (matched pairs, the larger set's size, summed |score diff|
    of the matched pairs). Two empty answers agree: (1, 1, 0)."""
    (a_boxes, a_scores, a_classes), = unpack(mine[None])
    (b_boxes, b_scores, b_classes), = unpack(theirs[None])
    union = max(len(a_boxes), len(b_boxes))
    if union == 0:
        return 1, 1, 0.0
    pairs = match(a_boxes, a_scores, a_classes, b_boxes, b_scores, b_classes, threshold)
    diff = float(sum(abs(float(a_scores[i]) - float(b_scores[j])) for i, j in pairs))
    return len(pairs), union, diff


def agreement(packed: np.ndarray, reference: np.ndarray, threshold: float = MATCH_IOU) -> tuple[float, float]:
    """How two batches of detections agree: the IoU-matched fraction (matched pairs over the larger set, summed
    over images) and the mean |score difference| of the matched pairs (0 when none matched)."""
    matched = union = 0
    diff = 0.0
    for mine, theirs in zip(np.asarray(packed), np.asarray(reference)):
        pairs, size, score_diff = frame_agreement(mine, theirs, threshold)
        matched, union, diff = matched + pairs, union + size, diff + score_diff
    return (matched / union if union else 1.0), (diff / matched if matched else 0.0)


# --- what a compiled detector's file outputs -> packed detections ---------------------------------------


def _by_role(outputs: dict[str, np.ndarray], spec: DetectionOutputs, *roles: str) -> list[np.ndarray]:
    missing = [role for role in roles if spec.outputs.get(role) not in outputs]
    if missing:
        raise ModelLoadError(f"the detector's file has no output for {missing} (its outputs: {sorted(outputs)}; "
                             f"the release says {spec.outputs}); compile the target again")
    return [np.asarray(outputs[spec.outputs[role]]) for role in roles]


def postprocess(outputs: dict[str, np.ndarray], spec: DetectionOutputs, batch: int) -> np.ndarray:
    """A runtime's outputs for one batch of `batch` images -> packed detections (N, K, 6)."""
    k = spec.nms.max_detections
    if spec.format == "decoded":
        boxes, scores = _by_role(outputs, spec, "boxes", "scores")
        return nms(boxes, scores, spec.nms)
    if spec.format == "nms_flat":
        index, classes, scores, boxes = _by_role(outputs, spec, "batch", "classes", "scores", "boxes")
        rows = np.concatenate([boxes.reshape(-1, 4), scores.reshape(-1, 1), classes.reshape(-1, 1)], axis=1)
        keep = rows[:, 4] > spec.nms.score_threshold
        index, rows = index.reshape(-1)[keep], rows[keep]
        return np.stack([_pack_rows(rows[index == image], k) for image in range(batch)]) if batch else empty(0, k)
    if spec.format == "nms_padded":
        count, boxes, scores, classes = _by_role(outputs, spec, "count", "boxes", "scores", "classes")
        packed = empty(batch, k)
        for image in range(batch):
            n = int(np.asarray(count).reshape(batch, -1)[image, 0])
            rows = np.concatenate([boxes[image, :n], scores[image, :n, None], classes[image, :n, None]], axis=1)
            packed[image] = _pack_rows(rows, k)
        return packed
    if spec.format == "vision":  # Core ML's NMS: one image, normalized cx, cy, w, h and per-class confidence
        coordinates, confidence = _by_role(outputs, spec, "coordinates", "confidence")
        size = spec.input_size
        cx, cy, w, h = (coordinates.reshape(-1, 4) * size).T
        best = confidence.reshape(len(cx), -1)
        rows = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, best.max(axis=1),
                         best.argmax(axis=1)], axis=1) if len(cx) else np.zeros((0, COLUMNS))
        return _pack_rows(rows[rows[:, 4] > spec.nms.score_threshold], k)[None]
    raise ModelLoadError(f"unknown detection output format '{spec.format}'; this device's edgeship is older than "
                         f"the release: upgrade it")


class Detector:
    """A runtime session of a detector whose `run` answers packed detections (N, K, 6): a Session like any other
    (the runtime, probation, shadow, golden vectors and benchmarks use it unchanged)."""

    task = "detection"

    def __init__(self, session, spec: DetectionOutputs):
        if not hasattr(session, "run_all"):
            raise ModelLoadError(f"the {getattr(session, 'name', 'runtime')} adapter cannot return every output "
                                 f"of a model; upgrade edgeship on this device")
        self.session, self.spec = session, spec
        self.inputs: list[TensorSpec] = session.inputs
        self.outputs = [TensorSpec(name="detections", shape=(1, spec.nms.max_detections, COLUMNS))]
        self.dynamic_batch = session.dynamic_batch
        self.options: dict[str, RuntimeOption] = session.options
        self.name = getattr(session, "name", "")

    def run(self, batch: np.ndarray) -> np.ndarray:
        step = len(batch) if self.session.dynamic_batch else self.session.inputs[0].shape[0]
        if step >= len(batch):
            return postprocess(self.session.run_all(batch), self.spec, len(batch))
        return np.concatenate([self.run(batch[start:start + step]) for start in range(0, len(batch), step)])


def open_model(runtime: str, path: str | Path, threads: int = 0, postprocess: DetectionOutputs | dict | None = None,
               **options: RuntimeOption):
    """`edgeship.device.runtimes.open_session`, answering packed detections when `postprocess` (a detector's
    DetectionOutputs) is given."""
    from edgeship.device.runtimes import open_session

    session = open_session(runtime, path, threads=threads, **options)
    if postprocess is None:
        return session
    return Detector(session, DetectionOutputs.model_validate(postprocess))
