"""Reports people look at: the accuracy/latency plot, the per-target table, and each device's benchmark figures.

Drawn here, on the pipeline side: the device needs no matplotlib.

    >>> figure = latency_histogram_figure(result)  # a BenchmarkResult; None when it carries no histogram
    >>> run.log_bytes(png_bytes(figure), "benchmarks/onnx-int8/pi4/latency_histogram.png")

(edgeship.flows.figures logs them to MLflow and shows them in Prefect.)
"""

from __future__ import annotations

import threading

from edgeship.records import BenchmarkResult, TargetSummary

# Matplotlib is not thread-safe (its font and text caches), and benchmark tasks log from many threads:
# hold this while drawing a figure and saving it.
FIGURE_LOCK = threading.RLock()


def png_bytes(figure) -> bytes:
    """The figure as PNG (what MLflow and the Prefect UI show), then closed (pyplot keeps open figures alive)."""
    import io

    buffer = io.BytesIO()
    with FIGURE_LOCK:
        figure.savefig(buffer, format="png")
        import matplotlib.pyplot as plt

        plt.close(figure)
    return buffer.getvalue()


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


def latency_histogram_figure(result: BenchmarkResult):
    """The latency histogram a device returned, with p50/p99/p99.9 marked; None when it returned none."""
    if result.histogram is None or not result.histogram.counts:
        return None
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.6), dpi=110)
    axis = figure.add_subplot()
    edges, counts = result.histogram.edges_ms, result.histogram.counts
    widths = [high - low for low, high in zip(edges, edges[1:])]
    axis.bar(edges[:-1], counts, width=widths, align="edge", color="tab:blue", edgecolor="white", linewidth=0.4)
    if len(edges) > 2 and edges[-1] > 2 * edges[0]:
        axis.set_xscale("log")
    stats = result.latency_ms
    for name, value, colour in (("p50", stats.p50, "tab:green"), ("p99", stats.p99, "tab:orange"),
                                ("p99.9", stats.p999, "tab:red")):
        if value is not None:
            axis.axvline(value, color=colour, linestyle="--", linewidth=1, label=f"{name} {value:.3g} ms")
    axis.set_xlabel("latency (ms)")
    axis.set_ylabel("runs")
    label = " (emulated)" if result.emulated else ""
    axis.set_title(f"{result.target} on {result.device}{label}: {result.iterations} runs", fontsize=10)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def timeline_figure(result: BenchmarkResult):
    """A sustained run over time: latency per window, with temperature, clock and power from the sensors."""
    if result.mode != "duration" or len(result.windows) < 2:
        return None
    from matplotlib.figure import Figure

    series = _sensor_series(result)
    figure = Figure(figsize=(7.2, 2.4 + 1.8 * len(series)), dpi=110)
    axes = figure.subplots(1 + len(series), 1, sharex=True, squeeze=False)[:, 0]
    middles = [(w.start_s + w.end_s) / 2 for w in result.windows]
    axes[0].plot(middles, [w.p50 for w in result.windows], marker="o", label="p50")
    axes[0].plot(middles, [w.p99 for w in result.windows], marker="o", label="p99")
    axes[0].set_ylabel("latency (ms)")
    axes[0].legend(fontsize=7, loc="upper left")
    drift = f", drift (last/first p50) {result.drift_ratio:.3f}" if result.drift_ratio else ""
    throttled = {True: ", THROTTLED", False: ", no throttling seen"}.get(
        result.sensors.throttled if result.sensors else None, "")
    axes[0].set_title(f"{result.target} on {result.device}: {result.duration_s:.0f} s sustained run{drift}"
                      f"{throttled}", fontsize=10)
    for axis, (unit, lines) in zip(axes[1:], series.items()):
        for key, (times, values) in lines.items():
            axis.plot(times, values, label=key, linewidth=1)
        axis.set_ylabel(unit)
        axis.legend(fontsize=7, loc="upper left")
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[-1].set_xlabel("time since the timed run began (s)")
    figure.tight_layout()
    return figure


def _sensor_series(result: BenchmarkResult) -> dict[str, dict[str, tuple[list, list]]]:
    """Sensor timelines grouped by unit (C, MHz, W), at most 6 lines each."""
    report = result.sensors
    if report is None or not report.timeline_s:
        return {}
    units = {key: stats.unit for key, stats in report.channels.items()}
    grouped: dict[str, dict[str, tuple[list, list]]] = {}
    for key, values in report.timeline.items():
        unit = units.get(key)
        if unit not in ("C", "MHz", "W"):
            continue
        points = [(t, v) for t, v in zip(report.timeline_s, values) if v is not None]
        if points and len(grouped.setdefault(unit, {})) < 6:
            grouped[unit][key] = ([t for t, _ in points], [v for _, v in points])
    return {unit: lines for unit, lines in grouped.items() if lines}
