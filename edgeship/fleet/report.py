"""What the fleet reports, in the places people look: the MLflow model version, tables and a timeline plot.

    >>> rows = status_rows(snapshot)                       # `edgeship fleet status`, the Prefect table artifact
    >>> log_fleet_metrics(tracking_uri, "digits", snapshot.versions["8"])
    >>> log_decision(tracking_uri, "digits", decision, store.decisions("stable", "onnx-int8"))

Metrics go on the model version's source run (prefix `fleet.`, step = seconds since the epoch, so
they form a time series); the latest values and every decision also go on the model version as tags
(`fleet.*`, `rollout.decision`), which the registry UI shows next to the version.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from edgeship.fleet import field_accuracy
from edgeship.fleet.aggregate import FleetSnapshot, VersionStats
from edgeship.fleet.controller import Decision

STATUS_COLUMNS = ["version", "device class", "devices", "inferences", "p50 ms", "p95 ms", "p99 ms", "errors",
                  "fallbacks", "shadow agreement", "drift PSI", "est. accuracy", "installed", "refused", "confirmed", "rolled back"]


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def status_rows(snapshot: FleetSnapshot) -> list[dict[str, str]]:
    """One row per (version, device class), in STATUS_COLUMNS order."""
    rows = []
    for version, stats in sorted(snapshot.versions.items()):
        classes = sorted(stats.classes.items()) or [("-", None)]
        for device_class, cls in classes:
            rows.append(dict(zip(STATUS_COLUMNS, [
                version, device_class, _fmt(cls.devices if cls else 0), _fmt(cls.inferences if cls else 0),
                _fmt(cls.p50_ms if cls else None), _fmt(cls.p95_ms if cls else None),
                _fmt(cls.p99_ms if cls else None), _fmt(cls.errors if cls else 0),
                _fmt(cls.fallback_activations if cls else 0), _fmt(stats.shadow.agreement, 3),
                _fmt(stats.drift.score if stats.drift else None, 3),
                _fmt(stats.estimated_accuracy.accuracy if stats.estimated_accuracy else None, 3),
                str(len(stats.events.installed)),
                str(len(stats.events.refused)), str(len(stats.events.confirmed)),
                str(len(stats.events.rolled_back))])))
    return rows


def decision_line(d: dict, reasons: int | None = None) -> str:
    """A decision (Decision.model_dump(), or a stored one) as one line for the terminal: `onnx-int8 v8: 0.05 -> 0.25
    advance: ...` when it moves the rollout, `onnx-int8 v8 at 0.05: hold: ...` when not; a target without a
    candidate names the version its devices run instead."""
    why = "; ".join(d["reasons"][:reasons])
    if d.get("version") is None:
        base = d.get("base_version")
        return f"{d['target']}{f' (v{base} on every device)' if base else ''}: {why}"
    said = why if d["action"] == "none" or why.startswith(d["action"]) else f"{d['action']}: {why}"
    if d["action"] in ("advance", "complete", "abort"):
        return (f"{d['target']} v{d['version']}: {d['fraction_before']:g} -> {d['fraction_after']:g}"
                f"{'' if d.get('applied', True) else ' (not applied)'}  {said}")
    return f"{d['target']} v{d['version']} at {d['fraction_before']:g}: {said}"


def fleet_metrics(stats: VersionStats, compared_with: str | None = None) -> dict[str, float | None]:
    """Fleet metrics of one version: p99 per device class, shadow agreement, drift, install/probation failures,
    accuracy estimated without labels (CBPE), and its answers' agreement with `compared_with` (its base)."""
    from edgeship.fleet.agreement import comparison_of

    metrics: dict[str, float | None] = {f"fleet.p99_ms.{c}": s.p99_ms for c, s in stats.classes.items()}
    metrics.update({
        "fleet.devices": float(len(stats.devices)), "fleet.inferences": float(stats.inferences),
        "fleet.errors": float(stats.errors), "fleet.fallback_activations": float(stats.fallback_activations),
        "fleet.shadow_agreement": stats.shadow.agreement, "fleet.shadow_samples": float(stats.shadow.samples),
        "fleet.drift_psi": stats.drift.score if stats.drift else None,
        "fleet.install_failures": float(len(stats.events.refused)),
        "fleet.probation_failures": float(len(stats.events.rolled_back)),
        # Accuracy in the field estimated from confidence (no labels needed, edgeship.fleet.estimate); the labelled
        # field accuracy from the applications' feedback is added beside it (field_accuracy.metrics, below).
        "fleet.estimated_accuracy": stats.estimated_accuracy.accuracy if stats.estimated_accuracy else None,
    })
    metrics.update(field_accuracy.metrics(stats))   # labelled accuracy from the applications' feedback
    if compared_with:
        compared = comparison_of(stats, compared_with)
        metrics["fleet.agreement_with_base"] = compared.agreement
        metrics["fleet.compared_answers"] = float(compared.samples)
    return metrics


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def log_fleet_metrics(tracking_uri: str, model_name: str, stats: VersionStats, step: int | None = None,
                      compared_with: str | None = None) -> None:
    """Fleet metrics on the version's source run (a time series) and as tags on the model version."""
    import time

    from mlflow.entities import Metric

    client = _client(tracking_uri)
    version = client.get_model_version(model_name, stats.version)
    metrics = {k: v for k, v in fleet_metrics(stats, compared_with).items() if v is not None}
    now = int(time.time())
    step = now if step is None else step
    if version.run_id:
        client.log_batch(version.run_id, metrics=[Metric(k, float(v), now * 1000, step) for k, v in metrics.items()])
    for key, value in metrics.items():
        client.set_model_version_tag(model_name, stats.version, key, f"{value:.4g}")


