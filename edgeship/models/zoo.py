"""The model zoo: small image classifiers written for edge targets.

Every factory has the signature `factory(num_classes, in_channels, **kwargs) ->
nn.Module`, the same one a user's own factory must have (`model.factory` in
params.yaml). The models are FX-traceable (no data-dependent control flow), so
quantization-aware training can rewrite them, and layer names follow torchvision
(`features.3.conv.1`) so reports read the way people know these networks.
"""

from __future__ import annotations

import importlib
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
    """Import `package.module:function` and return the factory."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelLoadError(f"cannot import model factory module '{module_name}' ({error}); "
                             f"check model.factory in params.yaml and that the module is on PYTHONPATH") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelLoadError(f"'{attr}' in '{module_name}' is not a callable factory; "
                             f"model.factory must name a function returning a torch.nn.Module")
    return factory


def build_model(path: str, num_classes: int, in_channels: int, kwargs: dict | None = None) -> nn.Module:
    """Build a model from its factory's import path and check it is an nn.Module."""
    factory = resolve_factory(path)
    try:
        model = factory(num_classes=num_classes, in_channels=in_channels, **(kwargs or {}))
    except TypeError as error:
        raise ModelLoadError(f"model factory '{path}' rejected its arguments ({error}); a factory takes "
                             f"num_classes, in_channels and the keyword arguments in model.kwargs") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"model factory '{path}' returned {type(model).__name__}, not a torch.nn.Module")
    return model
