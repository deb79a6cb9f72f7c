"""The layers a quantization plan names, and the precision a plan gives each of them.

The unit a plan names is a *layer* (`quantizable_layers`): a convolution or linear
together with the BatchNorm and activation after it, named like the user's model
names it ("features.3.conv.1" for a Conv-BN-ReLU6 Sequential, "features.3.conv.2"
for a bare projection conv). A plan may also name a block ("features.3": everything
inside it). A module torch.fx cannot trace (`find_untraceable_modules`) stays float.

    >>> [layer.name for layer in quantizable_layers(model)][:2]
    ['features.0', 'features.1.conv.0']
    >>> resolve_plan(model, {"features.1": "float"})["features.1.conv.0"]
    'float'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import nn

from edgeship.errors import CompileError, ConfigError

PRECISIONS = ("int8", "float")
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
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
            if follow and isinstance(follow[0][1], NORMS):
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


def check_plan(plan: Mapping[str, str], model: nn.Module) -> None:
    """Raise ConfigError when the plan names a module the model lacks or a precision other than int8/float."""
    names = dict(model.named_modules())
    unknown = sorted(name for name in plan if name not in names or name == "")
    if unknown:
        raise ConfigError(f"the quantization plan names module(s) {unknown} that {type(model).__name__} does not "
                          f"have; use names from model.named_modules(), e.g. {list(names)[1:4]}")
    bad = {name: precision for name, precision in plan.items() if precision not in PRECISIONS}
    if bad:
        raise ConfigError(f"the quantization plan gives precision(s) {bad}; allowed: {list(PRECISIONS)}")
