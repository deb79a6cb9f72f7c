"""Shared by the quantization tests: digits at 8x8, a tiny MobileNetV2 trained once per module, and a
deliberately fragile copy of it.

The fragile copy: one input channel of the projection conv `features.2.conv.2` is dead (its
producer's BatchNorm pins it below zero, so ReLU6 makes it exactly 0) and that conv's weights on
the dead channel are 1000x the largest weight. The float model computes the same thing
(0 x anything = 0), but per-channel int8 weights of that conv round every real weight to zero.
"""

from __future__ import annotations

import pytest
import torch

from edgeship.config import DataParams, ModelParams, TrainParams
from edgeship.records import PreparedData, TrainedModel
from edgeship.tasks.data import export_digits, prepare
from edgeship.tasks.train import load_model, train

TINY_MOBILENET = ModelParams(kwargs={"width_mult": 0.35, "stages": 3, "stem_stride": 1, "dropout": 0.0})
FRAGILE_LAYER = "features.2.conv.2"


def make_fragile(trained: TrainedModel, path, layer: str = FRAGILE_LAYER, producer: str = "features.2.conv.1.1",
                 channel: int = 0) -> TrainedModel:
    """A copy whose `layer` carries a huge weight on an input channel that is always zero."""
    model = load_model(trained)
    with torch.no_grad():
        norm = model.get_submodule(producer)
        norm.weight[channel], norm.bias[channel] = 1e-3, -10.0  # BN output < 0 always: ReLU6 gives exactly 0
        weight = model.get_submodule(layer).weight
        weight[:, channel] = 1000 * weight.abs().max()
    torch.save(model.state_dict(), path)
    return trained.model_copy(update={"checkpoint": path})


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> PreparedData:
    root = tmp_path_factory.mktemp("digits")
    export_digits(root / "raw")
    return prepare(root / "raw", root / "prepared", DataParams(input_size=8, calibration_size=32))


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory) -> TrainedModel:
    return train(digits, TINY_MOBILENET, TrainParams(epochs=5, lr=0.05), tmp_path_factory.mktemp("fp32"))


@pytest.fixture(scope="module")
def fragile(trained, tmp_path_factory) -> TrainedModel:
    return make_fragile(trained, tmp_path_factory.mktemp("fragile") / "fragile.pt")
