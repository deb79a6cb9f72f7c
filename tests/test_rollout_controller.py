"""The rollout controller's decisions on recorded fleet states: advance, hold, abort, complete.

Every state is stored in a fleet store and decided on from its rollups, as the controller reads them, with the
records' latency in exponential histograms and again in the fixed buckets of older devices (schema 1): the same
verdicts as the controller gave when it aggregated records one by one."""

from __future__ import annotations

from datetime import timedelta

import pytest

from edgeship.config import parse_params
from edgeship.records.telemetry import DriftReference
from edgeship.errors import ConfigError
from edgeship.fleet.controller import RolloutStatus, decide
from edgeship.fleet.policy import ChannelPolicy
from edgeship.fleet.store import FleetStore

from fleet_records import HISTOGRAMS, T0, record

POLICY = ChannelPolicy.model_validate({
    "stages": [0.05, 0.25, 1.0], "min_reporting_devices": 4, "soak_s": 600,
    "success": {"p99_budget_ms": {"pi4": 40}},
    "abort_criteria": [{"failure_type": t, "min_executed_devices": 3, "threshold_percentage": 20}
                       for t in ("install", "probation", "latency", "disagreement")]})
STATUS = RolloutStatus(channel="stable", target="onnx-int8", base_version="7", candidate_version="8", fraction=0.05,
                       stage_started_at=T0, latency_budget_ms=20.0)
NOW = T0 + timedelta(seconds=700)


def healthy(n=5, version="8", device_class="default", **kwargs):
    kwargs.setdefault("compared", ("7", 196, 200) if version != "7" else None)   # ~98% agreement with the base
    return [record(f"{device_class}-{i}", version, device_class=device_class,
                   events=[("installed", version, None), ("confirmed", version, None)], **kwargs) for i in range(n)]


@pytest.fixture(autouse=True, params=["exponential", "fixed"])
def histograms(request, monkeypatch):
    """Each scenario with today's exponential histograms and with the old fixed buckets (schema 1 records)."""
    monkeypatch.setitem(HISTOGRAMS, "format", request.param)
    return request.param


def decide_on(records, status=STATUS, policy=POLICY, now=NOW, reference=None):
    """The decision on these records as the controller reads them: stored, then read back from the rollups."""
    if not any(r.versions.active == status.base_version for r in records):   # the base cohort reports too
        records = records + [record(f"base-{i}", status.base_version) for i in range(5)]
    store = FleetStore("sqlite://")
    try:
        store.add_batch(records)
        snapshot = store.snapshot(status.channel, status.target, since=status.stage_started_at, reference=reference,
                                  versions=[status.candidate_version, status.base_version])
    finally:
        store.close()
    return decide(snapshot, status, policy, now)


def test_advance_when_soaked_enough_devices_and_every_criterion_met(histograms):
    base = [record(f"old-{i}", "7") for i in range(20)]
    decision = decide_on(base + healthy(5) + healthy(2, device_class="pi4", p99_ms=30.0))
    assert decision.action == "advance" and decision.fraction_after == 0.25, decision.reasons
    assert decision.evidence["candidate"]["devices"] == 7
    # within 2% on exponential buckets; inside the old 1.2x-wide bucket for schema 1 records
    p99 = decision.evidence["candidate"]["p99_ms_by_device_class"]["pi4"]
    assert p99 == pytest.approx(30.0, rel=0.02 if histograms == "exponential" else 0.2)


def test_hold_while_soaking_or_too_few_devices_report():
    soaking = decide_on(healthy(5), now=T0 + timedelta(seconds=120))
    assert soaking.action == "hold" and soaking.fraction_after == 0.05
    assert soaking.reasons == ["hold: soaking 120/600 s"]
    few = decide_on(healthy(2))
    assert few.action == "hold" and "2/4 devices report the candidate" in few.reasons[0]
    base_on_pi4 = [record(f"old-{i}", "7", device_class="pi4") for i in range(5)]
    untried = decide_on(base_on_pi4 + healthy(5))  # the candidate has not run on a pi4 yet
    assert untried.action == "hold" and "no pi4 device has answered 50 times" in untried.reasons[0]
    nothing = decide_on([record("old-1", "7")])
    assert nothing.action == "hold" and "no device reports version 8" in nothing.reasons[0]


