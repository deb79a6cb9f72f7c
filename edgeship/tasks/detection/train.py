"""Training a detector: the detection loss on decoded outputs, box-moving augmentation, best val mAP kept.

The loop is classification's (edgeship.tasks.train: seeded SGD, one-cycle LR, batches) with the detection
loss (edgeship.tasks.detection.loss) and val mAP@0.5:0.95 (pycocotools) as the measure of the best epoch.
With `train.augment`, each batch is flipped left-right at random and shifted by up to 1/8 of its side, its
boxes moved with it (boxes left with under 2 px of width or height are dropped).

    >>> trained = train_detector(data, params, Path("models"), on_epoch=print)
    >>> packed = predict_detections(load_model(trained), trained.detection, images)   # (N, K, 6)
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeship.config import Params
from edgeship.device.detections import nms
from edgeship.models.zoo import build_model
from edgeship.records import DetectionHead, PreparedData, TrainedModel
from edgeship.tasks.detection.data import Targets, load_raw_images, load_targets
from edgeship.tasks.detection.decode import Decode, check_outputs, detection_head
from edgeship.tasks.detection.loss import detection_loss
from edgeship.tasks.detection.metric import mean_average_precision
from edgeship.tasks.train import CHECKPOINT_NAME, EpochCallback, batches, sgd_one_cycle

_MIN_SIDE_PX = 2.0


def build_detector(params: Params, data: PreparedData) -> tuple[nn.Module, DetectionHead]:
    """The model from `model.factory` for this data, checked against the declared output layout."""
    channels, size = data.input_shape[0], data.input_shape[1]
    head = detection_head(params.detection, len(data.classes), size)
    model = build_model(params.model.factory, len(data.classes), channels, params.model.kwargs, input_size=size,
                        check=False)
    check_outputs(model, head, params.model.factory, channels)
    return model, head


def train_detector(data: PreparedData, params: Params, out_dir: Path,
                   on_epoch: EpochCallback | None = None) -> TrainedModel:
    """Train `model.factory` on the detection splits; save the weights of the best val mAP epoch."""
    train_params = params.train
    torch.manual_seed(train_params.seed)
    generator = torch.Generator().manual_seed(train_params.seed)
    model, head = build_detector(params, data)
    images = torch.from_numpy(load_raw_images(data, "train"))
    _, targets = load_targets(data, "train")
    val_images, val_targets = load_targets(data, "val")
    decode = Decode(head)
    optimizer, scheduler = sgd_one_cycle(model, train_params, len(images))
    best, best_state = -1.0, copy.deepcopy(model.state_dict())
    for epoch in range(1, train_params.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        total, seen = 0.0, 0
        for index in batches(len(images), train_params.batch_size, generator):
            batch = images[index].float() / 255.0
            batch_targets = [(torch.from_numpy(targets[i][0]), torch.from_numpy(targets[i][1])) for i in index]
            if train_params.augment:
                batch, batch_targets = augment(batch, batch_targets, generator)
            boxes, scores = decode(model(batch))
            loss = detection_loss(boxes, scores, decode.points, batch_targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total, seen = total + float(loss.detach()) * len(index), seen + len(index)
        val_map = evaluate_detector(model, head, val_images, val_targets)
        if val_map["map"] > best:
            best, best_state = val_map["map"], copy.deepcopy(model.state_dict())
        if on_epoch is not None:
            on_epoch(epoch, {"train_loss": total / max(seen, 1), "val_map": val_map["map"],
                             "val_map50": val_map["map50"], "lr": lr})
    model.load_state_dict(best_state)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / CHECKPOINT_NAME
    torch.save(best_state, checkpoint)
    test = evaluate_detector(model, head, *load_targets(data, "test"))
    return TrainedModel(checkpoint=checkpoint, factory=params.model.factory, factory_kwargs=dict(params.model.kwargs),
                        num_classes=len(data.classes), input_shape=data.input_shape, val_accuracy=best,
                        test_accuracy=test["map"], task="detection", detection=head, metrics={"map50": test["map50"]})


def predict_detections(model: nn.Module, head: DetectionHead, images: np.ndarray, batch_size: int = 64
                       ) -> np.ndarray:
    """Packed detections (N, K, 6) of the torch model: `Decode`, then the one NMS (edgeship.device.detections)."""
    decode = Decode(head)
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                boxes, scores = decode(model(torch.as_tensor(images[start:start + batch_size], dtype=torch.float32)))
                chunks.append(nms(boxes.numpy(), scores.numpy(), head.nms))
    finally:
        model.train(was_training)
    return np.concatenate(chunks) if chunks else np.zeros((0, head.nms.max_detections, 6), np.float32)


def evaluate_detector(model: nn.Module, head: DetectionHead, images: np.ndarray, targets: Targets) -> dict[str, float]:
    """mAP@0.5:0.95 ("map") and mAP@0.5 ("map50") of the torch model."""
    return mean_average_precision(predict_detections(model, head, images), targets, head.num_classes)


def augment(images: torch.Tensor, targets: list, generator: torch.Generator, max_fraction: float = 0.125):
    """Random left-right flip and shift of each image, its boxes moved with it (and clipped, or dropped)."""
    n, _, height, width = images.shape
    flips = torch.rand(n, generator=generator) < 0.5
    pad_y, pad_x = max(1, int(height * max_fraction)), max(1, int(width * max_fraction))
    dy = torch.randint(-pad_y, pad_y + 1, (n,), generator=generator)
    dx = torch.randint(-pad_x, pad_x + 1, (n,), generator=generator)
    out, moved = torch.zeros_like(images), []
    for i in range(n):
        image, (boxes, classes) = images[i], targets[i]
        boxes = boxes.clone().float()
        if flips[i]:
            image = image.flip(-1)
            boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
        y, x = int(dy[i]), int(dx[i])
        out[i, :, max(0, y):height + min(0, y), max(0, x):width + min(0, x)] = \
            image[:, max(0, -y):height - max(0, y), max(0, -x):width - max(0, x)]
        boxes += torch.tensor([x, y, x, y], dtype=boxes.dtype)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clamp(0, width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clamp(0, height)
        keep = ((boxes[:, 2] - boxes[:, 0]) >= _MIN_SIDE_PX) & ((boxes[:, 3] - boxes[:, 1]) >= _MIN_SIDE_PX)
        moved.append((boxes[keep], classes[keep]))
    return out, moved
