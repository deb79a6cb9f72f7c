"""The `train` stage: fit the float model on the prepared splits and keep its best weights.

The model comes from an import path (`model.factory`, any function returning an
nn.Module); the data from `prepare`. Training is seeded and runs on the CPU: SGD
with Nesterov momentum under a one-cycle schedule, optional light augmentation
(small random shifts), and the weights of the epoch with the best validation
accuracy are the ones saved to `out_dir/model_fp32.pt`.

    >>> trained = train(data, ModelParams(), TrainParams(epochs=10), Path("models"),
    ...                 on_epoch=lambda epoch, metrics: print(epoch, metrics))
    >>> model = load_model(trained)
    >>> evaluate(model, *load_split(data, "test"))
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeship.config import ModelParams, TrainParams
from edgeship.errors import ModelLoadError
from edgeship.models.zoo import build_model
from edgeship.records import PreparedData, TrainedModel
from edgeship.tasks.data import load_split

EpochCallback = Callable[[int, dict[str, float]], None]
CHECKPOINT_NAME = "model_fp32.pt"


def train(data: PreparedData, model_params: ModelParams, train_params: TrainParams, out_dir: Path,
          on_epoch: EpochCallback | None = None) -> TrainedModel:
    """Train the model named by `model_params` and save its best-validation weights.

    `on_epoch(epoch, metrics)` is called after each epoch (1-based) with train_loss,
    train_accuracy, val_accuracy and lr, so a caller can log them (MLflow, a progress bar).

    Raises:
        ModelLoadError: the factory cannot be imported or does not build an nn.Module.
    """
    def one_epoch(model, x_train, y_train, optimizer, generator, scheduler):
        return train_one_epoch(model, x_train, y_train, optimizer, train_params.batch_size, generator,
                               scheduler=scheduler, augment=train_params.augment)

    return fit(data, model_params, train_params, out_dir, one_epoch, on_epoch)


EpochRunner = Callable[..., tuple[float, float]]  # (model, x, y, optimizer, generator, scheduler) -> (loss, acc)


def fit(data: PreparedData, model_params: ModelParams, train_params: TrainParams, out_dir: Path,
        one_epoch: EpochRunner, on_epoch: EpochCallback | None = None, model: nn.Module | None = None,
        **record: object) -> TrainedModel:
    """The training loop shared by plain training, distillation and fine-tuning after pruning: seeded SGD
    with a one-cycle LR, `one_epoch` per epoch, the best-validation weights kept and saved; `model` (e.g. a
    pruned one) instead of a fresh one from the factory; `record` adds fields to the result."""
    torch.manual_seed(train_params.seed)
    generator = torch.Generator().manual_seed(train_params.seed)
    given = model is not None
    if model is None:
        model = build_model(model_params.factory, len(data.classes), data.input_shape[0], model_params.kwargs,
                            input_size=data.input_shape[1])
    x_train, y_train = (torch.from_numpy(a) for a in load_split(data, "train"))
    x_val, y_val = load_split(data, "val")

    optimizer, scheduler = sgd_one_cycle(model, train_params, len(x_train))
    best_accuracy, best_state = -1.0, copy.deepcopy(model.state_dict())
    for epoch in range(1, train_params.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        loss, accuracy = one_epoch(model, x_train, y_train, optimizer, generator, scheduler)
        val_accuracy = evaluate(model, x_val, y_val)
        if val_accuracy > best_accuracy:
            best_accuracy, best_state = val_accuracy, copy.deepcopy(model.state_dict())
        if on_epoch is not None:
            on_epoch(epoch, {"train_loss": loss, "train_accuracy": accuracy, "val_accuracy": val_accuracy, "lr": lr})

    model.load_state_dict(best_state)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / CHECKPOINT_NAME
    if given:  # its architecture may not be the factory's (a pruned model): save it with the weights
        from edgeship.models.pruned import save_checkpoint

        save_checkpoint(model, checkpoint, state_dict=best_state)
    else:
        torch.save(best_state, checkpoint)
    return TrainedModel(checkpoint=checkpoint, factory=model_params.factory, factory_kwargs=dict(model_params.kwargs),
                        num_classes=len(data.classes), input_shape=data.input_shape, val_accuracy=best_accuracy,
                        test_accuracy=evaluate(model, *load_split(data, "test")), **record)


def sgd_one_cycle(model: nn.Module, train_params: TrainParams, samples: int):
    """SGD with Nesterov momentum under a one-cycle LR schedule, stepped per batch: every task's optimizer."""
    optimizer = torch.optim.SGD(model.parameters(), lr=train_params.lr, momentum=0.9, nesterov=True,
                                weight_decay=train_params.weight_decay)
    steps_per_epoch = max(1, num_batches(samples, train_params.batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=train_params.lr, epochs=train_params.epochs,
                                                    steps_per_epoch=steps_per_epoch, pct_start=0.25)
    return optimizer, scheduler


def load_model(trained: TrainedModel) -> nn.Module:
    """Rebuild the trained float model from its factory and checkpoint, in eval mode (a pruned model's
    checkpoint carries its narrowed architecture: edgeship.models.pruned)."""
    from edgeship.models.pruned import STATE_KEY, STRUCTURE_KEY, apply_structure, is_pruned_checkpoint

    model = build_model(trained.factory, trained.num_classes, trained.input_shape[0], trained.factory_kwargs,
                        input_size=trained.input_shape[1], check=False)
    try:
        state = torch.load(trained.checkpoint, map_location="cpu", weights_only=True)
        if is_pruned_checkpoint(state):  # a pruned model: the factory's architecture, narrowed as saved
            apply_structure(model, state[STRUCTURE_KEY], state[STATE_KEY])
        else:
            model.load_state_dict(state)
    except (OSError, RuntimeError, KeyError) as error:
        raise ModelLoadError(f"cannot load weights {trained.checkpoint} into '{trained.factory}' "
                             f"with kwargs {trained.factory_kwargs}: {error}; train the model again") from None
    return model.eval()


def evaluate(model: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor,
             batch_size: int = 256) -> float:
    """Top-1 accuracy of `model` on images `x` (float32 NCHW) with labels `y`."""
    if len(y) == 0:
        return float("nan")
    predictions = predict_logits(model, x, batch_size).argmax(axis=1)
    return float((predictions == np.asarray(y)).mean())


def predict_logits(model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Logits of `model` for images `x` (float32 NCHW), run in eval mode and batches."""
    was_training = model.training
    model.eval()
    x = torch.as_tensor(x, dtype=torch.float32)
    try:
        with torch.no_grad():
            chunks = [model(x[start:start + batch_size]) for start in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, 0), dtype=np.float32)


BatchLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (logits, images as the model saw them, labels, their indices into x) -> the loss to minimise


def train_one_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
                    batch_size: int, generator: torch.Generator,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    augment: bool = False, loss: BatchLoss | None = None) -> tuple[float, float]:
    """One pass over shuffled (x, y); returns mean loss and accuracy.

    `loss` defaults to cross-entropy with the labels; distillation passes its own. Shared with
    quantization-aware training, which fine-tunes the same way.
    """
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for index in batches(len(x), batch_size, generator):
        images, labels = x[index], y[index]
        if augment:
            images = random_shift(images, generator)
        logits = model(images)
        value = F.cross_entropy(logits, labels) if loss is None else loss(logits, images, labels, index)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += float(value.detach()) * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(labels)
    return total_loss / max(seen, 1), correct / max(seen, 1)


def random_shift(images: torch.Tensor, generator: torch.Generator, max_fraction: float = 0.125) -> torch.Tensor:
    """Shift each image by up to `max_fraction` of its size, filling with zeros (no flips: digits are not symmetric)."""
    n, _, height, width = images.shape
    pad_h, pad_w = max(1, int(height * max_fraction)), max(1, int(width * max_fraction))
    padded = F.pad(images, (pad_w, pad_w, pad_h, pad_h))
    dy = torch.randint(0, 2 * pad_h + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad_w + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(height))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width))[:, None, None, :]
    batch = torch.arange(n)[:, None, None, None]
    channel = torch.arange(images.shape[1])[None, :, None, None]
    return padded[batch, channel, rows, cols]


def num_batches(n: int, batch_size: int) -> int:
    """How many batches `batches` yields for n samples."""
    return -(-n // batch_size) - (1 if n % batch_size == 1 else 0)


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches; a trailing batch of one is dropped (BatchNorm cannot train on it)."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        index = order[start:start + batch_size]
        if len(index) > 1:
            yield index
