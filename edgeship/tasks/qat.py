"""The `qat` stage: quantization-aware fine-tuning of the trained model, exported as int8 QDQ ONNX.

Starting from the trained float weights, the model is rewritten with FX graph mode
quantization (`prepare_qat_fx`): each convolution or linear is fused with its
BatchNorm (folded, simulated during training) and activation, and gets the int8
qconfig its layer's precision asks for. Activation ranges are calibrated on the
calibration split, the model is fine-tuned (cosine or step learning rate, optional
distillation from the float model, early stop on validation accuracy), BatchNorm
statistics and then observers freeze after configurable epochs, and the best
validation state is converted (`convert_fx`), evaluated, and exported to ONNX, where
ONNX Runtime fuses the QuantizeLinear / DequantizeLinear pairs into integer kernels
(QLinearConv, QGemm, QLinearAdd, ...); `edgeship.tasks.qdq_onnx.count_integer_ops` checks it did.

A mixed-precision `plan` maps module names (as in `model.named_modules()`) to
"int8" or "float". The unit a plan names is a *layer* (`quantizable_layers`): a
convolution or linear together with the BatchNorm and activation after it, named
like the user's model names it ("features.3.conv.1" for a Conv-BN-ReLU6
Sequential, "features.3.conv.2" for a bare projection conv). A plan may also name a
block ("features.3": everything inside it). A float layer gets no qconfig and stays
a float island in the int8 graph. A module torch.fx cannot trace, or a layer the
quantizer has no int8 pattern for, stays float too, with a warning naming it.

A ReLU6 after an int8 conv is folded into the conv's output quantizer (its range is
clamped to [0, 6], so saturation does the clip); ONNX Runtime then runs the conv,
the BatchNorm and the ReLU6 as one QLinearConv instead of leaving a float Clip
between a DequantizeLinear and a QuantizeLinear (measured on MobileNetV2-1.0 at
224x224: 35 float Clips and 1.1x over fp32 without folding).

    >>> quantized = quantization_aware_train(trained, data, QatParams(epochs=3), Path("models"),
    ...                                      plan={"features.1.conv.0": "float"})
    >>> quantized.integer_ops, quantized.float_ops
    ({'QLinearConv': 30, 'QGemm': 1, ...}, {'Conv': 1})
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.ao.quantization import (FakeQuantize, FusedMovingAvgObsFakeQuantize, MovingAverageMinMaxObserver, QConfig,
                                   QConfigMapping, default_per_channel_weight_fake_quant, disable_fake_quant,
                                   disable_observer, enable_fake_quant, enable_observer,
                                   get_default_qat_qconfig_mapping)
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

from edgeship.config import QatParams
from edgeship.errors import CompileError, ConfigError
from edgeship.records import PreparedData, QuantizedModel, TrainedModel
from edgeship.tasks.compile.onnx import export_onnx
from edgeship.tasks.data import load_split
from edgeship.tasks.qdq_onnx import float_ops_of, integer_ops_of, keep_float_islands, onnx_accuracy, optimized_op_counts
from edgeship.tasks.train import EpochCallback, evaluate, load_model, predict_logits, train_one_epoch

ONNX_NAME = "model_int8.onnx"
CHECKPOINT_NAME = "model_qat_float.pt"
PRECISIONS = ("int8", "float")
SEED = 0
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Identity)


@dataclass(frozen=True)
class Layer:
    """One quantizable layer: a conv or linear with the BatchNorm and activation that follow it."""

    name: str  # what plans and reports call it: the holding Sequential when it is just these modules, else the conv
    weighted: str  # module name of the conv or linear
    members: tuple[str, ...]  # module names: the weighted module, then its BatchNorm and activation
    kind: str  # conv, depthwise, linear
    relu6: str | None = None  # a ReLU6 member, folded into the output quantizer when the layer is int8


def quantizable_layers(model: nn.Module) -> list[Layer]:
    """Every conv and linear of `model` as a Layer, in module order, named as the user's model names it."""
    modules = dict(model.named_modules())
    layers = []
    for name, module in modules.items():
        if not isinstance(module, _WEIGHTED):
            continue
        parent_name, _, own = name.rpartition(".")
        parent = modules[parent_name]
        members = [name]
        if isinstance(parent, nn.Sequential):
            siblings = list(parent.named_children())
            index = [child for child, _ in siblings].index(own)
            follow = siblings[index + 1:]
            if follow and isinstance(follow[0][1], _NORMS):
                members.append(_join(parent_name, follow.pop(0)[0]))
            if follow and isinstance(follow[0][1], _ACTIVATIONS) and not isinstance(follow[0][1], nn.Identity):
                members.append(_join(parent_name, follow.pop(0)[0]))
            whole = index == 0 and not follow and parent_name != ""
            layer_name = parent_name if whole else name
        else:
            layer_name = name
        relu6 = next((m for m in members[1:] if isinstance(modules[m], nn.ReLU6)), None)
        kind = "linear" if isinstance(module, nn.Linear) else (
            "depthwise" if module.groups > 1 and module.groups == module.in_channels else "conv")
        layers.append(Layer(layer_name, name, tuple(members), kind, relu6))
    return layers


