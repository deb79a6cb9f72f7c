"""One pass of the rollout controller over a channel: read, aggregate, decide, apply, record.

For each target of the channel: the entry's rollout state (from the signed channel descriptor), the
fleet's telemetry since the candidate's rollout began (from the fleet store), `decide()`, then the
decision applied through the OTA rollout API (`edgeship.ota.rollout.set_fraction` / `abort`, each
under the repository's writer lock, guarded by `expected_version`) and stored with its evidence.
The production (base) version's drift is checked too; past the policy's threshold it starts the
retraining deployment (`edgeship.fleet.drift`).

    >>> results = control_channel(repository, store, "stable", params.rollout.policy_for("stable"))
    >>> [(r.decision.target, r.decision.action) for r in results]

Hand commands (`hand_command`: pause, resume, abort) go through the same API and are stored as
decisions too, so the timeline shows who did what and why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone

from edgeship.fleet.aggregate import FleetSnapshot, aggregate
from edgeship.fleet.controller import Decision, RolloutStatus, decide
from edgeship.fleet.policy import ChannelPolicy
from edgeship.fleet.store import FleetStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetResult:
    decision: Decision
    snapshot: FleetSnapshot
    applied: bool
    base_version: str | None


def stage_started_at(decisions: list[dict], version: str, fraction: float, now: datetime) -> datetime:
    """When the current stage of `version` began, from the stored decisions (now, when it changed outside them)."""
    start, current = None, None
    for d in decisions:
        if d["version"] != version:
            continue
        if d["applied"] and d["fraction_after"] != d["fraction_before"]:
            start, current = d["at"], d["fraction_after"]
        elif current is None or abs(d["fraction_before"] - current) > 1e-9:
            start, current = d["at"], d["fraction_before"]
    if start is None or current is None or abs(current - fraction) > 1e-9:
        return now
    return start


def rollout_started_at(decisions: list[dict], version: str, now: datetime) -> datetime:
    """When the controller first saw `version` as the candidate."""
    return next((d["at"] for d in decisions if d["version"] == version), now)


def rollout_status(entry, channel: str, target: str, decisions: list[dict], now: datetime) -> RolloutStatus:
    """A channel entry (FLEET_CONTRACT.md ChannelEntry) as the controller sees it."""
    candidate = entry.candidate
    version = candidate.version if candidate else None
    return RolloutStatus(
        channel=channel, target=target, base_version=entry.base.version if entry.base else None,
        candidate_version=version, fraction=entry.fraction if candidate else 0.0,
        stage_started_at=stage_started_at(decisions, version, entry.fraction, now) if version else None,
        shadow_version=entry.shadow.version if entry.shadow is not None and entry.shadow_fraction > 0 else None,
        rollout_state=entry.rollout_state if candidate else "completed",
        latency_budget_ms=(candidate or entry.base).latency_budget_ms if (candidate or entry.base) else None)


def apply_decision(repository, decision: Decision) -> bool:
    """Carry out an advance, complete or abort through the OTA rollout API; False for hold/none."""
    from edgeship.ota import rollout as ota_rollout

    if decision.action in ("advance", "complete"):
        ota_rollout.set_fraction(repository, decision.channel, decision.target, decision.fraction_after,
                                 expected_version=decision.version)
    elif decision.action == "abort":
        ota_rollout.abort(repository, decision.channel, decision.target, "; ".join(decision.reasons)[:500],
                          expected_version=decision.version)
    else:
        return False
    if decision.action == "abort" or decision.fraction_after >= 1.0:
        clear_shadow(repository, decision.channel, decision.target, decision.version)
    return True


def offer_shadow(repository, channel: str, target: str, shadow_fraction: float, sample_rate: float = 0.1):
    """Let the candidate already in the channel run as a shadow beside the base on `shadow_fraction` of the
    target's devices (edgeship.ota.publish.publish_shadow offers any other artifact)."""
    from edgeship.ota.rollout import ReleaseError, change_entry

    def change(entry):
        if entry.candidate is None:
            raise ReleaseError(f"target '{target}' has no candidate to shadow; publish one with a rollout fraction "
                               f"(0 for shadow only) first")
        return entry.model_copy(update={"shadow": entry.candidate, "shadow_fraction": shadow_fraction,
                                        "shadow_sample_rate": sample_rate})

    return change_entry(repository, channel, target, f"shadow {target} at {shadow_fraction:g}", change)