def test_abort_on_probation_rollbacks_over_the_minimum_of_executed_devices():
    bad = [record(f"d{i}", "8", events=[("installed", "8", None), ("rolled_back", "8", "probation: latency")])
           for i in range(2)]
    decision = decide_on(healthy(3) + bad, now=T0 + timedelta(seconds=30))  # no soak needed to abort
    assert decision.action == "abort" and decision.fraction_after == 0.0
    assert decision.reasons == ["abort: probation failures on 2/5 devices (40% >= 20%)"]
    assert decision.evidence["abort_criteria"]["probation"]["failed"] == ["d0", "d1"]
    assert decision.evidence["candidate"]["failure_reasons"] == {"rolled_back: probation: latency": 2}
    # one failure in two executed devices is below the minimum: not an abort yet
    assert decide_on(healthy(1) + bad[:1]).action == "hold"


def test_abort_when_one_device_class_misses_its_p99_budget():
    # 2% of 1000 answers each at 60 ms: the pi4 budget is 40 ms (default class 20 ms); significant at 1%
    slow = healthy(3, device_class="pi4", p99_ms=60.0, classes=[100] * 10)
    decision = decide_on(healthy(4) + slow)
    assert decision.action == "abort" and "latency failures on 3/7 devices" in decision.reasons[0]
    tail = decision.evidence["abort_criteria"]["latency"]["over_budget"]["pi4-0"]
    assert tail["over_budget"] == 20 and tail["answers"] == 1000 and tail["p_value"] < 0.01
    # the same tail in 200 answers (4 over budget) is not evidence yet (P ~ 0.14): the stage holds for more
    assert decide_on(healthy(4) + healthy(3, device_class="pi4", p99_ms=60.0)).action == "hold"


SMALL = POLICY.model_copy(update={"success": POLICY.success.model_copy(update={"p99_budget_ms": {"small": 50.0}})})


def loaded_host(version: str, n: int, tail_share: float = 0.03, first: int = 0, **kwargs):
    """`small` devices on a loaded 2-core host: answers in ~1 ms, but `tail_share` of them preempted to 80 ms."""
    kwargs.setdefault("compared", ("7", 98, 100) if version != "7" else None)
    return [record(f"{version}-small-{first + i}", version, device_class="small", p50_ms=1.0, p99_ms=80.0,
                   tail_share=tail_share, classes=[10] * 10, events=[("installed", version, None),
                                                                      ("confirmed", version, None)], **kwargs)
            for i in range(n)]


def test_a_noisy_tail_the_base_shares_on_a_loaded_host_does_not_abort():
    # base and candidate both lose ~3-5% of their answers (100 each) to preemption: every device's p99 is over
    # the 50 ms budget, and the old rule failed them all; against the base there it is no evidence
    base, candidate = loaded_host("7", 10), loaded_host("8", 3, tail_share=0.05) + loaded_host("8", 2, first=3)
    decision = decide_on(base + candidate, policy=SMALL)
    assert decision.action == "advance", decision.reasons
    latency = decision.evidence["abort_criteria"]["latency"]
    assert latency["executed"] == 5 and latency["failed"] == []
    assert latency["over_budget"]["8-small-0"]["allowed_share"] == pytest.approx(0.06)
    # the incident of benchmarks/rollout.py --devices 20: two executed devices, one preempted answer in 40 on one
    incident = [record("c-0", "8", device_class="small", p50_ms=1.0, p99_ms=70.0, tail_share=0.025,
                       classes=[4] * 10), record("c-1", "8", device_class="small", p50_ms=1.0, classes=[4] * 10)]
    policy = SMALL.model_copy(update={"min_samples_per_device": 40, "min_reporting_devices": 2, "abort_criteria": [
        c.model_copy(update={"min_executed_devices": 2, "threshold_percentage": 40}) for c in SMALL.abort_criteria]})
    assert decide_on(loaded_host("7", 10) + incident, policy=policy).action != "abort"
    assert decide_on(incident, policy=policy).action != "abort"  # no base on the class: the budget alone, still 1 in 40


def test_a_truly_slow_candidate_aborts_on_the_same_loaded_host():
    base = loaded_host("7", 10)
    slow = [record(f"slow-{i}", "8", device_class="small", p50_ms=60.0, p99_ms=80.0, classes=[1] * 10)
            for i in range(3)]                               # every answer over budget, 10 answers each
    decision = decide_on(base + slow, policy=SMALL, now=T0 + timedelta(seconds=30))
    assert decision.action == "abort" and "latency failures on 3/3 devices" in decision.reasons[0]
    # a tail far worse than the base's there (20% vs 3% of answers) is the candidate's doing too
    heavy = loaded_host("8", 4, tail_share=0.2)
    decision = decide_on(base + heavy, policy=SMALL)
    assert decision.action == "abort" and "latency failures on 4/4 devices" in decision.reasons[0]
    over = decision.evidence["abort_criteria"]["latency"]["over_budget"]["8-small-0"]
    assert over["allowed_share"] == pytest.approx(0.06) and over["over_budget"] == 20


