"""A pruned model's architecture, saved beside its weights so a factory can rebuild it.

Structured pruning removes channels: the pruned model's convolutions, norms and linear
layers are narrower than the ones its factory builds. The checkpoint of a pruned model is
therefore a small mapping, not a bare state dict:

    {"edgeship.pruned_structure": {module name: {attribute: value}}, "state_dict": {...}}

where the attributes are the shape-defining ones (`in_channels`, `out_channels`, `groups`,
`num_features`, `in_features`, `out_features`, ...). Loading builds the model from its factory,
sets those attributes, resizes the parameters and buffers to the saved shapes and loads the
weights. Plain torch only (ints and tensors), so `torch.load(weights_only=True)` reads it and
the pruning library is not needed to load a pruned model.

    >>> save_checkpoint(pruned_model, "model_fp32.pt")
    >>> model = factory(...); load_checkpoint(model, "model_fp32.pt")
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

STRUCTURE_KEY = "edgeship.pruned_structure"
STATE_KEY = "state_dict"
SHAPE_ATTRIBUTES = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features",
                    "num_channels", "num_groups", "normalized_shape", "num_parameters", "embedding_dim")


def structure_of(model: nn.Module) -> dict[str, dict]:
    """Each module's shape-defining attributes (modules that have none are left out)."""
    structure = {}
    for name, module in model.named_modules():
        attributes = {key: _plain(getattr(module, key)) for key in SHAPE_ATTRIBUTES if hasattr(module, key)}
        if attributes:
            structure[name] = attributes
    return structure


def changed_structure(pruned: nn.Module, original: nn.Module) -> dict[str, dict]:
    """The modules whose shape attributes differ between `pruned` and `original`, with the pruned values."""
    before = structure_of(original)
    return {name: attrs for name, attrs in structure_of(pruned).items() if before.get(name) != attrs}


def save_checkpoint(model: nn.Module, path: str | Path, structure: dict[str, dict] | None = None,
                    state_dict: dict | None = None) -> Path:
    """Save weights and the architecture (all shape attributes, or `structure`) in one file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({STRUCTURE_KEY: structure if structure is not None else structure_of(model),
                STATE_KEY: state_dict if state_dict is not None else model.state_dict()}, path)
    return path


def is_pruned_checkpoint(state: object) -> bool:
    return isinstance(state, dict) and STRUCTURE_KEY in state


def apply_structure(model: nn.Module, structure: dict[str, dict], state_dict: dict) -> nn.Module:
    """Reshape `model` (built by its factory) to `structure` and the shapes in `state_dict`, then load it.

    Raises:
        KeyError: `structure` names a module the model does not have (a different factory or kwargs).
    """
    modules = dict(model.named_modules())
    for name, attributes in structure.items():
        if name not in modules:
            raise KeyError(f"the pruned structure names module '{name}', which the factory's model does not have")
        for key, value in attributes.items():
            setattr(modules[name], key, tuple(value) if isinstance(value, list) else value)
    for key, tensor in state_dict.items():
        owner_name, _, leaf = key.rpartition(".")
        owner = modules.get(owner_name)
        if owner is None:
            continue  # load_state_dict reports the unexpected key itself
        current = getattr(owner, leaf, None)
        if isinstance(current, nn.Parameter) and current.shape != tensor.shape:
            setattr(owner, leaf, nn.Parameter(torch.empty_like(tensor, dtype=current.dtype),
                                              requires_grad=current.requires_grad))
        elif isinstance(current, torch.Tensor) and current.shape != tensor.shape:
            owner._buffers[leaf] = torch.empty_like(tensor, dtype=current.dtype)
    model.load_state_dict(state_dict)
    return model


def _plain(value):
    """Attribute values as torch.load(weights_only=True) reads them back: ints, floats, tuples."""
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value
