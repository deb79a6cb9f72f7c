"""The rollout controller's decision: a pure function of the fleet's state and the channel's policy.

A rollout of one target is a small state machine:

    pending -> stage 1 (first_stage) -> stage 2 -> ... -> completed (fraction 1.0: candidate becomes base)
          any stage -> aborted   (an abort criterion met: candidate removed, devices back on base)
          any stage -> paused -> (resume) -> the same stage

Each run of the controller reads one `FleetSnapshot` (edgeship.fleet.rollout aggregates the rollout so far) and
returns one `Decision`: `abort` as soon as an abort criterion holds (no soak: the blast radius is what
counts), else `advance` (or `complete`) when the stage has soaked, enough devices report the candidate
and every success criterion holds, else `hold` with the criteria still missing. The decision carries
the evidence it used, so every transition can be logged and explained.

Latency is judged as canary analysis (edgeship.fleet.latency): a device fails its class's p99 budget only
when its answers over budget are significantly more than allowed, and what is allowed is the budget's 1%
or, where the base release misses the budget too on that class over the same time (a loaded host), a
multiple of the base's share (`policy.latency`). A noisy host therefore holds nobody back and aborts
nothing; a candidate slower than the budget fails devices within a handful of answers.

    >>> decision = decide(snapshot, status, params.rollout.policy_for("stable"), now=datetime.now(timezone.utc))
    >>> decision.action, decision.fraction_after, decision.reasons
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from edgeship.fleet import field_accuracy
from edgeship.fleet.aggregate import FleetSnapshot, VersionStats
from edgeship.fleet.agreement import comparison_of, failed_on_agreement
from edgeship.fleet.cohort import cohort_verdicts
from edgeship.fleet.latency import allowed_tail, class_over_budget, judge_device
from edgeship.fleet.policy import AbortCriterion, ChannelPolicy

Action = Literal["advance", "complete", "hold", "abort", "none"]
# Before its minimum of answers a device fails on latency only with this many over budget as well: answers
# are not independent (a cold start after the hand-over, one preemption burst), two slow ones are no verdict.
EARLY_OVER_BUDGET = 5
# Evidence stays small at any fleet size: devices are listed up to this many per criterion (the counts are whole).
EVIDENCE_DEVICES = 100


class RolloutStatus(BaseModel):
    """Where one target's rollout stands (read from the channel entry)."""

    model_config = ConfigDict(frozen=True)
    channel: str
    target: str
    base_version: str | None = None
    candidate_version: str | None = None
    fraction: float = 0.0
    stage_started_at: datetime | None = None
    rollout_state: str = "in_progress"        # in_progress | completed | paused | aborted
    latency_budget_ms: float | None = None    # the gate's p99 budget for this target
    shadow_version: str | None = None         # the version shadowed on part of the fleet, if any


class Decision(BaseModel):
    model_config = ConfigDict(frozen=True)
    action: Action
    channel: str
    target: str
    version: str | None
    fraction_before: float
    fraction_after: float
    reasons: list[str]
    evidence: dict = Field(default_factory=dict)
    at: datetime


def _budget(policy: ChannelPolicy, status: RolloutStatus, device_class: str) -> float | None:
    return policy.success.p99_budget_ms.get(device_class, status.latency_budget_ms)


def _base_latency(base: VersionStats | None, device_class: str):
    cls = base.classes.get(device_class) if base is not None else None
    return cls.latency if cls is not None else None


