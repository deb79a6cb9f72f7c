"""One pass of the rollout controller over a channel: read, decide, then apply under the writer lock.

For each target of the channel: the entry's rollout state (from the signed channel descriptor, read without
the lock), the fleet's rollups since the candidate's rollout began (`FleetStore.snapshot`: about one row
per device whatever the rollout's length), `decide()`. Only then, per decision that changes something, the
OTA writer lock is taken (`writer`, e.g. Prefect's one-writer limit, and the repository's own lock): the entry
is read again and the decision applied only if the entry is still what it was decided on (same candidate,
fraction and state; `expected_version` guards the candidate too), else it is recorded as not applied and the
next pass decides again. Reading the store never holds the lock: a 100,000-device pass does not stall a
publish. The decision is stored with its evidence either way. The production (base) version's drift is
checked too; past the policy's threshold it starts the retraining deployment (`edgeship.fleet.drift`).

    >>> results = control_channel(repository, store, "stable", params.rollout.policy_for("stable"))
    >>> [(r.decision.target, r.decision.action, r.applied) for r in results]

Hand commands (`hand_command`: pause, resume, abort) go through the same API and are stored as
decisions too, so the timeline shows who did what and why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone

from edgeship.errors import ReleaseError
from edgeship.fleet.aggregate import FleetSnapshot
from edgeship.fleet.controller import Decision, RolloutStatus, decide
from edgeship.fleet.policy import ChannelPolicy
from edgeship.fleet.report import decision_line
from edgeship.fleet.store import FleetStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetResult:
    decision: Decision
    snapshot: FleetSnapshot
    applied: bool
    base_version: str | None
    status: RolloutStatus | None = None     # what the decision was made on


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


class ChannelChanged(ReleaseError):
    """The entry changed between the decision and its application (a hand command, a publish)."""


def apply_decision(repository, decision: Decision) -> bool:
    """Carry out an advance, complete or abort through the OTA rollout API; False for hold/none.

    Under the lock the entry must still be what the decision was made on (its candidate, fraction and
    state), else ChannelChanged is raised and nothing changes."""
    from edgeship.ota import rollout as ota_rollout

    def unchanged(entry):
        candidate = entry.candidate.version if entry.candidate else None
        if (candidate, entry.rollout_state) != (decision.version, "in_progress") or \
                abs(entry.fraction - decision.fraction_before) > 1e-9:
            raise ChannelChanged(f"the entry changed while deciding (candidate v{candidate} at {entry.fraction:g}, "
                                 f"{entry.rollout_state}; decided on v{decision.version} at "
                                 f"{decision.fraction_before:g}): the next pass decides again")
        return entry

    if decision.action in ("advance", "complete"):
        ota_rollout.change_entry(repository, decision.channel, decision.target,
                                 f"rollout {decision.target} to {decision.fraction_after:g}",
                                 lambda entry: ota_rollout.widen(unchanged(entry), decision.fraction_after,
                                                                 decision.version))
    elif decision.action == "abort":
        reason = "; ".join(decision.reasons)[:500]
        ota_rollout.change_entry(repository, decision.channel, decision.target,
                                 f"abort {decision.target}: {reason}",
                                 lambda entry: ota_rollout.abort_entry(unchanged(entry), reason, decision.version))
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


def plan_target(store: FleetStore, channel: str, target: str, entry, policy: ChannelPolicy,
                now: datetime) -> TargetResult:
    """Read the rollups and decide one target's next step (nothing applied, nothing recorded)."""
    candidate = entry.candidate.version if entry.candidate else None
    decisions = store.decisions(channel, target, version=candidate, evidence=False) if candidate else []
    status = rollout_status(entry, channel, target, decisions, now)
    # The whole rollout of the candidate is the evidence (devices that joined in earlier stages still count);
    # the stage's start only bounds its soak.
    since = rollout_started_at(decisions, status.candidate_version, now) if status.candidate_version else None
    snapshot = store.snapshot(channel, target, since=since, reference=entry.drift_reference,
                              versions=[v for v in (status.candidate_version, status.base_version) if v])
    return TargetResult(decide(snapshot, status, policy, now), snapshot, False, status.base_version, status)


def control_target(repository, store: FleetStore, channel: str, target: str, entry, policy: ChannelPolicy,
                   now: datetime, apply: bool = True,
                   writer: Callable[[], AbstractContextManager] = nullcontext) -> TargetResult:
    """Decide one target's next step, apply it (under `writer` and the repository's lock) and record it."""
    planned = plan_target(store, channel, target, entry, policy, now)
    decision, applied = planned.decision, False
    if apply and decision.action in ("advance", "complete", "abort"):
        try:
            with writer():
                applied = apply_decision(repository, decision)
        except ReleaseError as error:
            decision = decision.model_copy(update={"reasons": [*decision.reasons, f"not applied: {error}"]})
    if decision.action != "none":
        store.add_decision(channel=channel, target=target, version=decision.version, action=decision.action,
                           fraction_before=decision.fraction_before, fraction_after=decision.fraction_after,
                           reasons=decision.reasons, evidence=decision.evidence, applied=applied, at=now)
    logger.info("rollout %s: %s", channel, decision_line(decision.model_dump() | {
        "applied": applied, "base_version": planned.base_version}))
    return TargetResult(decision, planned.snapshot, applied, planned.base_version, planned.status)


def control_channel(repository, store: FleetStore, channel: str, policy: ChannelPolicy,
                    now: datetime | None = None, apply: bool = True, targets: list[str] | None = None,
                    writer: Callable[[], AbstractContextManager] = nullcontext) -> list[TargetResult]:
    """One controller pass over every target of a channel (or the named ones); the lock only to apply."""
    from edgeship.ota.rollout import read_channel

    now = now or datetime.now(timezone.utc)
    repository.refresh()
    descriptor = read_channel(repository, channel)
    if descriptor is None:
        return []
    return [control_target(repository, store, channel, target, entry, policy, now, apply, writer)
            for target, entry in sorted(descriptor.targets.items()) if targets is None or target in targets]


def base_snapshot(store: FleetStore, channel: str, target: str, entry, since: datetime | None) -> FleetSnapshot:
    """The production version's rollups (for drift), since `since`."""
    version = entry.base.version if entry.base is not None else None
    return store.snapshot(channel, target, since=since, versions=[version] if version else [],
                          reference=entry.drift_reference)


def hand_command(repository, store: FleetStore, command: str, channel: str, target: str, reason: str,
                 version: str | None = None) -> None:
    """pause | resume | abort by an operator, applied and recorded like a controller decision."""
    from edgeship.ota import rollout as ota_rollout

    if command == "pause":
        descriptor = ota_rollout.pause(repository, channel, target, reason, expected_version=version)
    elif command == "resume":
        descriptor = ota_rollout.resume(repository, channel, target, expected_version=version)
    elif command == "abort":
        repository.refresh()
        before = ota_rollout.read_channel(repository, channel)
        was = before.targets.get(target) if before else None
        version = version or (was.candidate.version if was and was.candidate else None)
        descriptor = ota_rollout.abort(repository, channel, target, reason, expected_version=version)
    else:
        raise ValueError(f"unknown command {command!r}; use pause, resume or abort")
    entry = descriptor.targets[target]
    version = version or (entry.candidate.version if entry.candidate else None)
    fraction = was.fraction if command == "abort" else entry.fraction   # where the rollout stood when told
    store.add_decision(channel=channel, target=target, version=version, action=command, fraction_before=fraction,
                       fraction_after=entry.fraction, reasons=[f"{command} by hand: {reason}"], evidence={},
                       applied=True)
