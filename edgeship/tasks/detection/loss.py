"""The detection loss: task-aligned assignment (as YOLOv8 trains) on decoded boxes and scores, any layout.

The loss reads what `Decode` gives (boxes (N, A, 4) xyxy pixels, class probabilities (N, A, C)), so every
layout, a user's own detector's included, trains with it unchanged. Per ground-truth box, the points
inside it are ranked by alignment = score(class)^0.5 * IoU^6 and the best `top_k` become its positives
(a point claimed twice goes to the box it overlaps most); their class target is the alignment normalized
to the box's best IoU (so scores rank by localization, which mAP rewards). Loss = 7.5 * (1 - GIoU) on
positives, weighted by their targets, + 0.5 * binary cross-entropy of every score, both over the targets'
sum (Ultralytics' weights).

    >>> loss = detection_loss(boxes, scores, points, targets)
"""

from __future__ import annotations

import torch

TOP_K = 10
ALPHA, BETA = 0.5, 6.0
BOX_WEIGHT, CLASS_WEIGHT = 7.5, 0.5
_EPS = 1e-7


def pad_targets(targets: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image (boxes (k, 4), classes (k,)) -> boxes (N, M, 4), classes (N, M), mask (N, M)."""
    most = max((len(c) for _, c in targets), default=0) or 1
    boxes = torch.zeros(len(targets), most, 4)
    classes = torch.zeros(len(targets), most, dtype=torch.long)
    mask = torch.zeros(len(targets), most, dtype=torch.bool)
    for i, (b, c) in enumerate(targets):
        boxes[i, :len(c)], classes[i, :len(c)], mask[i, :len(c)] = torch.as_tensor(b), torch.as_tensor(c), True
    return boxes, classes, mask


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes a (N, A, 4) with b (N, M, 4), xyxy: (N, A, M)."""
    top_left = torch.maximum(a[:, :, None, :2], b[:, None, :, :2])
    bottom_right = torch.minimum(a[:, :, None, 2:], b[:, None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a[:, :, None] + area_b[:, None, :] - inter + _EPS)


def giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalized IoU of matching boxes a (K, 4) and b (K, 4), xyxy: (K,)."""
    inter = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    area_a, area_b = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1), (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    union = area_a + area_b - inter + _EPS
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).clamp(min=0).prod(-1) + _EPS
    return inter / union - (hull - union) / hull


@torch.no_grad()
def assign(boxes: torch.Tensor, scores: torch.Tensor, points: torch.Tensor, gt_boxes: torch.Tensor,
           gt_classes: torch.Tensor, gt_mask: torch.Tensor, top_k: int = TOP_K
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task-aligned assignment: per point its ground-truth index (N, A), positive mask (N, A), and class targets
    (N, A, C)."""
    n, a, c = scores.shape
    x, y = points[:, 0][None, :, None], points[:, 1][None, :, None]
    inside = ((x > gt_boxes[:, None, :, 0]) & (x < gt_boxes[:, None, :, 2]) & (y > gt_boxes[:, None, :, 1])
              & (y < gt_boxes[:, None, :, 3]) & gt_mask[:, None, :])
    overlaps = pairwise_iou(boxes, gt_boxes) * inside
    class_scores = scores.gather(2, gt_classes[:, None, :].expand(n, a, -1))
    alignment = class_scores.pow(ALPHA) * overlaps.pow(BETA) * inside
    chosen = alignment.topk(min(top_k, a), dim=1).indices  # (N, k, M)
    top = torch.zeros_like(inside).scatter_(1, chosen, True) & inside
    positive = top.any(-1)
    # A point claimed by several boxes goes to the one it overlaps most.
    owner = torch.where(top, overlaps, torch.full_like(overlaps, -1.0)).argmax(-1)  # (N, A)
    picked = torch.zeros_like(top).scatter_(2, owner[..., None], True) & top
    alignment, overlaps = alignment * picked, overlaps * picked
    best_alignment = alignment.amax(1, keepdim=True)
    best_iou = overlaps.amax(1, keepdim=True)
    normalized = (alignment * best_iou / (best_alignment + _EPS)).amax(-1)  # (N, A)
    labels = gt_classes.gather(1, owner)
    targets = torch.zeros(n, a, c)
    targets.scatter_(2, labels[..., None], (normalized * positive)[..., None])
    return owner, positive, targets


def detection_loss(boxes: torch.Tensor, scores: torch.Tensor, points: torch.Tensor,
                   targets: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The training loss of decoded `boxes` (N, A, 4) and class probabilities `scores` (N, A, C)."""
    gt_boxes, gt_classes, gt_mask = pad_targets(targets)
    owner, positive, class_targets = assign(boxes.detach(), scores.detach(), points, gt_boxes, gt_classes, gt_mask)
    total = class_targets.sum().clamp(min=1.0)
    probabilities = scores.clamp(_EPS, 1 - _EPS)
    class_loss = -(class_targets * probabilities.log() + (1 - class_targets) * (1 - probabilities).log()).sum()
    box_loss = boxes.sum() * 0.0
    if positive.any():
        assigned = gt_boxes.gather(1, owner[..., None].expand(-1, -1, 4))
        weight = class_targets.sum(-1)[positive]
        box_loss = ((1.0 - giou(boxes[positive], assigned[positive])) * weight).sum()
    return (BOX_WEIGHT * box_loss + CLASS_WEIGHT * class_loss) / total