def _failures(criterion: AbortCriterion, stats: VersionStats, policy: ChannelPolicy, status: RolloutStatus,
              base: VersionStats | None = None) -> tuple[set[str], set[str], dict]:
    """(executed devices, failed devices, per-device detail) of one failure type."""
    events = stats.events
    kinds = [criterion.failure_type] if criterion.failure_type != "all" else [
        "install", "probation", "latency", "disagreement", "fallback"]
    executed: set[str] = set()
    failed: set[str] = set()
    detail: dict = {}
    for kind in kinds:
        if kind == "install":
            executed |= set(events.installed) | set(events.refused)
            failed |= set(events.refused)
        elif kind == "probation":
            executed |= set(events.confirmed) | set(events.rolled_back)
            failed |= set(events.rolled_back)
        elif kind == "latency":
            for device, latency in stats.device_latency.items():
                device_class = stats.device_class_of.get(device, "default")
                budget = _budget(policy, status, device_class)
                if budget is None:
                    continue
                allowed = allowed_tail(_base_latency(base, device_class), budget, policy.latency,
                                       policy.min_samples_per_device)
                verdict = judge_device(latency, budget, allowed, policy.latency)
                # A device counts once it has its minimum of answers, or earlier when its tail already proves it
                # over budget (a grossly slow release must not wait for 50 answers per device).
                early = verdict.failed and verdict.over_budget >= EARLY_OVER_BUDGET
                if verdict.answers < policy.min_samples_per_device and not early:
                    continue
                executed.add(device)
                if verdict.failed:
                    failed.add(device)
                if verdict.over_budget:
                    detail[device] = verdict.model_dump()
        elif kind == "disagreement":
            # Shadow devices (the candidate beside the base) and devices serving it (the base beside the candidate):
            # a device fails when its agreement is significantly below `abort_below`, and counts once it has its
            # minimum of comparisons or has already failed.
            shadowed = {d: (round(share * stats.shadow.samples_by_device.get(d, 0)),
                            stats.shadow.samples_by_device.get(d, 0)) for d, share in stats.shadow.by_device.items()}
            compared = comparison_of(stats, status.base_version).by_device
            for device, (agreements, samples) in [*shadowed.items(), *compared.items()]:
                bad = failed_on_agreement(agreements, samples, policy.agreement.abort_below,
                                          policy.agreement.significance)
                if samples < policy.min_samples_per_device and not bad:
                    continue
                executed.add(device)
                if bad:
                    failed.add(device)
                    detail[device] = {"agreements": agreements, "samples": samples}
        elif kind == "fallback":
            executed |= set(stats.devices)
            failed |= {d for d, n in stats.device_fallbacks.items() if n > 0}
    return executed, failed, detail


def _abort_reasons(stats: VersionStats, policy: ChannelPolicy, status: RolloutStatus,
                   base: VersionStats | None = None) -> tuple[list[str], dict]:
    reasons, evidence = [], {}
    if policy.cohort.abort and base is not None and status.fraction > 0:
        for verdict in cohort_verdicts(stats.sums, base.sums, policy.cohort):
            if verdict.differs and not _base_moved(verdict.name, stats, base):
                reasons.append(f"abort: {_cohort_line(verdict)}")
    for criterion in policy.abort_criteria:
        executed, failed, detail = _failures(criterion, stats, policy, status, base)
        share = 100.0 * len(failed) / len(executed) if executed else 0.0
        evidence[criterion.failure_type] = {"executed": len(executed), "failed": sorted(failed)[:EVIDENCE_DEVICES],
                                            "failed_devices": len(failed), "failure_percentage": round(share, 2)}
        if detail and criterion.failure_type in ("latency", "all"):
            worst = sorted((d for d in detail if "p_value" in detail[d]),
                           key=lambda d: detail[d]["p_value"])[:EVIDENCE_DEVICES]
            evidence[criterion.failure_type]["over_budget"] = {d: detail[d] for d in sorted(worst)}
        if detail and criterion.failure_type in ("disagreement", "all"):
            disagreeing = [d for d in sorted(detail) if "agreements" in detail[d]][:EVIDENCE_DEVICES]
            evidence[criterion.failure_type]["disagreeing"] = {d: detail[d] for d in disagreeing}
        if len(executed) >= criterion.min_executed_devices and share >= criterion.threshold_percentage:
            reasons.append(f"abort: {criterion.failure_type} failures on {len(failed)}/{len(executed)} devices "
                           f"({share:.0f}% >= {criterion.threshold_percentage:g}%)")
    return reasons, evidence


