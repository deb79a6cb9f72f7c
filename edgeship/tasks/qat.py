"""The `qat` stage: quantization-aware fine-tuning of the trained model, exported as int8 QDQ ONNX.

Starting from the trained float weights, the model is rewritten for fake quantization
on the plan (`edgeship.tasks.qat_prepare`: FX graph mode, each convolution or linear
fused with its BatchNorm and activation, with the qconfig its layer's precision asks
for). Activation ranges are calibrated on the calibration split, the model is
fine-tuned here (cosine or step learning rate, optional distillation from the float
model, early stop on validation accuracy), BatchNorm statistics and then observers
freeze after configurable epochs, and the best validation state is converted,
evaluated, and exported to ONNX (`edgeship.tasks.qat_export`), where ONNX Runtime
fuses the QuantizeLinear / DequantizeLinear pairs into integer kernels (QLinearConv,
QGemm, QLinearAdd, ...); `edgeship.tasks.qdq_onnx.count_integer_ops` checks it did.

A mixed-precision `plan` maps module names (as in `model.named_modules()`) to
"int8" or "float"; what a plan names and how it resolves per layer is
`edgeship.tasks.qat_plan`. A float layer stays a float island in the int8 graph.

    >>> quantized = quantization_aware_train(trained, data, QatParams(epochs=3), Path("models"),
    ...                                      plan={"features.1.conv.0": "float"})
    >>> quantized.integer_ops, quantized.float_ops
    ({'QLinearConv': 30, 'QGemm': 1, ...}, {'Conv': 1})
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Mapping

import torch
from torch import nn
from torch.ao.quantization import disable_observer, enable_observer
from torch.ao.quantization.fake_quantize import FakeQuantizeBase

from edgeship.config import QatParams
from edgeship.records import PreparedData, QuantizedModel, TrainedModel
from edgeship.tasks.data import load_split
from edgeship.tasks.distill import train_one_epoch_distilled
from edgeship.tasks.qat_export import convert, export_qdq, save_float_checkpoint
from edgeship.tasks.qat_prepare import calibrate, prepare_model, quantized_engine
from edgeship.tasks.qdq_onnx import float_ops_of, integer_ops_of, onnx_accuracy
from edgeship.tasks.train import EpochCallback, evaluate, load_model, predict_logits, train_one_epoch

ONNX_NAME = "model_int8.onnx"
CHECKPOINT_NAME = "model_qat_float.pt"
SEED = 0


def quantization_aware_train(trained: TrainedModel, data: PreparedData, qat_params: QatParams, out_dir: Path,
                             plan: Mapping[str, str] | None = None,
                             on_epoch: EpochCallback | None = None) -> QuantizedModel:
    """Fine-tune `trained` with fake quantization on `plan`, convert it, and export `out_dir/model_int8.onnx`.

    `plan` is a {module name: "int8" | "float"} mapping (a PrecisionPlan's `layers` is one);
    layers it does not name are int8. `on_epoch(epoch, metrics)` gets train_loss,
    train_accuracy, val_accuracy (of the fake-quantized model) and lr after each epoch (1-based).

    Raises:
        ConfigError: the plan names a module the model does not have, or a precision other than int8/float.
        CompileError: the model cannot be prepared for QAT at all, or no ONNX export of it loads
            in ONNX Runtime.
    """
    plan = dict(plan or {})
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    model = load_model(trained).train()

    x_train, y_train = (torch.from_numpy(a) for a in load_split(data, "train"))
    x_val, y_val = load_split(data, "val")
    x_test, y_test = load_split(data, "test")
    out_dir = Path(out_dir)
    onnx_path = out_dir / ONNX_NAME
    with quantized_engine(qat_params.backend):
        prepared = prepare_model(model, plan, qat_params, x_train[:2])
        if qat_params.calibrate:
            calibrate(prepared.module, load_split(data, "calibration")[0])
        teacher = None
        if qat_params.distill_alpha > 0:
            teacher = load_model(trained)
        simulated_val, epochs_run = _fine_tune(prepared.module, qat_params, x_train, y_train, x_val, y_val,
                                               generator, on_epoch, teacher)
        prepared.module.eval()
        checkpoint = save_float_checkpoint(prepared.module, model, out_dir / CHECKPOINT_NAME,
                                           sample=torch.from_numpy(x_val[:256]))
        converted = convert(prepared.module)
        # A model that did not convert is measured as fake-quantized: the int8 arithmetic it simulates.
        measured = converted if converted is not None else prepared.module
        val_accuracy, test_accuracy = _evaluate_frozen(measured, x_val, y_val), _evaluate_frozen(measured, x_test,
                                                                                                  y_test)
        if val_accuracy < simulated_val - 0.05:
            warnings.warn(f"the converted model scores {val_accuracy:.3f} on val but its fake-quant simulation "
                          f"{simulated_val:.3f}: torch's '{qat_params.backend}' quantized kernels look unreliable "
                          f"on this CPU; trust the ONNX Runtime host check of the exported model", stacklevel=2)
        ops = export_qdq(converted, prepared.module, trained.input_shape, onnx_path)
    onnx_val, onnx_test = onnx_accuracy(onnx_path, x_val, y_val), onnx_accuracy(onnx_path, x_test, y_test)
    float_layers = sorted({name for name, precision in plan.items() if precision == "float"}
                          .union(prepared.untraceable).union(prepared.unhandled))
    return QuantizedModel(onnx_path=onnx_path, val_accuracy=val_accuracy, test_accuracy=test_accuracy,
                          plan=plan, float_layers=float_layers, integer_ops=integer_ops_of(ops),
                          float_ops=float_ops_of(ops), layer_precisions=prepared.precisions,
                          onnx_val_accuracy=onnx_val, onnx_test_accuracy=onnx_test, epochs_run=epochs_run,
                          qat_float_checkpoint=checkpoint, method="qat")


def _lr_at(qat_params: QatParams, epoch: int) -> float:
    """Learning rate of a (0-based) epoch under the configured schedule."""
    if qat_params.lr_schedule == "constant" or qat_params.epochs == 1:
        return qat_params.lr
    if qat_params.lr_schedule == "step":
        return qat_params.lr * (0.1 if epoch >= max(1, qat_params.epochs // 2) else 1.0)
    return qat_params.lr * 0.5 * (1 + math.cos(math.pi * epoch / qat_params.epochs))


def _fine_tune(prepared: nn.Module, qat_params: QatParams, x_train: torch.Tensor, y_train: torch.Tensor,
               x_val, y_val, generator: torch.Generator, on_epoch: EpochCallback | None,
               teacher: nn.Module | None) -> tuple[float, int]:
    """QAT epochs; BN stats then observers freeze; early stop on validation accuracy.

    Keeps the best-validation state; returns its accuracy and how many epochs ran.
    """
    optimizer = torch.optim.SGD(prepared.parameters(), lr=qat_params.lr, momentum=0.9)
    # The calibrated starting point competes too: QAT that only makes things worse is not kept.
    best_accuracy, best_state = _evaluate_frozen(prepared, x_val, y_val), copy.deepcopy(prepared.state_dict())
    since_best, epochs_run = 0, 0
    teacher_logits = None
    if teacher is not None:  # fixed inputs (no augmentation in QAT): the teacher's logits are computed once
        teacher_logits = torch.from_numpy(predict_logits(teacher, x_train))
    for epoch in range(qat_params.epochs):
        if epoch >= qat_params.freeze_bn_after_epoch:
            prepared.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
        if epoch >= qat_params.freeze_observers_after_epoch:
            prepared.apply(disable_observer)
        lr = _lr_at(qat_params, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            if teacher_logits is None:
                loss, accuracy = train_one_epoch(prepared, x_train, y_train, optimizer, qat_params.batch_size,
                                                 generator)
            else:
                loss, accuracy = train_one_epoch_distilled(prepared, x_train, y_train, teacher_logits, optimizer,
                                                           qat_params.batch_size, generator,
                                                           qat_params.distill_temperature, qat_params.distill_alpha)
        except RuntimeError as error:  # NaN weights make the fake quantizers' qparams invalid
            warnings.warn(f"QAT diverged in epoch {epoch + 1} ({error}); keeping the best state before it. Lower "
                          f"qat.lr, or keep the layers that overflow float (see the sensitivity report)",
                          stacklevel=3)
            break
        epochs_run += 1
        if not math.isfinite(loss):
            warnings.warn(f"QAT loss is {loss} in epoch {epoch + 1}; keeping the best state before it. Lower qat.lr, "
                          f"or keep the layers that overflow float (see the sensitivity report)", stacklevel=3)
            break
        val_accuracy = _evaluate_frozen(prepared, x_val, y_val)
        if val_accuracy > best_accuracy:
            best_accuracy, best_state, since_best = val_accuracy, copy.deepcopy(prepared.state_dict()), 0
        else:
            since_best += 1
        if on_epoch is not None:
            on_epoch(epoch + 1, {"train_loss": loss, "train_accuracy": accuracy, "val_accuracy": val_accuracy,
                                 "lr": lr})
        if qat_params.early_stop_patience is not None and since_best >= qat_params.early_stop_patience:
            break
    prepared.load_state_dict(best_state)
    return best_accuracy, epochs_run


def _evaluate_frozen(model: nn.Module, x, y) -> float:
    """Accuracy with every quantizer's observer off meanwhile: evaluation must not move the quantization ranges."""
    quantizers = [m for m in model.modules() if isinstance(m, FakeQuantizeBase)]
    observing = [bool(m.observer_enabled[0]) for m in quantizers]
    model.apply(disable_observer)
    try:
        return evaluate(model, x, y)
    finally:
        for quantizer, on in zip(quantizers, observing):
            if on:
                quantizer.apply(enable_observer)


