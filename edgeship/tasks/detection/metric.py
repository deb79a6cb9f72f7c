"""mAP@0.5:0.95 and mAP@0.5 from pycocotools (the COCO evaluator everyone reports), on packed detections.

    >>> scores = mean_average_precision(packed, targets, num_classes=4)
    >>> scores["map"], scores["map50"]
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

from edgeship.device.detections import unpack


def coco_ground_truth(targets, num_classes: int) -> dict:
    """Per-image boxes (xyxy) and classes as a COCO instances document (image ids from 1, category = class + 1)."""
    images, annotations = [], []
    for index, (boxes, classes) in enumerate(targets):
        images.append({"id": index + 1})
        for box, cls in zip(np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(classes).reshape(-1)):
            width, height = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": int(cls) + 1,
                                "bbox": [float(box[0]), float(box[1]), width, height], "area": width * height,
                                "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)]}


def mean_average_precision(packed: np.ndarray, targets, num_classes: int) -> dict[str, float]:
    """COCO bbox mAP of packed detections (N, K, 6) against per-image (boxes, classes): {"map", "map50"}
    as fractions (COCO's maxDets 100). No detections at all scores 0."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(packed) != len(targets):
        raise ValueError(f"{len(packed)} images of detections for {len(targets)} images of ground truth")
    results = []
    for index, (boxes, scores, classes) in enumerate(unpack(packed)):
        for box, score, cls in zip(boxes.astype(np.float64), scores, classes):
            results.append({"image_id": index + 1, "category_id": int(cls) + 1, "score": float(score),
                            "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]})
    if not results or not any(len(c) for _, c in targets):
        return {"map": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        truth = COCO()
        truth.dataset = coco_ground_truth(targets, num_classes)
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {"map": max(0.0, float(evaluation.stats[0])), "map50": max(0.0, float(evaluation.stats[1]))}
