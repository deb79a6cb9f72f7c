"""Structured pruning: Torch-Pruning on the zoo's models and on a user's own model, the pruned architecture
saved and rebuilt from the factory, the ratio search with ONNX Runtime latency, errors that name the layer,
and the pruned model going on through QAT to a QDQ ONNX file. Digits at 8x8, tiny models, 1-2 epochs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeship.config import ModelParams, PruningParams, QatParams, TrainParams, parse_params
from edgeship.errors import ConfigError, PruningError
from edgeship.models.pruned import changed_structure, save_checkpoint
from edgeship.models.zoo import build_model
from edgeship.tasks.data import load_split
from edgeship.tasks.prune import count_macs_params, output_layer, prune_model
from edgeship.tasks.prune_search import pruning_figure, pruning_rows, search_pruning
from edgeship.tasks.train import evaluate, load_model, train
from tiny_quantization import TINY_MOBILENET, digits, trained  # noqa: F401  (fixtures)

torch.set_num_threads(1)
EXAMPLE = torch.randn(2, 1, 8, 8)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, channels // 2, 1), nn.Conv2d(channels // 2, channels, 1)

    def forward(self, x):
        scale = torch.sigmoid(self.fc2(nn.functional.silu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * scale


class UserNet(nn.Module):
    """A model the project did not write: SiLU, hard-swish, squeeze-excite, a residual add."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.SiLU())
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=width), nn.BatchNorm2d(width),
                                   nn.Hardswish(), SqueezeExcite(width), nn.Conv2d(width, width, 1))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.block(x)
        return self.head(x.mean((2, 3)))


