"""The controller reads and decides without the OTA writer lock and applies only what it decided on; as a
service it runs a pass when telemetry arrives, a soak ends or its heartbeat is due, not on a fixed tick."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from edgeship.fleet.controller import Decision, RolloutStatus
from edgeship.fleet.policy import ChannelPolicy
from edgeship.fleet.rollout import TargetResult, control_channel, hand_command
from edgeship.fleet.service import ControllerService
from edgeship.fleet.store import FleetStore
from edgeship.ota.lock import LOCK_PATH
from edgeship.ota.rollout import read_channel

from fleet_records import record
from ota_world import TARGET, OtaWorld
from timing import scaled

POLICY = ChannelPolicy.model_validate({"stages": [0.5, 1.0], "min_reporting_devices": 3, "soak_s": 0,
                                       "abort_criteria": [{"failure_type": "probation"}]})


@pytest.fixture
def world(tmp_path):
    world = OtaWorld(tmp_path)
    world.publish("1")
    world.publish("2", rollout_fraction=0.5)
    yield world
    world.close()


def healthy_reports(store: FleetStore, version: str, devices: int) -> None:
    """`devices` serving `version` (installed, confirmed, agreeing with v1 on 98% of 100 compared answers) and
    three devices still on the base v1."""
    at = datetime.now(timezone.utc) + timedelta(seconds=31)
    store.add_batch([record(f"d{i}", version, at=at, target=TARGET, events=[("installed", version, None),
                                                                             ("confirmed", version, None)],
                            compared=("1", 98, 100)) for i in range(devices)]
                    + [record(f"base-{i}", "1", at=at, target=TARGET) for i in range(3)])


def test_the_pass_reads_without_the_lock_and_applies_only_what_it_decided_on(world, tmp_path, monkeypatch):
    store = FleetStore(f"sqlite:///{tmp_path}/fleet.db")
    control_channel(world.repository, store, "stable", POLICY)                 # marks the rollout's start
    healthy_reports(store, "2", 3)
    reading, seen_locked = store.snapshot, []

    def snapshot_while_an_operator_pauses(*args, **kwargs):
        seen_locked.append(world.repository.storage.get(LOCK_PATH) is not None)
        hand_command(world.repository, store, "pause", "stable", TARGET, "freeze")   # takes the lock meanwhile
        return reading(*args, **kwargs)

    monkeypatch.setattr(store, "snapshot", snapshot_while_an_operator_pauses)
    [result] = control_channel(world.repository, store, "stable", POLICY)
    assert seen_locked == [False]                                              # nobody held the lock to read
    assert result.decision.action == "advance" and not result.applied
    assert "not applied: the entry changed while deciding" in result.decision.reasons[-1]
    world.repository.refresh()
    entry = read_channel(world.repository, "stable").targets[TARGET]
    assert entry.rollout_state == "paused" and entry.fraction == 0.5           # the operator's pause stands

    monkeypatch.setattr(store, "snapshot", reading)
    hand_command(world.repository, store, "resume", "stable", TARGET, "thaw")
    [result] = control_channel(world.repository, store, "stable", POLICY)
    assert result.decision.action == "advance" and result.applied             # on an unchanged entry it applies
    world.repository.refresh()
    assert read_channel(world.repository, "stable").targets[TARGET].base.version == "2"
    store.close()


def hold_until(started: datetime) -> TargetResult:
    status = RolloutStatus(channel="stable", target=TARGET, candidate_version="2", fraction=0.5,
                           stage_started_at=started)
    decision = Decision(action="hold", channel="stable", target=TARGET, version="2", fraction_before=0.5,
                        fraction_after=0.5, reasons=["hold: soaking"], at=started)
    return TargetResult(decision, None, False, "1", status)


def test_the_service_runs_a_pass_on_new_telemetry_a_soak_ending_and_its_heartbeat(tmp_path):
    store = FleetStore(f"sqlite:///{tmp_path}/fleet.db")
    policy = POLICY.model_copy(update={"soak_s": scaled(3.0)})   # a loaded host is not past it too early
    stage_start = datetime.now(timezone.utc)
    reasons: list[str] = []
    service = ControllerService(lambda reason: reasons.append(reason) or [hold_until(stage_start)], store, "stable",
                                policy, min_interval_s=0.0, max_interval_s=30.0)
    assert service.step() and reasons == ["first pass"]
    assert not service.step()                                                  # nothing changed: no pass
    healthy_reports(store, "2", 1)
    assert service.step() and reasons[-1] == "new telemetry"
    assert not service.step()
    time.sleep(max(0.0, (stage_start + timedelta(seconds=policy.soak_s + 0.05) - datetime.now(timezone.utc)).total_seconds()))
    assert service.step() and reasons[-1] == "a stage's soak ended"
    service.max_interval_s = 0.1
    time.sleep(0.2)
    assert service.step() and reasons[-1] == "heartbeat"
    store.close()


def test_a_service_pass_decides_applies_and_checks_drift_on_its_heartbeat(tmp_path):
    from edgeship.config import parse_params
    from edgeship.fleet.service import controller_pass

    world = OtaWorld(tmp_path)
    reference = {"classes": 10, "class_distribution": [0.1] * 10, "confidence_histogram": [0.0] * 8 + [0.5, 0.5]}
    world.publish("1", drift_reference=reference)
    world.publish("2", rollout_fraction=0.5, drift_reference=reference)
    params = parse_params({"rollout": {"default": POLICY.model_dump(),
                                       "retraining": {"max_drift_psi": 0.2, "min_samples": 10}}})
    store = FleetStore(f"sqlite:///{tmp_path}/fleet.db")
    started: list[str] = []

    def run(reason: str):
        return controller_pass(world.repository, store, "stable", params, reason,
                               start_retraining=lambda deployment, why: started.append(why) or "run-1")

    assert [r.decision.action for r in run("first pass")] == ["hold"]
    healthy_reports(store, "2", 3)
    [result] = run("new telemetry")
    assert result.decision.action == "advance" and result.applied
    world.repository.refresh()
    assert read_channel(world.repository, "stable").targets[TARGET].base.version == "2"
    # the new production version drifts (every answer one class): only the heartbeat checks drift
    at = datetime.now(timezone.utc)
    store.add_batch([record(f"d{i}", "2", sequence=2, at=at, target=TARGET, classes=[200] + [0] * 9)
                     for i in range(3)])
    run("new telemetry")
    assert not started
    run("heartbeat")
    assert len(started) == 1 and "fleet drift on production v2" in started[0]
    assert store.decisions("stable", TARGET, action="retrain", evidence=False)
    store.close()
    world.close()
