"""The optional `pruning` stage's mechanics: structured channel pruning with Torch-Pruning.

Torch-Pruning traces the model into a dependency graph, so removing an output channel of a
conv also removes the matching BatchNorm channel, the next layer's input channel, the
depthwise conv's group and every branch a residual add or a concatenation ties to it. The
channels removed are the least important by L1 weight magnitude or by first-order Taylor
(|weight x gradient| accumulated over a few training batches). The classifier (the last
conv or linear layer to run) and the layers in `pruning.pinned` keep all their channels.

A graph the pruner cannot follow (a hard-coded channel count in `forward`, an op it does not
know) fails with a PruningError naming the layer, and how to pin it.

    >>> pruned = prune_model(load_model(trained), example, PruningParams(importance="taylor"), 0.3,
    ...                      batches=[(x, y)])
    >>> count_macs_params(pruned, example)
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from edgeship.config import PruningParams
from edgeship.errors import PruningError

_PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)


def prune_model(model: nn.Module, example: torch.Tensor, params: PruningParams, ratio: float,
                batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = ()) -> nn.Module:
    """Remove `ratio` of the channels of `model` (in place) and return it.

    `batches` (images, labels) give Taylor importance its gradients; L1 needs none.

    Raises:
        PruningError: a pinned or per-layer name the model lacks, or a graph Torch-Pruning cannot prune
            (the message names the layer).
    """
    import torch_pruning as tp

    model.eval()
    modules = dict(model.named_modules())
    _check_names(params, modules)
    ignored = [modules[name] for name in params.pinned] + [output_layer(model, example)]
    importance = tp.importance.TaylorImportance() if params.importance == "taylor" else \
        tp.importance.MagnitudeImportance(p=1)
    try:
        pruner = _pruner_class()(
            model, example, importance=importance, pruning_ratio=ratio,
            pruning_ratio_dict={modules[name]: r for name, r in params.layer_ratios.items()},
            ignored_layers=ignored, round_to=params.round_to, global_pruning=params.scope == "global",
            max_pruning_ratio=params.max_layer_ratio)
    except Exception as error:  # noqa: BLE001  (tracing runs the user's forward: anything may come out)
        raise PruningError(f"Torch-Pruning cannot trace the model into a dependency graph: {type(error).__name__}: "
                           f"{error}; {_where(model, example)}") from None
    if params.importance == "taylor":
        seen = 0
        model.zero_grad(set_to_none=True)
        for images, labels in batches:
            F.cross_entropy(model(images), labels).backward()
            seen += 1
        if not seen:
            raise PruningError("Taylor importance needs training batches for its gradients; none were given")
    try:
        pruner.step()
    except Exception as error:  # noqa: BLE001
        raise PruningError(f"Torch-Pruning failed to remove channels: {type(error).__name__}: {error}; "
                           f"pin the layer it names in pruning.pinned") from None
    model.zero_grad(set_to_none=True)
    _check_forward(model, example)
    return model


def _pruner_class():
    """Torch-Pruning's pruner, rounding kept channel counts to the nearest multiple of `round_to` (at least one
    multiple) instead of down: rounding down empties every layer narrower than `round_to`."""
    import torch_pruning as tp

    class NearestRoundingPruner(tp.pruner.BasePruner):
        def _round_to(self, n_pruned, current_channels, round_to):
            kept = max(round_to, int(round((current_channels - n_pruned) / round_to)) * round_to)
            return max(current_channels - min(kept, current_channels), 0)

    return NearestRoundingPruner


def output_layer(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The last conv or linear layer to run: the classifier, whose outputs are the classes."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda module, *_: order.append(module))
             for m in model.modules() if isinstance(m, _PRUNABLE)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    if not order:
        raise PruningError("the model has no conv or linear layer to prune")
    return order[-1]


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(multiply-accumulates, parameters) of one forward pass on `example`."""
    import torch_pruning as tp

    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)


def _check_names(params: PruningParams, modules: dict[str, nn.Module]) -> None:
    for key, names in (("pinned", params.pinned), ("layer_ratios", list(params.layer_ratios))):
        unknown = [name for name in names if name not in modules]
        if unknown:
            layers = [n for n, m in modules.items() if isinstance(m, _PRUNABLE)]
            raise PruningError(f"pruning.{key} names {unknown}, which the model does not have; its conv and linear "
                               f"layers are {layers[:12]}{' ...' if len(layers) > 12 else ''}")


def _check_forward(model: nn.Module, example: torch.Tensor) -> None:
    """Run the pruned model once; a shape error is reported with the module it happened in."""
    try:
        with torch.no_grad():
            model(example)
    except RuntimeError as error:
        raise PruningError(f"the pruned model no longer runs: {error}; {_where(model, example)}") from None


def _where(model: nn.Module, example: torch.Tensor) -> str:
    """Which module a failing forward pass was in, and what to do: pin it (or its producer)."""
    names = {module: name for name, module in model.named_modules()}
    stack: list[str] = []
    last_done: list[str] = []

    def enter(module, _inputs):
        stack.append(names.get(module, "?"))

    def leave(module, _inputs, _output):
        last_done[:] = [stack.pop()]

    hooks = [m.register_forward_pre_hook(enter) for m in model.modules()]
    hooks += [m.register_forward_hook(leave) for m in model.modules()]
    try:
        with torch.no_grad():
            model(example)
        return "pin the layer whose channels it cannot follow in pruning.pinned"
    except Exception:  # noqa: BLE001  (we are here to say where it failed)
        inner = stack[-1] if stack else ""
        if inner:
            return (f"it fails inside layer '{inner}': add '{inner}' (or the layer feeding it) to pruning.pinned, "
                    f"or write it so its channel count follows its input")
        after = f" after layer '{last_done[0]}'" if last_done and last_done[0] else ""
        return (f"it fails in the model's own forward{after} (an operation outside any layer, such as a reshape to "
                f"a fixed channel count): pin '{last_done[0] if last_done else 'that layer'}' in pruning.pinned")
    finally:
        for hook in hooks:
            hook.remove()