def test_abort_when_the_shadow_disagrees_with_the_active_model():
    shadows = [record(f"s{i}", "7", shadow=("8", 30 if i < 2 else 99, 100)) for i in range(4)]   # 30%: a failure
    # shadow cohort only: the candidate answers nowhere yet
    status = STATUS.model_copy(update={"fraction": 0.0, "shadow_version": "8"})
    decision = decide_on(shadows, status=status)
    assert decision.action == "abort" and "disagreement failures on 2/4 devices" in decision.reasons[0]
    agreeing = [record(f"s{i}", "7", shadow=("8", 99, 100)) for i in range(4)]
    start = decide_on(agreeing, status=status)
    assert start.action == "advance" and start.fraction_after == 0.05
    waiting = decide_on(agreeing[:2], status=status)
    assert waiting.action == "hold" and waiting.reasons == ["hold: 2/4 devices report the shadow"]
    soaking = decide_on(agreeing, status=status, now=T0 + timedelta(seconds=10))
    assert soaking.action == "hold" and soaking.reasons[0].startswith("hold: soaking")


def test_hold_on_drift_and_complete_at_full_rollout():
    # what the release's test split looked like: classes balanced, confidence in the top two bins
    reference = DriftReference(classes=10, class_distribution=[0.1] * 10, confidence_histogram=[0] * 8 + [0.5, 0.5])
    drifted = healthy(5, classes=[180, 20] + [0] * 8)
    decision = decide_on(drifted, reference=reference)
    assert decision.action == "hold" and any("drift PSI" in r for r in decision.reasons)
    assert decide_on(healthy(5), reference=reference).action == "advance"
    full = decide_on(healthy(5), status=STATUS.model_copy(update={"fraction": 1.0}))
    assert full.action == "complete"


def test_paused_and_finished_rollouts_are_left_alone():
    for state in ("paused", "aborted", "completed"):
        decision = decide_on(healthy(5), status=STATUS.model_copy(update={"rollout_state": state}))
        assert decision.action == "none" and decision.reasons == [f"rollout is {state}"]


def test_exponential_rate_and_policy_errors_name_the_key():
    policy = ChannelPolicy.model_validate({"exponential_rate": {"base_fraction": 0.02, "increment_factor": 3}})
    assert [policy.next_fraction(f) for f in (0.0, 0.02, 0.18, 0.54)] == pytest.approx([0.02, 0.06, 0.54, 1.0])
    with pytest.raises(ConfigError, match="rollout.channels.canary.stages"):
        parse_params({"rollout": {"channels": {"canary": {"stages": [0.5, 0.1, 1.0]}}}})
    assert parse_params({}).rollout.policy_for("stable").first_stage == 0.01


def test_a_grossly_slow_release_fails_devices_before_their_minimum_of_answers():
    # 10 answers each, 5+ of them far over the pi4 budget: conclusive although fewer than min_samples (50)
    slow = [record(f"p{i}", "8", device_class="pi4", p50_ms=900.0, p99_ms=900.0, classes=[1] * 10,
                   events=[("installed", "8", None)]) for i in range(3)]
    assert decide_on(slow, now=T0 + timedelta(seconds=5)).action == "abort"
    few_spikes = [record(f"q{i}", "8", device_class="pi4", p50_ms=1.0, p99_ms=900.0, classes=[1] * 10,
                         events=[("installed", "8", None)]) for i in range(3)]
    assert decide_on(few_spikes, now=T0 + timedelta(seconds=5)).action == "hold"  # one spike each: not yet
    cold = [record(f"c{i}", "8", device_class="pi4", p50_ms=900.0, p99_ms=900.0, classes=[1] * 3,
                   events=[("installed", "8", None)]) for i in range(3)]
    assert decide_on(cold, now=T0 + timedelta(seconds=5)).action == "hold"  # three slow first answers: not yet


def criterion(kind: str, threshold: float = 20.0, minimum: int = 3) -> dict:
    return {"failure_type": kind, "min_executed_devices": minimum, "threshold_percentage": threshold}


def policy_with(abort_criteria: list[dict]) -> ChannelPolicy:
    return POLICY.model_copy(update={"abort_criteria": ChannelPolicy.model_validate(
        {"abort_criteria": abort_criteria}).abort_criteria})


def refused(n: int, first: int = 0):
    """Devices that refused the candidate at install: they keep answering with the base."""
    return [record(f"refused-{first + i}", "7", events=[("refused", "8", "smoke test")]) for i in range(n)]


def rolled_back(n: int):
    return [record(f"rolled-{i}", "7", events=[("installed", "8", None), ("rolled_back", "8", "probation: errors")])
            for i in range(n)]