def resolve_plan(model: nn.Module, plan: Mapping[str, str] | None, untraceable: list[str] = (),
                 default: str | None = "int8") -> dict[str, str]:
    """Precision of every layer: the plan entry for the layer, its weighted module or the closest enclosing
    module; "float" inside an untraceable module; `default` when nothing says otherwise (None: leave it out)."""
    plan = dict(plan or {})
    resolved = {}
    for layer in quantizable_layers(model):
        precision = plan.get(layer.name) or plan.get(layer.weighted)
        if precision is None:
            ancestors = [name for name in plan if _inside(layer.name, name)]
            precision = plan[max(ancestors, key=len)] if ancestors else default
        if any(_inside(layer.weighted, name) for name in untraceable):
            precision = "float"
        if precision is not None:
            resolved[layer.name] = precision
    return resolved


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
    _check_plan(plan, model)
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
        checkpoint = _save_float_checkpoint(prepared.module, model, out_dir / CHECKPOINT_NAME)
        converted = _convert(prepared.module)
        # A model that did not convert is measured as fake-quantized: the int8 arithmetic it simulates.
        measured = converted if converted is not None else prepared.module
        val_accuracy, test_accuracy = _evaluate_frozen(measured, x_val, y_val), _evaluate_frozen(measured, x_test,
                                                                                                  y_test)
        if val_accuracy < simulated_val - 0.05:
            warnings.warn(f"the converted model scores {val_accuracy:.3f} on val but its fake-quant simulation "
                          f"{simulated_val:.3f}: torch's '{qat_params.backend}' quantized kernels look unreliable "
                          f"on this CPU; trust the ONNX Runtime host check of the exported model", stacklevel=2)
        ops = _export(converted, prepared.module, trained.input_shape, onnx_path)
    onnx_val, onnx_test = onnx_accuracy(onnx_path, x_val, y_val), onnx_accuracy(onnx_path, x_test, y_test)
    float_layers = sorted({name for name, precision in plan.items() if precision == "float"}
                          .union(prepared.untraceable).union(prepared.unhandled))
    return QuantizedModel(onnx_path=onnx_path, val_accuracy=val_accuracy, test_accuracy=test_accuracy,
                          plan=plan, float_layers=float_layers, integer_ops=integer_ops_of(ops),
                          float_ops=float_ops_of(ops), layer_precisions=prepared.precisions,
                          onnx_val_accuracy=onnx_val, onnx_test_accuracy=onnx_test, epochs_run=epochs_run,
                          qat_float_checkpoint=checkpoint, method="qat")


