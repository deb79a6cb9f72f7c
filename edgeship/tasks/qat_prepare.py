"""A model rewritten for fake quantization on a plan: qconfigs per layer, FX preparation, calibration.

`prepare_model` runs `prepare_qat_fx` with one qconfig per layer from the plan: each
int8 convolution or linear is fused with its BatchNorm and activation and gets
per-channel int8 weights and uint8 activations; a float layer gets no qconfig and
stays a float island. A layer the quantizer has no int8 pattern for stays float too,
with a warning naming it.

A ReLU6 after an int8 conv is folded into the conv's output quantizer (its range is
clamped to [0, 6], so saturation does the clip); ONNX Runtime then runs the conv,
the BatchNorm and the ReLU6 as one QLinearConv instead of leaving a float Clip
between a DequantizeLinear and a QuantizeLinear (measured on MobileNetV2-1.0 at
224x224: 35 float Clips and 1.1x over fp32 without folding).

    >>> prepared = prepare_model(model, {"features.1.conv.0": "float"}, QatParams(), example)
    >>> calibrate(prepared.module, calibration_images)
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.ao.quantization import (FakeQuantize, FusedMovingAvgObsFakeQuantize, MovingAverageMinMaxObserver, QConfig,
                                   QConfigMapping, default_per_channel_weight_fake_quant, disable_fake_quant,
                                   enable_fake_quant, enable_observer, get_default_qat_qconfig_mapping)
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
from torch.ao.quantization.quantize_fx import prepare_qat_fx

from edgeship.config import QatParams
from edgeship.errors import CompileError
from edgeship.tasks.qat_plan import Layer, check_plan, find_untraceable_modules, quantizable_layers, resolve_plan


def int8_qconfig(qat_params: QatParams, relu6: bool = False) -> QConfig:
    """The qconfig of an int8 layer: per-channel symmetric int8 weights, uint8 activations (full range unless
    `reduce_range`); a folded ReLU6 gets an output quantizer that observes relu6(x)."""
    quant_max = 127 if qat_params.reduce_range else 255
    if relu6:
        activation = Relu6FakeQuantize.with_args(observer=Relu6Observer, quant_min=0, quant_max=quant_max,
                                                 dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    else:
        activation = FusedMovingAvgObsFakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0,
                                                             quant_max=quant_max, dtype=torch.quint8)
    # Not the fused per-channel weight quantizer torch's default uses: in torch 2.13 it computes a zero point
    # of -128 for a channel whose (BN-scaled) weights are all positive, then rejects it mid-training.
    return QConfig(activation=activation, weight=default_per_channel_weight_fake_quant)


class Relu6Observer(MovingAverageMinMaxObserver):
    """Observes relu6(x): the range of a conv's output whose ReLU6 the int8 quantizer does by saturating."""

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        super().forward(x_orig.detach().clamp(0.0, 6.0))
        return x_orig