def _unmet_success(stats: VersionStats | None, policy: ChannelPolicy, status: RolloutStatus,
                   base: VersionStats | None = None) -> list[str]:
    success = policy.success
    if stats is None:
        return [f"no device reports version {status.candidate_version} yet"]
    unmet = []
    if len(stats.devices) < policy.min_reporting_devices:
        unmet.append(f"{len(stats.devices)}/{policy.min_reporting_devices} devices report the candidate")
    # Every device class the base runs on must have tried the candidate: a fast class alone proves nothing
    # about a slow one.
    for device_class in sorted(base.classes if base is not None else ()):
        tried = stats.classes.get(device_class)
        if tried is None or tried.latency.total < policy.min_samples_per_device:
            unmet.append(f"no {device_class} device has answered {policy.min_samples_per_device} times with "
                         f"the candidate yet")
    events = stats.events
    if events.install_executed:
        rate = len(set(events.installed)) / events.install_executed
        if rate < success.min_install_success:
            unmet.append(f"install success {rate:.2f} < {success.min_install_success}")
    if events.probation_executed:
        rate = len(set(events.confirmed)) / events.probation_executed
        if rate < success.min_probation_success:
            unmet.append(f"probation success {rate:.2f} < {success.min_probation_success}")
    for device_class, cls in sorted(stats.classes.items()):
        budget = _budget(policy, status, device_class)
        if budget is None:
            continue
        # Over budget counts against the candidate only where it is worse than the base on this class here.
        allowed = allowed_tail(_base_latency(base, device_class), budget, policy.latency,
                               policy.min_samples_per_device, certain=True)
        if class_over_budget(cls.latency, budget, allowed):
            unmet.append(f"p99 on {device_class} {cls.p99_ms:.2f} ms > budget {budget:g} ms "
                         f"(over budget: {cls.latency.count_possibly_above(budget)}/{cls.latency.total} answers, "
                         f"{allowed:.1%} allowed)")
    if stats.shadow.agreement is not None and stats.shadow.agreement < success.min_shadow_agreement:
        unmet.append(f"shadow agreement {stats.shadow.agreement:.3f} < {success.min_shadow_agreement}")
    unmet += _unmet_comparison(stats, policy, status, base)
    if stats.drift is not None and stats.drift.score > success.max_drift_psi:
        unmet.append(f"drift PSI {stats.drift.score:.3f} > {success.max_drift_psi}")
    return unmet


def _unmet_comparison(stats: VersionStats, policy: ChannelPolicy, status: RolloutStatus,
                      base: VersionStats | None) -> list[str]:
    """The candidate's answers against the base's: compared often enough and agreeing; its cohort's class and
    confidence mix not different from the base cohort's."""
    if not status.base_version:
        return []      # a first release replaces nothing
    unmet = []
    wanted = policy.agreement
    compared = comparison_of(stats, status.base_version)
    if compared.samples < wanted.min_compared:
        unmet.append(f"compared with v{status.base_version} on {compared.samples}/{wanted.min_compared} answers")
    elif compared.agreement is not None and compared.agreement < wanted.min_agreement:
        unmet.append(f"agreement with v{status.base_version} {compared.agreement:.3f} < {wanted.min_agreement}")
    if policy.cohort.enabled:
        for verdict in cohort_verdicts(stats.sums, base.sums if base is not None else stats.sums.__class__(),
                                       policy.cohort):
            if not verdict.enough:
                unmet.append(f"{verdict.name} mix: {verdict.candidate_answers} candidate and {verdict.base_answers} "
                             f"base answers, {policy.cohort.min_answers} each needed")
            elif verdict.differs and not _base_moved(verdict.name, stats, base):
                unmet.append(_cohort_line(verdict))
    return unmet


def _base_moved(name: str, stats: VersionStats, base: VersionStats | None) -> bool:
    """Is the base cohort's mix further from the release's reference (its test split) than the candidate's? Then a
    difference is the base's: after a field shift, the retrained candidate answers as the test split expects
    where the base no longer does."""
    mine, theirs = stats.drift, base.drift if base is not None else None
    if mine is None or theirs is None:
        return False
    field = "class_psi" if name == "classes" else "confidence_psi"
    return getattr(mine, field) < getattr(theirs, field)


def _cohort_line(verdict) -> str:
    how = (f"chi-squared p={verdict.p_value:.2g}" if verdict.test == "chi2"
           else f"Jensen-Shannon distance {verdict.distance:.3f}")
    return (f"the candidate cohort's {verdict.name} mix differs from the base cohort's ({how}; "
            f"{verdict.candidate_answers} vs {verdict.base_answers} answers)")


