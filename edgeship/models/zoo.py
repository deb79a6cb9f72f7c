"""The model zoo: small image classifiers written for edge targets.

Every factory has the signature `factory(num_classes, in_channels, **kwargs) ->
nn.Module`, the same one a user's own factory must have (`model.factory` in
params.yaml). The models are FX-traceable (no data-dependent control flow), so
quantization-aware training can rewrite them, and layer names follow torchvision
(`features.3.conv.1`) so reports read the way people know these networks.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

from torch import nn

from edgeship.errors import ModelLoadError


def _make_divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNReLU(nn.Sequential):
    """Conv, BatchNorm, ReLU6: the unit that quantizers fuse into one int8 conv."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=False),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear project, residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(in_ch * expand_ratio))
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(in_ch, hidden, kernel=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


# (expand ratio, channels, repeats, first stride) per stage, as in the MobileNetV2 paper.
_MOBILENET_V2_STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class MobileNetV2(nn.Module):
    """MobileNetV2 with a width multiplier; `stages` trims depth for tiny inputs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0,
                 stages: int = 7, dropout: float = 0.2, stem_stride: int = 2):
        super().__init__()
        if not 1 <= stages <= len(_MOBILENET_V2_STAGES):
            raise ValueError(f"stages must be 1..{len(_MOBILENET_V2_STAGES)}, got {stages}")
        in_ch = _make_divisible(32 * width_mult)
        last_ch = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU(in_channels, in_ch, stride=stem_stride)]
        for expand, channels, repeats, stride in _MOBILENET_V2_STAGES[:stages]:
            out_ch = _make_divisible(channels * width_mult)
            for i in range(repeats):
                features.append(InvertedResidual(in_ch, out_ch, stride if i == 0 else 1, expand))
                in_ch = out_ch
        features.append(ConvBNReLU(in_ch, last_ch, kernel=1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_ch, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        x = self.pool(self.features(x))
        return self.classifier(x.flatten(1))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with an identity or 1x1 shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class SmallResNet(nn.Module):
    """A ResNet for small inputs: a 3x3 stem, then stages of basic blocks."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64),
                 blocks_per_stage: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers: list[nn.Module] = []
        in_ch = widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks_per_stage):
                layers.append(BasicBlock(in_ch, width, 2 if (i > 0 and j == 0) else 1))
                in_ch = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        x = self.pool(self.layers(self.stem(x)))
        return self.fc(x.flatten(1))


def mobilenet_v2(num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    """MobileNetV2 (inverted residuals, depthwise convs); kwargs: width_mult, stages, dropout, stem_stride."""
    return MobileNetV2(num_classes=num_classes, in_channels=in_channels, **kwargs)


def small_resnet(num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    """A small ResNet; kwargs: widths, blocks_per_stage."""
    return SmallResNet(num_classes=num_classes, in_channels=in_channels, **kwargs)


def resolve_factory(path: str) -> Callable[..., nn.Module]:
    """Import `package.module:function` (or `package.module:Class`) and return the factory."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelLoadError(f"cannot import model factory module '{module_name}' ({error}); "
                             f"check model.factory in params.yaml and that the module is on PYTHONPATH "
                             f"(or in the project directory)") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelLoadError(f"'{attr}' in '{module_name}' is not a callable factory; "
                             f"model.factory must name a function or class returning a torch.nn.Module")
    return factory


def factory_arguments(factory: Callable, offered: dict, kwargs: dict) -> dict:
    """What to call the factory with: the offered arguments its signature names, and all of model.kwargs.

    `offered` is what edgeship knows about the data (num_classes, in_channels, input_size). A factory
    that only takes **kwargs (and often forwards them to a class) gets num_classes and in_channels, the
    classic pair, but input_size only by naming it. An unknown key in model.kwargs is the user's to fix,
    so it is passed and the factory's own TypeError names it.
    """
    try:
        parameters = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # a builtin or C extension: no signature to read
        parameters = [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
    names = {p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                         inspect.Parameter.KEYWORD_ONLY)}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        names |= {"num_classes", "in_channels"}
    return {**{k: v for k, v in offered.items() if k in names}, **kwargs}


def build_model(path: str, num_classes: int, in_channels: int, kwargs: dict | None = None,
                input_size: int | None = None, check: bool = True) -> nn.Module:
    """Build a model from its factory's import path, check it is an nn.Module and (`check`, given the input
    size) that it takes a (2, in_channels, input_size, input_size) batch and returns (2, num_classes) logits."""
    factory = resolve_factory(path)
    offered = {"num_classes": num_classes, "in_channels": in_channels}
    if input_size is not None:
        offered["input_size"] = input_size
    arguments = factory_arguments(factory, offered, dict(kwargs or {}))
    try:
        model = factory(**arguments)
    except TypeError as error:
        raise ModelLoadError(f"model factory '{path}' rejected its arguments {sorted(arguments)} ({error}); it is "
                             f"given the ones of num_classes, in_channels, input_size its signature names, "
                             f"and every key of model.kwargs: fix model.kwargs or the factory") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"model factory '{path}' returned {type(model).__name__}, not a torch.nn.Module; "
                             f"return the model itself (an instance of a torch.nn.Module subclass)")
    if check and input_size is not None:
        check_input(model, path, num_classes, (in_channels, input_size, input_size))
    return model


def check_input(model: nn.Module, path: str, num_classes: int, shape: tuple[int, int, int]) -> None:
    """One forward pass on zeros: the model takes `shape` and returns one logit per class."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(torch.zeros(2, *shape))
    except Exception as error:  # any layer can refuse a shape, each in its own words
        raise ModelLoadError(f"model '{path}' cannot take images of shape {shape} (channels, height, width): "
                             f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}; set "
                             f"data.input_size / data.channels to what the model expects, or make the model "
                             f"take this size (e.g. an adaptive pooling layer before the classifier)") from None
    finally:
        model.train(was_training)
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != (2, num_classes):
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ModelLoadError(f"model '{path}' returns {got} for a batch of 2, not (2, {num_classes}) logits (one "
                             f"per class of the data); give its last layer num_classes outputs")
