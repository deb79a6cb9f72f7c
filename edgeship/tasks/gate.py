"""The gate: each target's measurements against its policy in params.yaml.

A gate fails closed: a limit whose measurement is missing (the target did not
compile, the device was unreachable, the runtime could not load the model) is a
failed check that says why, never a pass.

    >>> report = evaluate_gate("onnx-int8", policy, fp32_accuracy=0.97, artifact=a, host=h, benchmarks=[b])
    >>> report.passed
"""

from __future__ import annotations

from edgeship.config import GatePolicy
from edgeship.records import BenchmarkResult, CompiledArtifact, GateCheck, GateReport, HostCheck


def _check(name: str, measured: float | None, limit: float, comparator: str, unit: str,
           missing_reason: str) -> GateCheck:
    if measured is None:
        return GateCheck(name=name, measured=None, limit=limit, comparator=comparator, unit=unit,
                         passed=False, reason=f"not measured: {missing_reason}")
    passed = measured <= limit if comparator == "<=" else measured >= limit
    return GateCheck(name=name, measured=measured, limit=limit, comparator=comparator, unit=unit, passed=passed)


def _why_missing(artifact: CompiledArtifact | None, error: str | None, *details: str | None) -> str:
    if artifact is None:
        return f"target did not compile ({error or 'no artifact'})"
    return next((d for d in details if d), "no measurement was returned")


def evaluate_gate(target: str, policy: GatePolicy, fp32_accuracy: float, artifact: CompiledArtifact | None,
                  host: HostCheck | None, benchmarks: list[BenchmarkResult], device_accuracy: float | None = None,
                  compile_error: str | None = None, metric: str = "accuracy") -> GateReport:
    """Check one target against its policy.

    The quality check is the task's `metric` ("accuracy": top-1, limit max_accuracy_drop; "map": a detector's
    mAP@0.5:0.95, limit max_map_drop), the device's own measurement when one exists, else the host
    check on the target's runtime. The drop is in points (percent) below the
    fp32 PyTorch model on the test split. Latency is the worst p99 over the
    devices that ran the target; one device that could not measure it fails the check.
    """
    checks: list[GateCheck] = []
    if artifact is None:
        checks.append(GateCheck(name="compiled", measured=None, limit=1, comparator=">=", passed=False,
                                reason=f"not measured: target did not compile ({compile_error or 'no artifact'})"))
    limit = policy.max_map_drop if metric == "map" else policy.max_accuracy_drop
    if limit is not None:
        accuracy = device_accuracy if device_accuracy is not None else (host.accuracy if host else None)
        why = _why_missing(artifact, compile_error, host.error if host else "no host check ran")
        if device_accuracy is None and host is not None and host.proxy and not policy.accept_proxy_accuracy:
            accuracy, why = None, f"only a proxy was measured ({host.note}); accept_proxy_accuracy is off"
        drop = None if accuracy is None else round((fp32_accuracy - accuracy) * 100, 4)
        checks.append(_check(f"{metric}_drop", drop, limit, "<=", "points", why))
    if policy.p99_latency_ms is not None:
        failed = [b for b in benchmarks if b.status != "ok" or b.latency_ms is None]
        p99 = None if failed or not benchmarks else max(b.latency_ms.p99 for b in benchmarks)
        reasons = "; ".join(f"{b.device}: {b.error or b.status}" for b in failed) or "no device benchmarked it"
        checks.append(_check("p99_latency", p99, policy.p99_latency_ms, "<=", "ms",
                             _why_missing(artifact, compile_error, reasons)))
    if policy.max_size_mb is not None:
        size = None if artifact is None else round(artifact.bytes / 1e6, 4)
        checks.append(_check("size", size, policy.max_size_mb, "<=", "MB", _why_missing(artifact, compile_error)))
    return GateReport(target=target, required=policy.required, checks=checks)


def float_sibling(target: str, targets: list[str]) -> str | None:
    """The float target on the same runtime an int8 target is compared with: fp32, else fp16 (None: not int8, or
    the release builds no float target for that runtime)."""
    from edgeship.targets import KNOWN_TARGETS

    info = KNOWN_TARGETS.get(target)
    if info is None or info.precision not in ("int8", "mixed"):
        return None
    floats = {KNOWN_TARGETS[t].precision: t for t in targets
              if t in KNOWN_TARGETS and KNOWN_TARGETS[t].runtime == info.runtime}
    return floats.get("fp32") or floats.get("fp16")