class Relu6FakeQuantize(FakeQuantize):
    """The output quantizer of a conv whose ReLU6 it folds: clips at 6 even while fake quantization is off
    (calibration, a layer switched to float in sensitivity analysis), so the model stays the float model."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return super().forward(X).clamp(0.0, 6.0)


@dataclass
class PreparedModel:
    """A model rewritten for fake quantization, and what the rewrite kept float."""

    module: torch.fx.GraphModule
    layers: list[Layer]
    precisions: dict[str, str]  # layer name -> int8/float, as prepared (unhandled layers are float)
    untraceable: list[str]
    unhandled: list[str]  # layers the plan wanted int8 but the quantizer left float


def prepare_model(model: nn.Module, plan: Mapping[str, str] | None, qat_params: QatParams,
                  example: torch.Tensor, warn: bool = True) -> PreparedModel:
    """`prepare_qat_fx` with one qconfig per layer from the plan (float layers and blocks get none).

    Raises:
        ConfigError: the plan names a module the model does not have, or a precision other than int8/float.
        CompileError: the model cannot be prepared at all.
    """
    plan = dict(plan or {})
    check_plan(plan, model)
    untraceable = find_untraceable_modules(model)
    if warn:
        for name in untraceable:
            warnings.warn(f"module '{name}' ({type(model.get_submodule(name)).__name__}) cannot be traced by "
                          f"torch.fx; it stays float in the int8 model", stacklevel=3)
    layers = quantizable_layers(model)
    precisions = resolve_plan(model, plan, untraceable)
    prepared = _prepare_fx(model, plan, layers, precisions, untraceable, qat_params, example)
    unhandled = [layer.name for layer in layers if precisions[layer.name] == "int8"
                 and not hasattr(_get(prepared, layer.weighted), "weight_fake_quant")]
    if unhandled:
        # The quantizer did not swap in its QAT module (a user's subclass of a conv, say): prepare again with
        # those layers float outright, so nothing inside them (a traced-into functional conv) is quantized either.
        for name in unhandled:
            precisions[name] = "float"
            if warn:
                module = model.get_submodule(next(l.weighted for l in layers if l.name == name))
                warnings.warn(f"layer '{name}' ({type(module).__name__}) has no int8 pattern in the "
                              f"'{qat_params.backend}' quantizer; it stays float", stacklevel=3)
        prepared = _prepare_fx(model, plan, layers, precisions, untraceable, qat_params, example)
    return PreparedModel(prepared, layers, precisions, untraceable, unhandled)


def _prepare_fx(model: nn.Module, plan: Mapping[str, str], layers: list[Layer], precisions: dict[str, str],
                untraceable: list[str], qat_params: QatParams, example: torch.Tensor) -> torch.fx.GraphModule:
    """prepare_qat_fx on a copy of `model`, each layer's members with its precision's qconfig."""
    model = copy.deepcopy(model)
    fold = not qat_params.reduce_range and qat_params.fold_relu6
    mapping: QConfigMapping = get_default_qat_qconfig_mapping(qat_params.backend).set_global(
        int8_qconfig(qat_params))
    for name, precision in plan.items():
        if precision == "float":
            mapping.set_module_name(name, None)
    for layer in layers:
        folded = fold and layer.relu6 is not None and precisions[layer.name] == "int8"
        if folded:  # a ReLU fuses with conv+BN; the output quantizer's clamped range makes it a ReLU6 again
            parent, _, attr = layer.relu6.rpartition(".")
            setattr(model.get_submodule(parent), attr, nn.ReLU())
        qconfig = int8_qconfig(qat_params, relu6=folded) if precisions[layer.name] == "int8" else None
        for member in layer.members:
            mapping.set_module_name(member, qconfig)
    custom = PrepareCustomConfig().set_non_traceable_module_names(list(untraceable))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
            return prepare_qat_fx(model.train(), mapping, (example,), prepare_custom_config=custom)
    except Exception as error:  # noqa: BLE001  (FX raises many types; the message is what matters)
        raise CompileError(f"prepare_qat_fx failed for {type(model).__name__}: {type(error).__name__}: {error}; "
                           f"keep the failing module float with a plan entry, e.g. {{'<module name>': 'float'}}"
                           ) from error


def calibrate(prepared: nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 32) -> None:
    """Set every quantizer's range from `images` (eval mode, fake quantization off meanwhile).

    Moving-average observers average the per-batch min/max evenly over the batches instead of
    letting the first batch dominate; their own averaging constant is restored afterwards.
    """
    images = torch.as_tensor(images, dtype=torch.float32)
    observers = [m for m in prepared.modules() if isinstance(m, MovingAverageMinMaxObserver)
                 or hasattr(m, "averaging_constant")]
    constants = [m.averaging_constant for m in observers]
    was_training = prepared.training
    prepared.eval()
    prepared.apply(enable_observer)
    prepared.apply(disable_fake_quant)
    try:
        with torch.no_grad():
            for index, start in enumerate(range(0, len(images), batch_size)):
                for observer in observers:
                    observer.averaging_constant = 1.0 / (index + 1)
                prepared(images[start:start + batch_size])
    finally:
        for observer, constant in zip(observers, constants):
            observer.averaging_constant = constant
        prepared.apply(enable_fake_quant)
        prepared.train(was_training)
    _store_qparams(prepared)


def _store_qparams(prepared: nn.Module) -> None:
    """Write each quantizer's scale and zero point from its observed range.

    The fused fake quantizers compute them only on a pass with fake quantization on; after a
    calibration with it off, their buffers are stale (per-channel ones even uninitialized), and a
    pass with observers frozen would use them as they are.
    """
    with torch.no_grad():
        for module in prepared.modules():
            if isinstance(module, FakeQuantizeBase) and hasattr(module, "activation_post_process"):
                observer = module.activation_post_process
                if not hasattr(observer, "min_val"):
                    continue  # fixed qparams (sigmoid, tanh, ...): nothing observed
                if not torch.isfinite(observer.min_val).all() or not torch.isfinite(observer.max_val).all():
                    continue  # never saw data (a branch the calibration images do not reach)
                scale, zero_point = module.calculate_qparams()
                module.scale.resize_(scale.shape).copy_(scale)
                module.zero_point.resize_(zero_point.shape).copy_(zero_point)


@contextlib.contextmanager
def quantized_engine(backend: str) -> Iterator[None]:
    """Run quantized torch kernels with the engine the qconfig was made for (x86, fbgemm, qnnpack)."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = backend
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _get(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None
