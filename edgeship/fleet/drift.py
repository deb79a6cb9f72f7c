"""Drift starts retraining: when the production version's fleet drift passes its threshold, start the
scheduled-retraining deployment through Prefect's API with the reason as a parameter.

    >>> trigger = retraining_trigger(snapshot.version("7"), params.rollout.retraining, last_started_at, now)
    >>> if trigger: start_retraining(params.rollout.retraining.deployment, trigger.reason)

The drift is the PSI of the fleet's summed class and confidence counts (the base version's rollups over
`window_s`) against the reference the release carries (edgeship.device.telemetry); at least `min_samples` answers, and at most one start per
`cooldown_s`, so one bad afternoon does not queue a dozen retrainings.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from edgeship.fleet.aggregate import VersionStats
from edgeship.fleet.policy import RetrainingPolicy


@dataclass(frozen=True)
class RetrainingTrigger:
    version: str
    reason: str
    evidence: dict


def retraining_trigger(stats: VersionStats | None, policy: RetrainingPolicy, last_started_at: datetime | None,
                       now: datetime) -> RetrainingTrigger | None:
    """A trigger when the production version drifted past the policy's threshold (else None)."""
    if stats is None or stats.drift is None:
        return None
    drift = stats.drift
    if drift.samples < policy.min_samples or drift.score <= policy.max_drift_psi:
        return None
    if last_started_at is not None and (now - last_started_at).total_seconds() < policy.cooldown_s:
        return None
    reason = (f"fleet drift on production v{stats.version}: PSI {drift.score:.3f} > {policy.max_drift_psi} "
              f"(classes {drift.class_psi:.3f}, confidence {drift.confidence_psi:.3f}) over {drift.samples} "
              f"answers from {len(stats.devices)} devices")
    return RetrainingTrigger(stats.version, reason, {"drift": drift.model_dump(), "devices": len(stats.devices)})


def drift_checks(repository, store, channel: str, policy: RetrainingPolicy, now: datetime,
                 start=None) -> list[tuple[str, RetrainingTrigger, str]]:
    """For each target whose production version drifted over the last `policy.window_s` (read from the rollups),
    start retraining (`start(deployment, reason)`, default `start_retraining`) and record it as a `retrain`
    decision; returns (target, trigger, flow run id) for each start."""
    from datetime import timedelta

    from edgeship.fleet.rollout import base_snapshot
    from edgeship.ota.rollout import read_channel

    start = start or start_retraining
    repository.refresh()
    descriptor = read_channel(repository, channel)
    started = []
    for target, entry in sorted((descriptor.targets if descriptor else {}).items()):
        if entry.base is None:
            continue
        snapshot = base_snapshot(store, channel, target, entry, since=now - timedelta(seconds=policy.window_s))
        previous = store.decisions(channel, target, action="retrain", evidence=False)
        trigger = retraining_trigger(snapshot.version(entry.base.version), policy,
                                     previous[-1]["at"] if previous else None, now)
        if trigger is None:
            continue
        run_id = start(policy.deployment, trigger.reason)
        store.add_decision(channel=channel, target=target, version=trigger.version, action="retrain",
                           fraction_before=1.0, fraction_after=1.0, reasons=[trigger.reason],
                           evidence={**trigger.evidence, "flow_run_id": run_id}, applied=True, at=now)
        started.append((target, trigger, run_id))
    return started


def start_retraining(deployment: str, reason: str, parameters: dict | None = None) -> str:
    """Start `flow/deployment` on the Prefect server in PREFECT_API_URL; returns the flow run's id."""
    from prefect.deployments import run_deployment

    run = run_deployment(name=deployment, parameters={**(parameters or {}), "reason": reason}, timeout=0,
                         tags=["edgeship", "drift"])
    return str(run.id)


def release_drift_reference(test_split: Path, artifacts, version: str, limit: int = 2000) -> dict | None:
    """The reference a release carries into its channel entries: its own class and confidence distributions
    on the pipeline's test split (a detector's: of its detections, with detections per frame and box sizes),
    from the first artifact that runs here; None without a test split."""
    import numpy as np

    from edgeship.device.detections import open_model
    from edgeship.device.telemetry import drift_reference
    from edgeship.device.telemetry_detection import detection_drift_reference
    from edgeship.fleet.estimate import confidence_accuracy
    from edgeship.tasks.data import images_of

    if not Path(test_split).is_file():
        return None
    with np.load(test_split) as arrays:
        inputs = images_of(arrays, limit).astype(np.float32, copy=False)
        labels = arrays["y"][:limit] if "y" in arrays.files else None
    for artifact in artifacts:
        try:
            session = open_model(artifact.runtime, artifact.path, threads=1, postprocess=artifact.postprocess)
            outputs = [np.asarray(session.run(inputs[i:i + 1])) for i in range(len(inputs))]
        except Exception:  # a runtime that does not run here (Core ML on Linux): try the next target
            continue
        if artifact.postprocess is not None:
            return detection_drift_reference(np.concatenate(outputs), artifact.postprocess.num_classes,
                                             version=str(version))
        flat = np.concatenate([o.reshape(1, -1) for o in outputs])
        reference = drift_reference(flat, version=str(version))
        if labels is not None and np.ndim(labels) == 1:   # the calibration of the label-free accuracy estimate
            reference = reference.model_copy(update={"confidence_accuracy": confidence_accuracy(flat, labels)})
        return reference.model_dump()
    return None