def earns_its_place(report: GateReport, policy: GatePolicy, artifact: CompiledArtifact | None,
                    benchmarks: list[BenchmarkResult], sibling: str, sibling_artifact: CompiledArtifact | None,
                    sibling_benchmarks: list[BenchmarkResult]) -> GateReport:
    """Add to an int8 target's gate whether it is smaller and faster than its float sibling.

    Size: its bytes over the sibling's. Speed: on each device that measured both, its p50 over the sibling's;
    the worst device counts. Bigger or slower fails the check (`passed: false`); the check is advisory (reported,
    not failing the gate) unless `fail_if_bigger_than_fp32` / `fail_if_slower_than_fp32` is on. A comparison
    nothing measured is left out.
    """
    checks = list(report.checks)
    if artifact is not None and sibling_artifact is not None and sibling_artifact.bytes:
        ratio = round(artifact.bytes / sibling_artifact.bytes, 4)
        checks.append(_flag("size_vs_float", ratio, sibling, policy.fail_if_bigger_than_fp32,
                            f"{artifact.bytes / 1e3:.1f} kB against {sibling}'s {sibling_artifact.bytes / 1e3:.1f} kB",
                            "fail_if_bigger_than_fp32"))
    ours = {b.device: b.latency_ms.p50 for b in benchmarks if b.status == "ok" and b.latency_ms}
    theirs = {b.device: b.latency_ms.p50 for b in sibling_benchmarks if b.status == "ok" and b.latency_ms}
    ratios = {device: ours[device] / theirs[device] for device in ours.keys() & theirs.keys() if theirs[device] > 0}
    if ratios:
        device = max(ratios, key=ratios.get)
        checks.append(_flag("p50_vs_float", round(ratios[device], 4), sibling, policy.fail_if_slower_than_fp32,
                            f"p50 {ours[device]:.4f} ms against {sibling}'s {theirs[device]:.4f} ms on {device}",
                            "fail_if_slower_than_fp32"))
    return report.model_copy(update={"checks": checks})


def _flag(name: str, ratio: float, sibling: str, fails: bool, detail: str, option: str) -> GateCheck:
    worse = ratio > 1.0
    reason = f"{ratio:.2f}x {sibling} ({detail})"
    if worse:
        reason = f"int8 buys nothing here: {reason}" + ("" if fails else f"; flagged only ({option} fails it)")
    return GateCheck(name=name, measured=ratio, limit=1.0, comparator="<=", unit=f"x {sibling}",
                     passed=not worse, advisory=not fails, reason=reason)


def flagged(check: GateCheck) -> bool:
    """An advisory check that failed (int8 bigger or slower than its float sibling): worth saying, not gating."""
    return check.advisory and not check.passed


def flags(report: GateReport) -> list[str]:
    """What a passing gate still wants a reader to know: int8 bigger or slower than its float sibling."""
    return [f"{c.name}: {c.reason}" for c in report.checks if flagged(c)]


def release_passes(reports: list[GateReport]) -> bool:
    """Whether every required gate passed (and at least one gate was required)."""
    required = [r for r in reports if r.required]
    return bool(required) and all(r.passed for r in required)


def render_markdown(reports: list[GateReport]) -> str:
    """The gate report as a markdown table: target, check, measured, limit, verdict."""
    lines = ["| target | check | measured | limit | verdict |", "| --- | --- | --- | --- | --- |"]
    for report in reports:
        for check in report.checks:
            measured = "—" if check.measured is None else f"{check.measured:g} {check.unit}".strip()
            verdict = "pass" if check.passed else f"**FAIL** {check.reason}".strip()
            if flagged(check):
                verdict = f"advisory, **flagged**: {check.reason}"
            lines.append(f"| {report.target} | {check.name} | {measured} | "
                         f"{check.comparator} {check.limit:g} {check.unit} | {verdict} |")
    overall = "PASS" if release_passes(reports) else "FAIL"
    optional = [r.target for r in reports if not r.required]
    note = f" (optional targets, not required: {', '.join(optional)})" if optional else ""
    return "\n".join([f"## Gate: {overall}{note}", "", *lines, ""])
