"""The gate: verdicts follow measured values and limits, and a missing measurement fails closed."""

from pathlib import Path

import pytest

from edgeship.config import GatePolicy
from edgeship.records import BenchmarkResult, CompiledArtifact, HostCheck, LatencyStats, TensorSpec
from edgeship.tasks.gate import evaluate_gate, release_passes, render_markdown

SPEC = [TensorSpec(name="input", shape=(1, 1, 8, 8))]
POLICY = GatePolicy(max_accuracy_drop=1.0, p99_latency_ms=5.0, max_size_mb=1.0)


def artifact(size: int = 200_000) -> CompiledArtifact:
    return CompiledArtifact(target="onnx-int8", path=Path("m.onnx"), sha256="ab" * 32, bytes=size, precision="int8",
                            runtime="onnxruntime", inputs=SPEC, outputs=SPEC)


def host(accuracy: float | None, error: str | None = None) -> HostCheck:
    return HostCheck(target="onnx-int8", accuracy=accuracy, runtime="onnxruntime", error=error)


def bench(p99: float, device: str = "pi") -> BenchmarkResult:
    stats = LatencyStats(p50=p99 / 2, p90=p99 * 0.8, p95=p99 * 0.9, p99=p99, max=p99 * 1.1, mean=p99 / 2)
    return BenchmarkResult(target="onnx-int8", device=device, runtime="onnxruntime", sha256="ab" * 32,
                           latency_ms=stats, iterations=10)


def failed(device: str, status: str = "not_measured") -> BenchmarkResult:
    return BenchmarkResult(target="onnx-int8", device=device, runtime="onnxruntime", sha256="ab" * 32,
                           status=status, error="connection refused")


def checks(report):
    return {c.name: c for c in report.checks}


@pytest.mark.parametrize("accuracy, p99, size, expected", [
    (0.975, 4.0, 200_000, {"accuracy_drop": True, "p99_latency": True, "size": True}),
    (0.960, 4.0, 200_000, {"accuracy_drop": False, "p99_latency": True, "size": True}),   # 1.5 points down
    (0.975, 6.0, 200_000, {"accuracy_drop": True, "p99_latency": False, "size": True}),
    (0.975, 4.0, 2_000_000, {"accuracy_drop": True, "p99_latency": True, "size": False}),
    (0.970, 5.0, 1_000_000, {"accuracy_drop": True, "p99_latency": True, "size": True}),  # limits are inclusive
])
def test_verdict_agrees_with_measured_value_and_limit(accuracy, p99, size, expected):
    report = evaluate_gate("onnx-int8", POLICY, 0.98, artifact(size), host(accuracy), [bench(p99)])
    got = checks(report)
    assert {name: c.passed for name, c in got.items()} == expected
    for check in report.checks:
        assert check.passed == (check.measured <= check.limit)
    assert report.passed == all(expected.values())


def test_worst_device_p99_is_gated():
    report = evaluate_gate("onnx-int8", POLICY, 0.98, artifact(), host(0.98), [bench(1.0, "a"), bench(7.0, "b")])
    assert checks(report)["p99_latency"].measured == 7.0
    assert not report.passed


def test_missing_measurements_fail_closed():
    unreachable = evaluate_gate("onnx-int8", POLICY, 0.98, artifact(), host(0.98), [bench(1.0), failed("pi")])
    latency = checks(unreachable)["p99_latency"]
    assert not latency.passed and latency.measured is None and "connection refused" in latency.reason

    nobody = evaluate_gate("onnx-int8", POLICY, 0.98, artifact(), host(0.98), [])
    assert not checks(nobody)["p99_latency"].passed

    unloadable = evaluate_gate("onnx-int8", POLICY, 0.98, artifact(), host(None, "cannot load"), [bench(1.0)])
    assert not checks(unloadable)["accuracy_drop"].passed
    assert "cannot load" in checks(unloadable)["accuracy_drop"].reason

    not_compiled = evaluate_gate("onnx-int8", POLICY, 0.98, None, None, [], compile_error="unsupported op Foo")
    assert not not_compiled.passed
    assert all(not c.passed and "unsupported op Foo" in c.reason for c in not_compiled.checks)


def test_device_accuracy_wins_over_host_check():
    report = evaluate_gate("onnx-int8", POLICY, 0.98, artifact(), host(0.98), [bench(1.0)], device_accuracy=0.90)
    assert checks(report)["accuracy_drop"].measured == pytest.approx(8.0)
    assert not report.passed


def test_release_passes_only_when_every_required_gate_passes():
    good = evaluate_gate("onnx-int8", POLICY, 0.98, artifact(), host(0.98), [bench(1.0)])
    bad = evaluate_gate("onnx-fp32", POLICY, 0.98, None, None, [], compile_error="boom")
    optional_bad = evaluate_gate("x", GatePolicy(required=False, max_size_mb=1), 0.98, None, None, [])
    assert release_passes([good])
    assert not release_passes([good, bad])
    assert release_passes([good, optional_bad])
    assert not release_passes([optional_bad])  # nothing required: nothing vouches for the release
    table = render_markdown([good, bad])
    assert "| onnx-fp32 | compiled |" in table and "**FAIL**" in table and "## Gate: FAIL" in table


def test_a_proxy_accuracy_counts_only_when_the_policy_accepts_it():
    proxy = HostCheck(target="coreml-w8a8", accuracy=0.98, runtime="coreml", proxy=True,
                      note="proxy (Core ML prediction needs macOS): torch fake-quant")
    strict = evaluate_gate("coreml-w8a8", GatePolicy(max_accuracy_drop=1.0), 0.98, artifact(), proxy, [])
    [check] = strict.checks
    assert not check.passed and check.measured is None and "only a proxy" in check.reason
    lenient = evaluate_gate("coreml-w8a8", GatePolicy(max_accuracy_drop=1.0, accept_proxy_accuracy=True), 0.98,
                            artifact(), proxy, [])
    assert lenient.passed