class FixedReshape(nn.Module):
    """Its forward flattens to a hard-coded width: no pruner can follow that."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(in_channels, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 64, num_classes)

    def forward(self, x):
        x = self.conv2(torch.relu(self.conv1(x)))
        return self.fc(x.reshape(x.shape[0], 16 * 64))


def user_net(num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    return UserNet(num_classes, in_channels, **kwargs)


@pytest.mark.parametrize("importance", ["l1", "taylor"])
@pytest.mark.parametrize("factory,kwargs", [("edgeship.models.zoo:mobilenet_v2", TINY_MOBILENET.kwargs),
                                            ("edgeship.models.zoo:small_resnet", {}),
                                            (f"{__name__}:user_net", {})])
def test_prune_removes_channels_and_keeps_the_graph_consistent(factory, kwargs, importance):
    torch.manual_seed(0)
    model = build_model(factory, 10, 1, kwargs).eval()
    original = build_model(factory, 10, 1, kwargs)
    original.load_state_dict(model.state_dict())
    macs, params = count_macs_params(model, EXAMPLE[:1])
    classifier = output_layer(model, EXAMPLE[:1])
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))]
    pruned = prune_model(model, EXAMPLE[:1], PruningParams(importance=importance, round_to=None), 0.3, batches)
    pruned_macs, pruned_params = count_macs_params(pruned, EXAMPLE[:1])
    assert pruned_macs < 0.75 * macs and pruned_params < 0.8 * params
    assert pruned(EXAMPLE).shape == (2, 10)
    out_channels = getattr(classifier, "out_features", getattr(classifier, "out_channels", None))
    assert out_channels == 10  # the classifier keeps every class
    changed = changed_structure(pruned, original)
    assert changed and all(name in dict(original.named_modules()) for name in changed)


def test_pinned_layers_keep_their_channels_and_round_to_keeps_multiples():
    model = build_model("edgeship.models.zoo:small_resnet", 10, 1, {"widths": [16, 32]})
    params = PruningParams(pinned=["stem.0"], round_to=4)
    pruned = prune_model(model, EXAMPLE[:1], params, 0.4)
    assert pruned.stem[0].out_channels == 16
    widths = [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert widths != [m.out_channels for m in build_model("edgeship.models.zoo:small_resnet", 10, 1,
                                                           {"widths": [16, 32]}).modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 4 == 0 for w in widths)


def test_a_graph_that_cannot_be_pruned_names_the_layer():
    with pytest.raises(PruningError, match="after layer 'conv2'.*pruning.pinned"):
        prune_model(FixedReshape(), EXAMPLE[:1], PruningParams(round_to=None), 0.3)
    # pinning the layer it names makes the same model prunable
    pruned = prune_model(FixedReshape(), EXAMPLE[:1], PruningParams(pinned=["conv2"], round_to=None), 0.3)
    assert pruned.conv1.out_channels < 16 and pruned(EXAMPLE).shape == (2, 10)
    with pytest.raises(PruningError, match=r"pruning.pinned names \['features.99'\].*conv and linear layers"):
        prune_model(FixedReshape(), EXAMPLE[:1], PruningParams(pinned=["features.99"]), 0.3)


def test_pruning_params_validate():
    with pytest.raises(ConfigError, match="pruning.search_ratios"):
        parse_params({"pruning": {"search_ratios": [0.3, 1.2]}})
    params = parse_params({"pruning": {"enabled": True, "search_ratios": [0.4, 0.2, 0.2]}}).pruning
    assert params.candidates() == [0.2, 0.4] and not parse_params({}).pruning.enabled


def test_a_pruned_checkpoint_loads_through_the_factory(trained, tmp_path):  # noqa: F811
    model = load_model(trained)
    pruned = prune_model(model, torch.zeros(1, *trained.input_shape), PruningParams(), 0.3)
    path = save_checkpoint(pruned, tmp_path / "pruned.pt")
    record = trained.model_copy(update={"checkpoint": path})
    loaded = load_model(record)
    x = torch.randn(4, *trained.input_shape)
    assert torch.allclose(loaded(x), pruned.eval()(x), atol=1e-6)
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in load_model(trained).parameters())


def test_search_prunes_fine_tunes_times_and_the_result_goes_through_qat(digits, trained, tmp_path):  # noqa: F811
    from edgeship.tasks.qat import quantization_aware_train

    params = PruningParams(search_ratios=[0.0, 0.3, 0.5], fine_tune_epochs=1, latency_runs=10,
                           max_drop_points=100.0)  # any accuracy: the fastest candidate must win
    seen = []
    report = search_pruning(trained, digits, params, TrainParams(epochs=1), tmp_path / "pruning",
                            on_candidate=seen.append)
    assert [c.ratio for c in seen] == [0.0, 0.3, 0.5]
    assert report.baseline.ratio == 0.0 and [c.ratio for c in report.candidates] == [0.3, 0.5]
    fastest = min(report.candidates, key=lambda c: c.latency_ms)
    assert report.meets_budget and report.chosen_ratio == fastest.ratio
    assert all(c.macs < report.baseline.macs and c.bytes < report.baseline.bytes for c in report.candidates)
    assert report.architecture and report.model.checkpoint != trained.checkpoint
    model = load_model(report.model)
    x, y = load_split(digits, "test")
    assert evaluate(model, x, y) == pytest.approx(report.model.test_accuracy)
    rows = pruning_rows(report)
    assert [r["chosen"] for r in rows].count(True) == 1 and rows[0]["ratio"] == 0.0
    assert pruning_figure(report) is not None

    quantized = quantization_aware_train(report.model, digits, QatParams(epochs=1, freeze_bn_after_epoch=0,
                                                                         freeze_observers_after_epoch=1),
                                         tmp_path / "qat")
    assert sum(quantized.integer_ops.values()) > 0 and quantized.onnx_test_accuracy > 0.5


def test_no_candidate_within_budget_keeps_the_unpruned_model(digits, trained, tmp_path):  # noqa: F811
    params = PruningParams(ratio=0.6, fine_tune_epochs=1, latency_runs=5, max_drop_points=0.0, distill=False)
    report = search_pruning(trained, digits, params, TrainParams(epochs=1), tmp_path / "pruning")
    worse = report.candidates[0].val_accuracy < trained.val_accuracy
    assert report.meets_budget is not worse
    if worse:
        assert report.chosen_ratio == 0.0 and report.model == trained and report.architecture == {}


def test_a_users_model_trains_prunes_and_reloads(digits, tmp_path):  # noqa: F811
    model_params = ModelParams(factory=f"{__name__}:user_net", kwargs={"width": 16})
    user = train(digits, model_params, TrainParams(epochs=1), tmp_path / "fp32")
    report = search_pruning(user, digits, PruningParams(ratio=0.25, fine_tune_epochs=1, latency_runs=5,
                                                        max_drop_points=100.0), TrainParams(), tmp_path / "p")
    assert report.chosen_ratio == 0.25
    assert load_model(report.model).stem[0].out_channels == 12
