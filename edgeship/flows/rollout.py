"""The rollout controller flow: advance, hold or abort each target's rollout on what the fleet reports.

(`rollout` in edgeship/flows/publish.py changes one target's fraction by hand; this flow decides it.)
A deployment runs it on an interval (prefect.yaml, `edgeship serve`); the Prefect UI's Run button starts
it with parameters (channel, targets, apply=false for a dry run). Each run:

    decide    one controller pass per target (edgeship.fleet.rollout.control_channel)
    record    the decision and its evidence: a tag and a timeline plot on the model version, a Prefect artifact
    metrics   fleet metrics of the candidate and the base on their MLflow model versions
    drift     production drift past the threshold starts the scheduled-retraining deployment

    >>> rollout_controller(params_path="params.yaml", workdir=".", channel="stable")
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from edgeship.config import load_params
from edgeship.flows.figures import show_png
from edgeship.fleet.drift import retraining_trigger, start_retraining
from edgeship.fleet.policy import store_url_for
from edgeship.fleet.report import decision_markdown, log_decision, log_fleet_metrics, status_rows
from edgeship.fleet.rollout import TargetResult, base_snapshot, control_channel
from edgeship.fleet.store import FleetStore
from edgeship.registry.tracking import tracking_uri_for


@task(name="record-decision", cache_policy=NO_CACHE)
def record_decision(result: TargetResult, store: FleetStore, tracking_uri: str, model_name: str) -> None:
    """Evidence where people look: MLflow (tag, plot, fleet metrics) and Prefect (artifacts)."""
    logger = get_run_logger()
    decision = result.decision
    key = f"rollout-{decision.channel}-{decision.target}".lower()
    create_markdown_artifact(decision_markdown(decision), key=key,
                             description=f"Rollout decision for {decision.channel}/{decision.target}")
    rows = status_rows(result.snapshot)
    if rows:
        create_table_artifact(rows, key=f"fleet-{decision.channel}-{decision.target}".lower(),
                              description="Fleet telemetry per version and device class")
    try:
        plot = log_decision(tracking_uri, model_name, decision, store.decisions(decision.channel, decision.target))
        if plot is not None:
            run_id, artifact_file, png = plot
            show_png(png, tracking_uri, run_id, artifact_file, key=f"{key}-timeline",
                     description=f"Rollout of {decision.channel}/{decision.target}: fraction and decisions over time")
        for version in {decision.version, result.base_version} - {None}:
            stats = result.snapshot.version(version)
            if stats is not None:
                log_fleet_metrics(tracking_uri, model_name, stats)
    except Exception as error:  # the registry may not know the version (a channel published elsewhere)
        logger.warning("could not record the decision on %s v%s in MLflow: %s", model_name, decision.version, error)


@task(name="check-drift", cache_policy=NO_CACHE)
def check_drift(repository, store: FleetStore, channel: str, params, now: datetime) -> list[str]:
    """Start retraining for each target whose production version drifted; returns the flow run ids."""
    from edgeship.ota.rollout import read_channel

    policy = params.rollout.retraining
    descriptor = read_channel(repository, channel)
    started = []
    for target, entry in sorted((descriptor.targets if descriptor else {}).items()):
        if entry.base is None:
            continue
        snapshot = base_snapshot(store, channel, target, entry, since=now - timedelta(seconds=policy.window_s))
        previous = [d for d in store.decisions(channel, target) if d["action"] == "retrain"]
        trigger = retraining_trigger(snapshot.version(entry.base.version), policy,
                                     previous[-1]["at"] if previous else None, now)
        if trigger is None:
            continue
        run_id = start_retraining(policy.deployment, trigger.reason)
        store.add_decision(channel=channel, target=target, version=trigger.version, action="retrain",
                           fraction_before=1.0, fraction_after=1.0, reasons=[trigger.reason],
                           evidence={**trigger.evidence, "flow_run_id": run_id}, applied=True, at=now)
        create_markdown_artifact(f"## Retraining started: {trigger.reason}\n\nflow run `{run_id}`",
                                 key=f"drift-{channel}-{target}".lower(), description="Drift started retraining")
        started.append(run_id)
    return started


@flow(name="rollout-controller", log_prints=True)
def rollout_controller(params_path: str = "params.yaml", workdir: str = ".", channel: str | None = None,
            targets: list[str] | None = None, apply: bool = True, check_drift_too: bool = True) -> list[dict]:
    """One controller pass over a channel: each target's decision, applied unless `apply` is false."""
    from edgeship.flows.publish import one_writer
    from edgeship.ota.repository import open_repository

    root = Path(workdir).resolve()
    params = load_params(root / params_path)
    channel = channel or params.ota.channel
    store = FleetStore(store_url_for(params.fleet.store, root))
    repository = open_repository(params.ota, root)
    tracking_uri = tracking_uri_for(params.registry, root)
    now = datetime.now(timezone.utc)
    try:
        with one_writer():  # one OTA writer at a time across flows (publish, rollback, rollout)
            results = control_channel(repository, store, channel, params.rollout.policy_for(channel), now=now,
                                      apply=apply, targets=targets)
        for result in results:
            record_decision(result, store, tracking_uri, params.project.name)
        if check_drift_too:
            check_drift(repository, store, channel, params, now)
    finally:
        store.close()
    return [r.decision.model_dump(mode="json") | {"applied": r.applied} for r in results]
