"""One failing target never stops a release: a converter that raises something unexpected
(TypeError, ImportError) fails only its own target's gate; the other targets still compile."""

from __future__ import annotations

import pytest
import torch

from edgeship.config import GatePolicy
from edgeship.flows.release_tasks import compile_target
from edgeship.targets import KNOWN_TARGETS, TargetInfo
from edgeship.tasks.gate import evaluate_gate
from tiny_quantization import digits, trained  # noqa: F401  (fixtures)

torch.set_num_threads(1)


class RaisesTypeError:
    """A converter with a bug of its own: what a third-party converter does on an op it does not know."""

    name, runtime, precision, needs_quantized = "broken-type", "onnxruntime", "fp32", False

    def compile(self, inputs):
        raise TypeError("unsupported operand type(s) for +: 'NoneType' and 'int'")


class RaisesImportError(RaisesTypeError):
    """A converter whose backend is not installed."""

    name = "broken-import"

    def compile(self, inputs):
        raise ImportError("No module named 'some_backend'")


class Run:
    """Stands in for ReleaseRun: what the task logs, kept in memory."""

    def __init__(self):
        self.tags, self.metrics, self.artifacts, self.texts = {}, {}, [], {}

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_artifact(self, path, directory=None):
        self.artifacts.append((path, directory))

    def log_text(self, text, name):
        self.texts[name] = text


@pytest.fixture
def broken_targets(monkeypatch):
    for name, cls in (("broken-type", "RaisesTypeError"), ("broken-import", "RaisesImportError")):
        monkeypatch.setitem(KNOWN_TARGETS, name, TargetInfo(name, "onnxruntime", "fp32", f"{__name__}:{cls}"))
    return ["broken-type", "onnx-fp32", "broken-import"]


def test_an_unexpected_converter_error_fails_only_its_target(broken_targets, trained, digits, tmp_path):
    run = Run()
    outcomes = {target: compile_target.fn(target, trained, None, digits, tmp_path, run) for target in broken_targets}

    assert outcomes["onnx-fp32"].error is None and outcomes["onnx-fp32"].artifact.path.is_file()
    assert run.metrics["onnx-fp32/bytes"] > 0
    assert outcomes["broken-type"].artifact is None
    assert outcomes["broken-type"].error.startswith("TypeError: unsupported operand")
    assert outcomes["broken-import"].error == "ImportError: No module named 'some_backend'"
    assert run.tags["edgeship.compile.broken-import"].startswith("failed: No module named")

    policy = GatePolicy(max_accuracy_drop=5.0)
    failed = evaluate_gate("broken-type", policy, trained.test_accuracy, None, None, [],
                           compile_error=outcomes["broken-type"].error)
    assert not failed.passed
    assert "target did not compile (TypeError" in failed.checks[0].reason