def find_untraceable_modules(model: nn.Module) -> list[str]:
    """Names of the modules torch.fx cannot trace (data-dependent control flow).

    Children are tried before their parent, with the ones already found treated as opaque
    leaves, so a parent is named only when its own forward is what fails (and then its
    children are not named again: keeping the parent float keeps them float).
    """
    if _traces(model, set()):
        return []
    found: list[str] = []
    library_leaf = torch.fx.Tracer().is_leaf_module  # nn.Conv2d, nn.BatchNorm2d, ...: never traced into
    for name, module in _children_first(model):
        if name and library_leaf(module, name):
            continue
        inner = {f[len(name) + 1:] if name else f for f in found if not name or f.startswith(name + ".")}
        if not _traces(module, inner):
            if name == "":
                raise CompileError(f"torch.fx cannot trace the forward of {type(model).__name__} itself; move "
                                   f"data-dependent control flow into a submodule, which can then stay float")
            found.append(name)
    return [name for name in found if not any(name.startswith(outer + ".") for outer in found)]


@contextlib.contextmanager
def quantized_engine(backend: str) -> Iterator[None]:
    """Run quantized torch kernels with the engine the qconfig was made for (x86, fbgemm, qnnpack)."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = backend
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


class _LeafTracer(torch.fx.Tracer):
    """A tracer that does not look inside the named modules."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name in self.leaves or super().is_leaf_module(module, qualified_name)


def _traces(module: nn.Module, leaves: set[str]) -> bool:
    try:
        _LeafTracer(leaves).trace(module)
    except Exception:  # noqa: BLE001  (tracing raises TraceError, TypeError, NotImplementedError, ...)
        return False
    return True