def clear_shadow(repository, channel: str, target: str, version: str | None) -> None:
    """Stop shadowing `version` (its rollout ended: aborted or complete)."""
    from edgeship.ota.publish import remove_shadow
    from edgeship.ota.rollout import read_channel

    descriptor = read_channel(repository, channel)
    entry = descriptor.targets.get(target) if descriptor else None
    if entry is not None and entry.shadow is not None and entry.shadow.version == version:
        remove_shadow(repository, channel, target)


def control_target(repository, store: FleetStore, channel: str, target: str, entry, policy: ChannelPolicy,
                   now: datetime, apply: bool = True) -> TargetResult:
    """Decide (and apply) the next step of one target's rollout."""
    decisions = store.decisions(channel, target)
    status = rollout_status(entry, channel, target, decisions, now)
    # The whole rollout of the candidate is the evidence (devices that joined in earlier stages still count);
    # the stage's start only bounds its soak.
    since = rollout_started_at(decisions, status.candidate_version, now) if status.candidate_version else None
    events = [e for e in store.events(channel, since=since) if e["target"] in (target, None)]
    snapshot = aggregate(store.records(channel, target, since=since), events, reference=entry.drift_reference,
                         since=since)
    decision = decide(snapshot, status, policy, now)
    applied = False
    if apply and decision.action in ("advance", "complete", "abort"):
        applied = apply_decision(repository, decision)
    if decision.action != "none":
        store.add_decision(channel=channel, target=target, version=decision.version, action=decision.action,
                           fraction_before=decision.fraction_before, fraction_after=decision.fraction_after,
                           reasons=decision.reasons, evidence=decision.evidence, applied=applied, at=now)
    logger.info("rollout %s/%s v%s: %s (%s)", channel, target, decision.version, decision.action,
                "; ".join(decision.reasons))
    return TargetResult(decision, snapshot, applied, status.base_version)


def control_channel(repository, store: FleetStore, channel: str, policy: ChannelPolicy,
                    now: datetime | None = None, apply: bool = True,
                    targets: list[str] | None = None) -> list[TargetResult]:
    """One controller pass over every target of a channel (or the named ones)."""
    from edgeship.ota.rollout import read_channel

    now = now or datetime.now(timezone.utc)
    # The whole pass holds the writer lock: decisions rest on the channel as it is, and nobody changes it
    # between a decision and its application (the commands inside share this lock).
    with repository.writing(f"rollout controller ({channel})"):
        descriptor = read_channel(repository, channel)
        if descriptor is None:
            return []
        return [control_target(repository, store, channel, target, entry, policy, now, apply)
                for target, entry in sorted(descriptor.targets.items()) if targets is None or target in targets]


def base_snapshot(store: FleetStore, channel: str, target: str, entry, since: datetime | None) -> FleetSnapshot:
    """The production version's telemetry (for drift), since `since`."""
    return aggregate(store.records(channel, target, since=since), (), reference=entry.drift_reference, since=since)


def hand_command(repository, store: FleetStore, command: str, channel: str, target: str, reason: str,
                 version: str | None = None) -> None:
    """pause | resume | abort by an operator, applied and recorded like a controller decision."""
    from edgeship.ota import rollout as ota_rollout

    if command == "pause":
        descriptor = ota_rollout.pause(repository, channel, target, reason, expected_version=version)
    elif command == "resume":
        descriptor = ota_rollout.resume(repository, channel, target, expected_version=version)
    elif command == "abort":
        before = ota_rollout.read_channel(repository, channel)
        version = version or (before.targets[target].candidate.version if before and target in before.targets
                              and before.targets[target].candidate else None)
        descriptor = ota_rollout.abort(repository, channel, target, reason, expected_version=version)
    else:
        raise ValueError(f"unknown command {command!r}; use pause, resume or abort")
    entry = descriptor.targets[target]
    version = version or (entry.candidate.version if entry.candidate else None)
    store.add_decision(channel=channel, target=target, version=version, action=command,
                       fraction_before=entry.fraction, fraction_after=entry.fraction if command != "abort" else 0.0,
                       reasons=[f"{command} by hand: {reason}"], evidence={}, applied=True)