def log_decision(tracking_uri: str, model_name: str, decision: Decision, timeline: list[dict]
                 ) -> tuple[str, str, bytes] | None:
    """The decision as a tag on the candidate's model version, and the rollout's timeline plot on its run.

    Returns (run id, artifact path, PNG) of the plot, for the Prefect UI too; None when there is no run to log to.
    """
    if decision.version is None:
        return None
    from edgeship.reports import png_bytes

    client = _client(tracking_uri)
    summary = {"action": decision.action, "at": decision.at.isoformat(), "fraction": decision.fraction_after,
               "reasons": decision.reasons}
    client.set_model_version_tag(model_name, decision.version, "rollout.decision", json.dumps(summary)[:5000])
    client.set_model_version_tag(model_name, decision.version, f"rollout.{decision.target}.state",
                                 f"{decision.action} @ {decision.fraction_after:g}")
    version = client.get_model_version(model_name, decision.version)
    if not version.run_id:
        return None
    png = png_bytes(timeline_figure(timeline, title=f"{model_name} v{decision.version} on "
                                                    f"{decision.channel}/{decision.target}"))
    name = f"rollout-{decision.channel}-{decision.target}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.png"
        path.write_bytes(png)
        evidence = Path(tmp) / f"{name}-last-decision.json"
        evidence.write_text(decision.model_dump_json(indent=2))
        client.log_artifact(version.run_id, str(path), "fleet")
        client.log_artifact(version.run_id, str(evidence), "fleet")
    return version.run_id, f"fleet/{name}.png", png


def record_in_mlflow(tracking_uri: str, model_name: str, result, store) -> tuple[str, str, bytes] | None:
    """One target's pass where people look in MLflow: the decision (tag, timeline plot, evidence) on the candidate's
    model version, fleet metrics on the candidate's and the base's. Returns the plot as log_decision does."""
    decision = result.decision
    timeline = store.decisions(decision.channel, decision.target, version=decision.version, evidence=False)
    plot = log_decision(tracking_uri, model_name, decision, timeline)
    for version in {decision.version, result.base_version} - {None}:
        stats = result.snapshot.version(version)
        if stats is not None:
            log_fleet_metrics(tracking_uri, model_name, stats,
                              compared_with=result.base_version if version == decision.version else None)
    return plot


def timeline_figure(decisions: list[dict], title: str):
    """Rollout fraction over time, one marker per decision (advance, hold, abort, complete)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3))
    if decisions:
        start = decisions[0]["at"]
        xs = [(d["at"] - start).total_seconds() for d in decisions]
        axis.step(xs, [d["fraction_after"] for d in decisions], where="post", color="0.4")
        colours = {"advance": "tab:green", "complete": "tab:blue", "hold": "0.6", "abort": "tab:red", "none": "0.8"}
        for x, d in zip(xs, decisions):
            axis.scatter([x], [d["fraction_after"]], color=colours.get(d["action"], "k"), zorder=3, s=18)
            if d["action"] in ("abort", "complete"):
                axis.annotate(d["action"], (x, d["fraction_after"]), textcoords="offset points", xytext=(4, 4),
                              fontsize=8)
    axis.set_xlabel("seconds since the first decision")
    axis.set_ylabel("candidate fraction")
    axis.set_ylim(-0.05, 1.05)
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure


def decision_markdown(decision: Decision) -> str:
    """A Prefect markdown artifact: the decision, its reasons and evidence."""
    lines = [f"## Rollout {decision.channel}/{decision.target}: **{decision.action}** v{decision.version}", "",
             f"fraction {decision.fraction_before:g} -> {decision.fraction_after:g} at {decision.at.isoformat()}", "",
             *[f"- {reason}" for reason in decision.reasons], "", "```json",
             json.dumps(decision.evidence, indent=1, default=str)[:20000], "```"]
    return "\n".join(lines)
