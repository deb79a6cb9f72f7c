"""The optional `distillation` stage: train the model from a teacher's softened logits plus the labels.

The teacher is a larger model trained first in the same run (`distillation.teacher`:
a factory and kwargs, like `model`), or an existing model given by an MLflow URI
(`distillation.teacher_uri`). The student (`model`) trains as in the `train` stage
(SGD, one-cycle schedule, best validation epoch kept) on

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

(Hinton et al.; the T^2 keeps the soft term's gradient scale independent of T). The
same loss, with the float model as teacher, is what QAT uses when `qat.distill_alpha` > 0.

    >>> teacher = train(data, ModelParams(kwargs={"width_mult": 1.0}), TrainParams(), Path("teacher"))
    >>> student = distill(data, ModelParams(), TrainParams(), DistillationParams(alpha=0.7), load_model(teacher),
    ...                   Path("student"), teacher_name="mobilenet_v2 width 1.0")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeship.config import DistillationParams, ModelParams, TrainParams
from edgeship.errors import ModelLoadError
from edgeship.records import PreparedData, TrainedModel
from edgeship.tasks.data import load_split
from edgeship.tasks.train import EpochCallback, fit, predict_logits, train_one_epoch


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy with the labels."""
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(teacher_logits / temperature, dim=1), log_target=True, reduction="batchmean")
    hard = F.cross_entropy(student_logits, labels)
    return alpha * temperature ** 2 * soft + (1 - alpha) * hard


def train_one_epoch_distilled(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                              teacher: nn.Module | torch.Tensor, optimizer: torch.optim.Optimizer, batch_size: int,
                              generator: torch.Generator, temperature: float, alpha: float,
                              scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                              augment: bool = False) -> tuple[float, float]:
    """One pass over shuffled (x, y) with the distillation loss; returns mean loss and accuracy.

    `teacher` is a module (run on each batch as the student sees it) or its logits for all of
    `x` (fixed inputs only: no augmentation).
    """
    if augment and isinstance(teacher, torch.Tensor):
        raise ValueError("precomputed teacher logits cannot follow augmented images; pass the teacher module")
    if isinstance(teacher, nn.Module):
        teacher.eval()

    def loss(logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if isinstance(teacher, nn.Module):
            with torch.no_grad():
                targets = teacher(images)
        else:
            targets = teacher[index]
        return distillation_loss(logits, targets, labels, temperature, alpha)

    return train_one_epoch(model, x, y, optimizer, batch_size, generator, scheduler=scheduler, augment=augment,
                           loss=loss)


def distill(data: PreparedData, model_params: ModelParams, train_params: TrainParams, params: DistillationParams,
            teacher: nn.Module, out_dir: Path, on_epoch: EpochCallback | None = None,
            teacher_name: str | None = None) -> TrainedModel:
    """Train the student named by `model_params` from `teacher` and the labels; save its best-validation weights.

    `on_epoch(epoch, metrics)` gets train_loss, train_accuracy, val_accuracy and lr after each epoch.
    """
    teacher = teacher.eval()
    targets: nn.Module | torch.Tensor = teacher if train_params.augment else torch.from_numpy(
        predict_logits(teacher, load_split(data, "train")[0]))

    def one_epoch(model, x_train, y_train, optimizer, generator, scheduler):
        return train_one_epoch_distilled(model, x_train, y_train, targets, optimizer, train_params.batch_size,
                                         generator, params.temperature, params.alpha, scheduler=scheduler,
                                         augment=train_params.augment)

    return fit(data, model_params, train_params, out_dir, one_epoch, on_epoch, teacher=teacher_name)


def load_teacher(uri: str, tracking_uri: str | None = None) -> nn.Module:
    """A teacher logged to MLflow as a PyTorch model (models:/name/1, models:/name@alias, runs:/id/model).

    Raises:
        ModelLoadError: MLflow cannot load it as a PyTorch model.
    """
    import mlflow
    import mlflow.pytorch

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    try:
        model = mlflow.pytorch.load_model(uri, map_location="cpu")
    except Exception as error:  # noqa: BLE001  (MlflowException, OSError, unpickling errors)
        raise ModelLoadError(f"cannot load the teacher '{uri}' from MLflow: {type(error).__name__}: {error}; "
                             f"check distillation.teacher_uri (a PyTorch model logged to MLflow)") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"the teacher '{uri}' is a {type(model).__name__}, not a torch.nn.Module")
    try:
        return model.eval()
    except NotImplementedError:  # a torch.export program (MLflow 3's default format) is inference-only already
        return _InferenceOnly(model)


class _InferenceOnly(nn.Module):
    """Wraps a module that refuses train()/eval() (an exported program), so callers can toggle modes freely.

    An exported program may also be specialized to the batch size it was exported with (MLflow's input
    example: 1); then images go through it one at a time.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        object.__setattr__(self, "_wrapped", module)  # not a child: train()/eval() must not reach it
        self._one_at_a_time = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._one_at_a_time:
            try:
                return self._wrapped(x)
            except (AssertionError, RuntimeError):  # the program's guard on the batch dimension
                self._one_at_a_time = True
        return torch.cat([self._wrapped(x[i:i + 1]) for i in range(len(x))])


def agreement(student: nn.Module, teacher: nn.Module, x: np.ndarray) -> float:
    """Fraction of images on which the student's top-1 class is the teacher's."""
    return float((predict_logits(student, x).argmax(1) == predict_logits(teacher, x).argmax(1)).mean())
