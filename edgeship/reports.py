"""Reports people look at: the accuracy/latency plot and the per-target table."""

from __future__ import annotations

from edgeship.records import TargetSummary


def accuracy_latency_figure(targets: list[TargetSummary], fp32_accuracy: float):
    """Scatter of accuracy (on the target's runtime) against worst-device p99 latency, one point per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4), dpi=120)
    for summary in targets:
        accuracy = summary.host_check.accuracy if summary.host_check else None
        measured = [b.latency_ms.p99 for b in summary.benchmarks if b.status == "ok" and b.latency_ms]
        if accuracy is None or not measured:
            continue
        colour = "tab:green" if summary.gate.passed else "tab:red"
        axis.scatter(max(measured), accuracy * 100, s=60, color=colour)
        axis.annotate(summary.target, (max(measured), accuracy * 100), textcoords="offset points", xytext=(6, 4))
    axis.axhline(fp32_accuracy * 100, color="grey", linestyle="--", linewidth=1, label="fp32 PyTorch")
    axis.set_xlabel("p99 latency, worst device (ms)")
    axis.set_ylabel("test accuracy on target runtime (%)")
    axis.set_title("Accuracy vs latency per target (green: gate passed)")
    axis.legend(loc="lower right")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def target_rows(targets: list[TargetSummary]) -> list[dict]:
    """One flat row per target and device, for tables (Prefect table artifact, CLI)."""
    rows = []
    for summary in targets:
        base = {
            "target": summary.target,
            "bytes": summary.artifact.bytes if summary.artifact else None,
            "sha256": summary.artifact.sha256[:12] if summary.artifact else None,
            "accuracy": summary.host_check.accuracy if summary.host_check else None,
            "gate": "pass" if summary.gate.passed else "FAIL",
        }
        for bench in summary.benchmarks or [None]:
            latency = bench.latency_ms if bench else None
            rows.append({**base, "device": bench.device if bench else None,
                         "p50_ms": latency.p50 if latency else None, "p99_ms": latency.p99 if latency else None,
                         "status": bench.status if bench else (summary.error or "not benchmarked")})
    return rows
