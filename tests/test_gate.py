"""The gate: verdicts follow measured values and limits, and a missing measurement fails closed."""

import json
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


def _sibling(target: str, size: int, p50: float, device: str = "pi"):
    from edgeship.targets import KNOWN_TARGETS

    info = KNOWN_TARGETS[target]
    art = CompiledArtifact(target=target, path=Path(f"{target}.bin"), sha256="cd" * 32, bytes=size,
                           precision=info.precision, runtime=info.runtime, inputs=SPEC, outputs=SPEC)
    stats = LatencyStats(p50=p50, p90=p50, p95=p50, p99=p50 * 1.2, max=p50 * 2, mean=p50)
    return art, [BenchmarkResult(target=target, device=device, runtime=info.runtime, sha256="cd" * 32,
                                 latency_ms=stats, iterations=10)]


def test_float_sibling_is_the_same_runtimes_float_target():
    from edgeship.tasks.gate import float_sibling

    targets = ["onnx-fp32", "onnx-int8", "tflite-fp16", "tflite-int8", "coreml-w8a8"]
    assert float_sibling("onnx-int8", targets) == "onnx-fp32"
    assert float_sibling("tflite-int8", targets) == "tflite-fp16"
    assert float_sibling("coreml-w8a8", targets) is None and float_sibling("onnx-fp32", targets) is None


@pytest.mark.parametrize("fail_option", [False, True])
def test_int8_bigger_and_slower_than_fp32_is_flagged_or_fails(fail_option):
    from edgeship.tasks.gate import earns_its_place, flags

    policy = GatePolicy(max_size_mb=1.0, fail_if_slower_than_fp32=fail_option, fail_if_bigger_than_fp32=fail_option)
    int8, int8_bench = _sibling("onnx-int8", 36_000, 0.18)
    fp32, fp32_bench = _sibling("onnx-fp32", 17_000, 0.10)
    base = evaluate_gate("onnx-int8", policy, 0.98, int8, host(0.975), int8_bench)
    report = earns_its_place(base, policy, int8, int8_bench, "onnx-fp32", fp32, fp32_bench)
    got = checks(report)
    assert got["size_vs_float"].measured == pytest.approx(36 / 17, rel=1e-3)
    assert got["p50_vs_float"].measured == pytest.approx(1.8)
    # Honest either way: both checks failed; only whether they fail the gate depends on the option.
    assert not got["size_vs_float"].passed and not got["p50_vs_float"].passed
    assert got["size_vs_float"].advisory is got["p50_vs_float"].advisory is not fail_option
    assert report.passed is not fail_option and release_passes([report]) is not fail_option
    markdown = render_markdown([report])
    if fail_option:
        assert "**FAIL** int8 buys nothing here: 1.80x onnx-fp32" in markdown and not flags(report)
    else:
        assert "flagged**: int8 buys nothing here: 2.12x onnx-fp32 (36.0 kB against onnx-fp32's 17.0 kB)" in markdown
        assert len(flags(report)) == 2 and "fail_if_slower_than_fp32 fails it" in flags(report)[1]
        dumped = report.model_dump(mode="json")["checks"]
        assert {"name": "p50_vs_float", "passed": False, "advisory": True}.items() <= dumped[-1].items()


def test_a_record_written_before_advisory_existed_reads_as_a_failed_advisory_check():
    """Old gate_report.json / release.json said `passed: true` for an advisory check over its limit."""
    from edgeship.records import GateReport

    old = {"target": "onnx-int8", "required": True, "checks": [
        {"name": "size", "measured": 0.2, "limit": 1.0, "comparator": "<=", "unit": "MB", "passed": True},
        {"name": "p50_vs_float", "measured": 1.3215, "limit": 1.0, "comparator": "<=", "unit": "x onnx-fp32",
         "passed": True, "reason": "int8 buys nothing here: 1.32x onnx-fp32; flagged only"},
        {"name": "accuracy_drop", "measured": None, "limit": 1.0, "comparator": "<=", "passed": False}]}
    report = GateReport.model_validate_json(json.dumps(old))
    size, p50, accuracy = report.checks
    assert size.passed and not size.advisory
    assert not p50.passed and p50.advisory and not p50.fails_gate
    assert not accuracy.passed and not accuracy.advisory and accuracy.fails_gate
    assert not report.passed  # the missing accuracy fails it, as before
    assert GateReport.model_validate({**old, "checks": old["checks"][:2]}).passed  # the advisory one does not


def test_int8_that_is_smaller_and_faster_passes_unflagged_and_unmeasured_is_left_out():
    from edgeship.tasks.gate import earns_its_place, flags

    policy = GatePolicy(max_size_mb=1.0, fail_if_slower_than_fp32=True)
    int8, int8_bench = _sibling("onnx-int8", 5_000, 0.05)
    fp32, fp32_bench = _sibling("onnx-fp32", 17_000, 0.10, device="other")  # no device measured both
    report = earns_its_place(evaluate_gate("onnx-int8", policy, 0.98, int8, host(0.975), int8_bench), policy,
                             int8, int8_bench, "onnx-fp32", fp32, fp32_bench)
    assert report.passed and not flags(report)
    assert "p50_vs_float" not in checks(report) and checks(report)["size_vs_float"].measured < 1
