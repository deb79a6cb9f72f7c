"""A user's own model and data as they come: factories by signature, class paths, RGB at its own size,
and one clear error for a factory that returns no module, an input size the model cannot take, and a
folder that mixes image modes."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from edgeship.config import DataParams, ModelParams, TrainParams
from edgeship.errors import DataError, ModelLoadError
from edgeship.models.zoo import build_model

USER_MODELS = '''
    import torch
    from torch import nn

    def only_classes(num_classes):                      # takes no in_channels: it is not offered one
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    class Net(nn.Module):                               # a class path works as a function does
        def __init__(self, num_classes, in_channels, input_size, width=8):
            super().__init__()
            self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
            self.fc = nn.Linear(width * input_size * input_size, num_classes)
        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    def anything(input_size, **kwargs):                 # **kwargs: num_classes and in_channels too
        anything.seen = {"input_size": input_size, **kwargs}
        return nn.Sequential(nn.Flatten(), nn.Linear(kwargs["in_channels"] * input_size ** 2,
                                                     kwargs["num_classes"]))

    def not_a_module(num_classes):
        return {"layers": num_classes}

    def fixed_8x8(num_classes, in_channels):            # flattens 8x8 only
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, num_classes))
'''


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    (tmp_path / "user_models.py").write_text(textwrap.dedent(USER_MODELS))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_models"
    sys.modules.pop("user_models", None)


def test_a_factory_gets_only_what_its_signature_takes_and_a_class_path_works(user_models):
    import torch

    model = build_model(f"{user_models}:only_classes", 10, 1, input_size=8)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    net = build_model(f"{user_models}:Net", 4, 3, {"width": 4}, input_size=32)
    assert net.conv.out_channels == 4 and net(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    build_model(f"{user_models}:anything", 5, 3, {"extra": 1}, input_size=12)
    assert sys.modules[user_models].anything.seen == {"num_classes": 5, "in_channels": 3, "input_size": 12,
                                                      "extra": 1}


def test_a_factory_that_returns_no_module_or_cannot_take_the_input_gets_one_clear_error(user_models):
    with pytest.raises(ModelLoadError, match=r"returned dict, not a torch.nn.Module; return the model itself"):
        build_model(f"{user_models}:not_a_module", 10, 1, input_size=16)
    with pytest.raises(ModelLoadError, match=r"cannot take images of shape \(1, 16, 16\).*set data.input_size"):
        build_model(f"{user_models}:fixed_8x8", 10, 1, input_size=16)
    with pytest.raises(ModelLoadError, match=r"rejected its arguments.*fix model.kwargs"):
        build_model(f"{user_models}:Net", 10, 1, {"depth": 3}, input_size=8)


def _folder(root, modes_per_class: dict[str, list[str]], size: int = 32):
    rng = np.random.default_rng(0)
    for name, modes in modes_per_class.items():
        (root / name).mkdir(parents=True)
        for index, mode in enumerate(modes):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels, mode="RGB").convert(mode).save(root / name / f"{index}.png")
    return root


def test_a_folder_that_mixes_image_modes_is_refused_with_the_fix(tmp_path):
    from edgeship.tasks.data import prepare

    raw = _folder(tmp_path / "raw", {"cat": ["RGB"] * 4, "dog": ["RGB"] * 3 + ["L"]})
    with pytest.raises(DataError, match=r"mixes image modes: 7 RGB .*, 1 L .*convert them to one mode"):
        prepare(raw, tmp_path / "prepared", DataParams(channels=3, input_size=32))


@pytest.mark.e2e
def test_an_rgb_folder_at_its_own_size_runs_through_every_default_target(tmp_path):
    """3x32x32 RGB images (three classes) through train, QAT and each default target's compile and host check."""
    import yaml

    from edgeship.config import QatParams
    from edgeship.tasks.compile import CompileInputs, get_target
    from edgeship.tasks.data import prepare
    from edgeship.tasks.host_check import host_check, reference_logits
    from edgeship.tasks.qat import quantization_aware_train
    from edgeship.tasks.train import train
    from test_release_e2e import REPO

    raw = _folder(tmp_path / "raw", {name: ["RGB"] * 12 for name in ("a", "b", "c")})
    data = prepare(raw, tmp_path / "prepared", DataParams(channels=3, input_size=32, calibration_size=8))
    assert data.input_shape == (3, 32, 32)
    model = ModelParams(factory="edgeship.models.zoo:mobilenet_v2", kwargs={"width_mult": 0.25, "stages": 3})
    trained = train(data, model, TrainParams(epochs=1, batch_size=16), tmp_path / "model")
    quantized = quantization_aware_train(trained, data, QatParams(epochs=1, freeze_bn_after_epoch=0,
                                                                  freeze_observers_after_epoch=1), tmp_path / "qat")
    reference = reference_logits(trained, data)
    defaults = yaml.safe_load((REPO / "params.yaml").read_text())["targets"]
    for target in defaults:
        artifact = get_target(target).compile(CompileInputs(trained=trained, data=data, quantized=quantized,
                                                            output_dir=tmp_path / target))
        assert artifact.inputs[0].shape[1:] == (3, 32, 32), target
        check = host_check(artifact, data, reference)
        assert check.accuracy is not None and np.isfinite(check.max_abs_logit_diff), target