def _children_first(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of the whole tree, every module after all of its descendants."""
    for name, child in module.named_children():
        yield from _children_first(child, f"{prefix}.{name}" if prefix else name)
    yield prefix, module


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _inside(name: str, outer: str) -> bool:
    """Whether module `name` is `outer` or inside it."""
    return name == outer or name.startswith(outer + ".")


def _get(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def _check_plan(plan: Mapping[str, str], model: nn.Module) -> None:
    names = dict(model.named_modules())
    unknown = sorted(name for name in plan if name not in names or name == "")
    if unknown:
        raise ConfigError(f"the quantization plan names module(s) {unknown} that {type(model).__name__} does not "
                          f"have; use names from model.named_modules(), e.g. {list(names)[1:4]}")
    bad = {name: precision for name, precision in plan.items() if precision not in PRECISIONS}
    if bad:
        raise ConfigError(f"the quantization plan gives precision(s) {bad}; allowed: {list(PRECISIONS)}")


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
                from edgeship.tasks.distill import train_one_epoch_distilled

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


def _save_float_checkpoint(prepared: nn.Module, original: nn.Module, path: Path) -> Path | None:
    """The fine-tuned weights as a state dict of the original (float) model, for targets that quantize themselves.

    Fused QAT modules keep their BatchNorm as `<conv>.bn`; it maps back to the BatchNorm that followed the conv.
    None (with a warning) when some weight has no counterpart.
    """
    fine_tuned = prepared.state_dict()
    batch_norm_of = {layer.members[1]: layer.weighted for layer in quantizable_layers(original)
                     if len(layer.members) > 1 and isinstance(original.get_submodule(layer.members[1]), _NORMS)}
    state, missing = {}, []
    for key, value in original.state_dict().items():
        module, _, attr = key.rpartition(".")
        candidates = [key] + ([f"{batch_norm_of[module]}.bn.{attr}"] if module in batch_norm_of else [])
        found = next((fine_tuned[c] for c in candidates if c in fine_tuned), None)
        if found is None or found.shape != value.shape:
            missing.append(key)
        else:
            state[key] = found.detach().clone()
    if missing:
        warnings.warn(f"the QAT weights of {missing[:3]} have no counterpart in the float model; targets that "
                      f"quantize the float model themselves use the trained fp32 weights", stacklevel=3)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def _convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule | None:
    """convert_fx on a copy; None (with a warning) when conversion fails."""
    try:
        return convert_fx(copy.deepcopy(prepared))
    except Exception as error:  # noqa: BLE001
        warnings.warn(f"convert_fx failed ({type(error).__name__}: {error}); the fake-quantized model is "
                      f"measured and exported instead", stacklevel=3)
        return None


def _export(converted: nn.Module | None, prepared: nn.Module, input_shape: tuple[int, int, int],
            path: Path) -> dict[str, int]:
    """Export the converted model as QDQ ONNX; fall back to the fake-quant model. Returns ORT's optimized op census.

    Measured on the digits MobileNetV2: the converted export gives ONNX Runtime 39 integer
    kernels (every conv fused into QLinearConv), 255 KB and 0.24 ms per image; the fake-quant
    export keeps BatchNorm apart from its conv, so only 8 ops run in integer, at 690 KB and 0.81 ms.
    The fake-quant export is therefore only the fallback for a model that does not convert or export.
    """
    failures = []
    candidates = [("converted", lambda: converted)] if converted is not None else []
    candidates.append(("fake-quant", lambda: _exportable_fake_quant(prepared)))
    for kind, build in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            export_onnx(build(), input_shape, path)
            _protect_float_islands(path)
            ops = optimized_op_counts(path)
        except Exception as error:  # noqa: BLE001
            failures.append(f"{kind}: {type(error).__name__}: {error}")
            continue
        if integer_ops_of(ops):
            if failures:
                warnings.warn(f"exported the {kind} model; earlier attempts failed: {failures}", stacklevel=3)
            return ops
        failures.append(f"{kind}: ONNX Runtime runs no integer kernels in the exported graph")
    path.unlink(missing_ok=True)
    raise CompileError("no int8 ONNX export loads in ONNX Runtime with integer kernels: " + "; ".join(failures))


def _protect_float_islands(path: Path) -> None:
    """Keep the plan's float layers float on ONNX Runtime (see `edgeship.tasks.qdq_onnx.keep_float_islands`)."""
    import onnx

    model = onnx.load(str(path))
    if keep_float_islands(model):
        onnx.save(model, str(path))


class _FakeQuantForExport(nn.Module):
    """A frozen FakeQuantize written with the ops the ONNX exporter turns into QuantizeLinear/DequantizeLinear."""

    def __init__(self, fake_quant: nn.Module):
        super().__init__()
        self.enabled = bool(fake_quant.fake_quant_enabled[0])
        self.per_channel = fake_quant.qscheme in (torch.per_channel_affine, torch.per_channel_symmetric)
        self.axis = int(getattr(fake_quant, "ch_axis", 0))
        # ONNX QuantizeLinear saturates to the whole 8-bit range; a reduced range only shaped the scale.
        self.quant_min, self.quant_max = (0, 255) if fake_quant.dtype == torch.quint8 else (-128, 127)
        self.register_buffer("scale", fake_quant.scale.detach().clone().float())
        self.register_buffer("zero_point", fake_quant.zero_point.detach().clone().int())
        self.relu6 = isinstance(fake_quant, Relu6FakeQuantize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x.clamp(0.0, 6.0) if self.relu6 else x
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.axis,
                                                          self.quant_min, self.quant_max)
        return torch.fake_quantize_per_tensor_affine(x, float(self.scale), int(self.zero_point),
                                                     self.quant_min, self.quant_max)


def _exportable_fake_quant(prepared: nn.Module) -> nn.Module:
    """A copy of the prepared (fake-quant) model whose FakeQuantize modules export to ONNX Q/DQ pairs."""
    model = copy.deepcopy(prepared).eval()
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, FakeQuantizeBase):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, _FakeQuantForExport(module))
    return model