def _unmet_shadow(stats: VersionStats | None, policy: ChannelPolicy, status: RolloutStatus) -> list[str]:
    shadow = stats.shadow if stats is not None else None
    if shadow is None or shadow.devices < policy.min_reporting_devices:
        return [f"{shadow.devices if shadow else 0}/{policy.min_reporting_devices} devices report the shadow"]
    if shadow.agreement is not None and shadow.agreement < policy.success.min_shadow_agreement:
        return [f"shadow agreement {shadow.agreement:.3f} < {policy.success.min_shadow_agreement}"]
    return []


def evidence_of(stats: VersionStats | None) -> dict:
    """The numbers a decision rests on, compact enough for a tag and an artifact."""
    if stats is None:
        return {}
    return {"devices": len(stats.devices), "inferences": stats.inferences, "errors": stats.errors,
            "fallback_activations": stats.fallback_activations,
            "p99_ms_by_device_class": {c: s.p99_ms for c, s in stats.classes.items()},
            "shadow_agreement": stats.shadow.agreement, "shadow_samples": stats.shadow.samples,
            "drift_psi": stats.drift.score if stats.drift else None,
            "estimated_accuracy": stats.estimated_accuracy.accuracy if stats.estimated_accuracy else None,
            "installed": len(stats.events.installed), "refused": len(stats.events.refused),
            "confirmed": len(stats.events.confirmed), "rolled_back": len(stats.events.rolled_back),
            "failure_reasons": stats.events.reasons}


def decide(snapshot: FleetSnapshot, status: RolloutStatus, policy: ChannelPolicy, now: datetime) -> Decision:
    """The next step of one target's rollout, with its reasons and evidence."""
    def decision(action: Action, after: float, reasons: list[str], evidence: dict | None = None) -> Decision:
        return Decision(action=action, channel=status.channel, target=status.target,
                        version=status.candidate_version, fraction_before=status.fraction, fraction_after=after,
                        reasons=reasons, evidence=evidence or {}, at=now)

    if status.candidate_version is None:
        return decision("none", status.fraction, ["no candidate is being rolled out"])
    if status.rollout_state != "in_progress":
        return decision("none", status.fraction, [f"rollout is {status.rollout_state}"])
    stats = snapshot.version(status.candidate_version)
    base = snapshot.version(status.base_version)
    evidence = {"candidate": evidence_of(stats), "base": evidence_of(base)}
    if stats is not None and status.base_version:
        compared = comparison_of(stats, status.base_version)
        evidence["compared"] = {"with": status.base_version, "samples": compared.samples,
                                "agreement": compared.agreement, "devices": compared.devices,
                                "confidence_diff": compared.confidence_diff, "p99_ms": compared.p99_ms}
        if base is not None:
            evidence["cohort"] = [v.model_dump() for v in cohort_verdicts(stats.sums, base.sums, policy.cohort)]
    if stats is not None:
        reasons, criteria = _abort_reasons(stats, policy, status, base)
        evidence["abort_criteria"] = criteria
        dropped, evidence["field_accuracy"] = field_accuracy.abort_on_drop(stats, base, policy.field_accuracy)
        reasons += dropped
        if reasons:
            return decision("abort", 0.0, reasons, evidence)
    if status.fraction <= 0 and status.shadow_version != status.candidate_version:
        return decision("advance", policy.first_stage, [f"start: first stage {policy.first_stage:g}"], evidence)
    # Stage 0 of a shadowed candidate: the shadow cohort's comparison must pass before any device answers with it.
    unmet = (_unmet_shadow(stats, policy, status) if status.fraction <= 0
             else _unmet_success(stats, policy, status, base) + field_accuracy.unmet(stats, policy.field_accuracy))
    if status.stage_started_at is not None:
        soaked = (now - status.stage_started_at).total_seconds()
        if soaked < policy.soak_s:
            unmet.insert(0, f"soaking {soaked:.0f}/{policy.soak_s:g} s")
    if unmet:
        return decision("hold", status.fraction, [f"hold: {u}" for u in unmet], evidence)
    if status.fraction <= 0:
        return decision("advance", policy.first_stage,
                        [f"start: the shadow agrees; first stage {policy.first_stage:g}"], evidence)
    if status.fraction >= 1.0:
        return decision("complete", 1.0, ["complete: every criterion met at 100%"], evidence)
    after = policy.next_fraction(status.fraction)
    return decision("advance", after, [f"advance: every criterion met at {status.fraction:g} -> {after:g}"], evidence)