def slow(n: int):
    return [record(f"slow-{i}", "8", device_class="pi4", p50_ms=900.0, p99_ms=900.0, classes=[10] * 10,
                   events=[("installed", "8", None)]) for i in range(n)]


def disagreeing(n: int):
    return [record(f"shadow-{i}", "7", shadow=("8", 30, 100)) for i in range(n)]


# Each failure type on 2 of 5 executed devices (40%): (kind, the fleet, executed devices, failed devices)
ABORTS = {
    "install": (lambda: healthy(3) + refused(2), 5, 2),
    "probation": (lambda: healthy(3) + rolled_back(2), 5, 2),
    "latency": (lambda: healthy(3, device_class="pi4") + slow(2), 5, 2),
    "disagreement": (lambda: healthy(5, compared=None) + [record(f"agree-{i}", "7", shadow=("8", 99, 100))
                                                          for i in range(3)]
                     + disagreeing(2), 5, 2),
    "fallback": (lambda: healthy(3) + [record(f"fb-{i}", "8", fallback_activations=4) for i in range(2)], 5, 2),
}


@pytest.mark.parametrize("kind", sorted(ABORTS))
def test_every_abort_criterion_aborts_on_its_own_failures_and_only_past_its_threshold(kind):
    fleet, executed, failed = ABORTS[kind]
    decision = decide_on(fleet(), policy=policy_with([criterion(kind)]), now=T0 + timedelta(seconds=30))  # no soak
    assert decision.action == "abort" and decision.fraction_after == 0.0, decision.reasons
    assert decision.reasons == [f"abort: {kind} failures on {failed}/{executed} devices (40% >= 20%)"]
    assert decision.evidence["abort_criteria"][kind]["failed_devices"] == failed
    # the same fleet under a higher threshold, or before enough devices executed: no abort on this criterion
    assert decide_on(fleet(), policy=policy_with([criterion(kind, threshold=50)])).action != "abort"
    assert decide_on(fleet(), policy=policy_with([criterion(kind, minimum=6)])).action != "abort"
    # and the other failure types do not see these failures as theirs
    others = [criterion(other) for other in ABORTS if other != kind]
    assert not any(kind in reason for reason in decide_on(fleet(), policy=policy_with(others)).reasons
                   if reason.startswith("abort"))


def test_the_all_criterion_counts_every_failure_type_together():
    # one refusal, one rollback, one device on its fallback, among 5: 20% each, 60% together
    fleet = healthy(2) + refused(1) + rolled_back(1) + [record("fb-0", "8", fallback_activations=2)]
    separately = policy_with([criterion(kind, threshold=50, minimum=1) for kind in ABORTS])
    assert decide_on(fleet, policy=separately).action != "abort"
    together = decide_on(fleet, policy=policy_with([criterion("all", threshold=50)]))
    assert together.action == "abort" and together.reasons == ["abort: all failures on 3/5 devices (60% >= 50%)"]
    assert together.evidence["abort_criteria"]["all"]["failed"] == ["fb-0", "refused-0", "rolled-0"]


NO_ABORT = policy_with([])
# Each success criterion unmet alone, at a stage that has soaked with enough devices: (the fleet, the one reason)
HOLDS = {
    "install success": (lambda: healthy(5) + refused(1), "install success 0.83 < 0.95"),
    "probation success": (lambda: healthy(5) + rolled_back(1), "probation success 0.83 < 0.95"),
    "p99 per device class": (lambda: healthy(4) + healthy(3, device_class="pi4", p99_ms=60.0, tail_share=0.05),
                             "p99 on pi4 "),
    "shadow agreement": (lambda: healthy(5) + [record(f"shadow-{i}", "7", shadow=("8", 90, 100)) for i in range(4)],
                         "shadow agreement 0.900 < 0.97"),
    "reporting devices": (lambda: healthy(3), "3/4 devices report the candidate"),
    "every device class": (lambda: healthy(5) + [record(f"old-pi4-{i}", "7", device_class="pi4") for i in range(2)],
                           "no pi4 device has answered 50 times with the candidate yet"),
}


@pytest.mark.parametrize("name", sorted(HOLDS))
def test_every_success_criterion_holds_the_stage_on_its_own(name):
    fleet, reason = HOLDS[name]
    decision = decide_on(fleet(), policy=NO_ABORT)
    assert decision.action == "hold" and decision.fraction_after == STATUS.fraction, decision.reasons
    assert len(decision.reasons) == 1 and decision.reasons[0].startswith(f"hold: {reason}"), decision.reasons
    healthy_stage = decide_on(healthy(5) + healthy(2, device_class="pi4"), policy=NO_ABORT)
    assert healthy_stage.action == "advance"                   # the same stage with every criterion met advances
