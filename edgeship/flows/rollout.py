"""The rollout controller flow: advance, hold or abort each target's rollout on what the fleet reports.

(`rollout` in edgeship/flows/publish.py changes one target's fraction by hand; this flow decides it.)
A deployment runs it on an interval (prefect.yaml, `edgeship serve`); the Prefect UI's Run button starts
it with parameters (channel, targets, apply=false for a dry run). Each run:

    decide    one controller pass per target (edgeship.fleet.rollout.control_channel): read the rollups and
              decide without a lock, then apply each decision under the OTA writer lock
    record    the decision and its evidence: a tag and a timeline plot on the model version, a Prefect artifact
    metrics   fleet metrics of the candidate and the base on their MLflow model versions
    drift     production drift past the threshold starts the scheduled-retraining deployment

    >>> rollout_controller(params_path="params.yaml", workdir=".", channel="stable")
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from edgeship.config import load_params
from edgeship.fleet.drift import drift_checks
from edgeship.fleet.policy import open_store
from edgeship.fleet.report import decision_markdown, record_in_mlflow, status_rows
from edgeship.fleet.rollout import TargetResult, control_channel
from edgeship.flows.figures import show_png
from edgeship.fleet.store import FleetStore
from edgeship.registry.tracking import tracking_uri_for


@task(name="record-decision", cache_policy=NO_CACHE)
def record_decision(result: TargetResult, store: FleetStore, tracking_uri: str, model_name: str,
                    in_mlflow: bool = True) -> None:
    """Evidence where people look: MLflow (tag, plot, fleet metrics) and Prefect (artifacts). A dry run's decision
    stays out of MLflow, whose tags say where the rollout stands."""
    logger = get_run_logger()
    decision = result.decision
    key = f"rollout-{decision.channel}-{decision.target}".lower()
    create_markdown_artifact(decision_markdown(decision), key=key,
                             description=f"Rollout decision for {decision.channel}/{decision.target}")
    rows = status_rows(result.snapshot)
    if rows:
        create_table_artifact(rows, key=f"fleet-{decision.channel}-{decision.target}".lower(),
                              description="Fleet telemetry per version and device class")
    if not in_mlflow:
        return
    try:
        plot = record_in_mlflow(tracking_uri, model_name, result, store)
        if plot is not None:  # the timeline in Prefect too
            run_id, artifact_file, png = plot
            show_png(png, tracking_uri, run_id, artifact_file, key=f"{key}-timeline",
                     description=f"Rollout of {decision.channel}/{decision.target}: fraction and decisions over time")
    except Exception as error:  # the registry may not know the version (a channel published elsewhere)
        logger.warning("could not record the decision on %s v%s in MLflow: %s", model_name, decision.version, error)


@task(name="check-drift", cache_policy=NO_CACHE)
def check_drift(repository, store: FleetStore, channel: str, params, now: datetime) -> list[str]:
    """Start retraining for each target whose production version drifted; returns the flow run ids."""
    started = drift_checks(repository, store, channel, params.rollout.retraining, now)
    for target, trigger, run_id in started:
        create_markdown_artifact(f"## Retraining started: {trigger.reason}\n\nflow run `{run_id}`",
                                 key=f"drift-{channel}-{target}".lower(), description="Drift started retraining")
    return [run_id for _, _, run_id in started]


@flow(name="rollout-controller", log_prints=True)
def rollout_controller(params_path: str = "params.yaml", workdir: str = ".", channel: str | None = None,
            targets: list[str] | None = None, apply: bool = True, check_drift_too: bool = True) -> list[dict]:
    """One controller pass over a channel: each target's decision, applied unless `apply` is false."""
    from edgeship.flows.publish import one_writer
    from edgeship.ota.repository import open_repository

    root = Path(workdir).resolve()
    params = load_params(root / params_path)
    channel = channel or params.ota.channel
    store = open_store(params.fleet, root)
    repository = open_repository(params.ota, root)
    tracking_uri = tracking_uri_for(params.registry, root)
    now = datetime.now(timezone.utc)
    try:
        # Read and decide without any lock; one OTA writer at a time across flows (publish, rollback, rollout)
        # only while a decision is applied.
        results = control_channel(repository, store, channel, params.rollout.policy_for(channel), now=now,
                                  apply=apply, targets=targets, writer=one_writer)
        for result in results:
            record_decision(result, store, tracking_uri, params.project.name, in_mlflow=apply)
        if check_drift_too and apply:  # a dry run changes nothing: it starts no retraining either
            check_drift(repository, store, channel, params, now)
    finally:
        store.close()
    return [r.decision.model_dump(mode="json") | {"applied": r.applied, "base_version": r.base_version}
            for r in results]
