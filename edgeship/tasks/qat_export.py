"""The fine-tuned QAT model out of torch: converted and exported as QDQ ONNX, and its float weights saved.

`export_qdq` exports the converted model (falling back to the fake-quant model) and
checks that ONNX Runtime runs integer kernels in it; `save_float_checkpoint` maps the
fine-tuned weights back onto the original float model for targets that quantize the
float model themselves.

    >>> ops = export_qdq(convert(prepared), prepared, (3, 32, 32), Path("model_int8.onnx"))
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.quantize_fx import convert_fx

from edgeship.errors import CompileError
from edgeship.tasks.compile.onnx import export_onnx
from edgeship.tasks.qat_plan import NORMS, quantizable_layers
from edgeship.tasks.qat_prepare import Relu6FakeQuantize
from edgeship.tasks.qdq_onnx import integer_ops_of, keep_float_islands, optimized_op_counts


def save_float_checkpoint(prepared: nn.Module, original: nn.Module, path: Path,
                          sample: torch.Tensor | None = None) -> Path | None:
    """The fine-tuned weights as a state dict of the original (float) model, for targets that quantize themselves.

    Fused QAT modules keep their BatchNorm as `<conv>.bn`; it maps back to the BatchNorm that followed the conv.
    None (with a warning) when some weight has no counterpart, or when the float model rebuilt from the mapped
    weights does not answer like the fine-tuned model on `sample` (a mapping that matched shapes but not
    meaning must never reach a target: it then starts from the trained fp32 weights instead).
    """
    fine_tuned = prepared.state_dict()
    batch_norm_of = {**_batch_norms_after_convs(original),
                     **{layer.members[1]: layer.weighted for layer in quantizable_layers(original)
                        if len(layer.members) > 1 and isinstance(original.get_submodule(layer.members[1]), NORMS)}}
    fused = set(batch_norm_of.values())
    state, missing = {}, []
    for key, value in original.state_dict().items():
        module, _, attr = key.rpartition(".")
        candidates = [key]
        if module in batch_norm_of:  # QAT-fused conv+BN keeps it as <conv>.bn; a float (unquantized) fusion as <conv>.1
            candidates += [f"{batch_norm_of[module]}.bn.{attr}", f"{batch_norm_of[module]}.1.{attr}"]
        if module in fused:  # a float fusion is a Sequential: the conv is its <conv>.0
            candidates.append(f"{module}.0.{attr}")
        found = next((fine_tuned[c] for c in candidates if c in fine_tuned), None)
        if found is None or found.shape != value.shape:
            missing.append(key)
        else:
            state[key] = found.detach().clone()
    if missing:
        warnings.warn(f"the QAT weights of {missing[:3]} have no counterpart in the float model; targets that "
                      f"quantize the float model themselves use the trained fp32 weights", stacklevel=3)
        return None
    agreement = _top1_agreement(prepared, original, state, sample) if sample is not None else 1.0
    if agreement < MIN_CHECKPOINT_AGREEMENT:
        warnings.warn(f"the float model rebuilt from the QAT weights agrees with the QAT model on only "
                      f"{agreement:.1%} of {len(sample)} inputs (needs {MIN_CHECKPOINT_AGREEMENT:.0%}); targets that "
                      f"quantize the float model themselves use the trained fp32 weights", stacklevel=3)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


MIN_CHECKPOINT_AGREEMENT = 0.9  # top-1, float rebuild vs fake-quant QAT model; a wrong mapping lands far below


def _top1_agreement(prepared: nn.Module, original: nn.Module, state: dict, sample: torch.Tensor) -> float:
    """Share of `sample` on which the original architecture with `state` loaded picks the QAT model's class."""
    rebuilt = copy.deepcopy(original)
    rebuilt.load_state_dict(state)
    with torch.no_grad():
        ours = rebuilt.eval()(sample).argmax(1)
        theirs = prepared.eval()(sample).argmax(1)
    return (ours == theirs).float().mean().item()


def _batch_norms_after_convs(model: nn.Module) -> dict[str, str]:
    """BatchNorm module -> the conv feeding it, from the model's FX graph (what prepare_qat_fx fuses); empty when
    the model does not trace symbolically."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001  (an untraceable model: the plan's layer table still covers the zoo's)
        return {}
    modules = dict(model.named_modules())
    pairs = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), NORMS) and node.args:
            source = node.args[0]
            if getattr(source, "op", None) == "call_module" and isinstance(modules.get(source.target), nn.Conv2d):
                pairs[node.target] = source.target
    return pairs


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule | None:
    """convert_fx on a copy; None (with a warning) when conversion fails."""
    try:
        return convert_fx(copy.deepcopy(prepared))
    except Exception as error:  # noqa: BLE001
        warnings.warn(f"convert_fx failed ({type(error).__name__}: {error}); the fake-quantized model is "
                      f"measured and exported instead", stacklevel=3)
        return None


def export_qdq(converted: nn.Module | None, prepared: nn.Module, input_shape: tuple[int, int, int],
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
