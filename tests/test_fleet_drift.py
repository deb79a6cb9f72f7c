"""Drift on the production version starts the scheduled-retraining deployment, on a real Prefect API."""

from __future__ import annotations

import asyncio

import pytest
from datetime import timedelta

from edgeship.records.telemetry import DriftReference
from edgeship.fleet.aggregate import aggregate
from edgeship.fleet.drift import retraining_trigger, start_retraining
from edgeship.fleet.policy import RetrainingPolicy

from fleet_records import T0, record

REFERENCE = DriftReference(classes=10, class_distribution=[0.1] * 10, confidence_histogram=[0] * 8 + [0.5, 0.5],
                           version="7")
POLICY = RetrainingPolicy(max_drift_psi=0.2, min_samples=500, cooldown_s=3600)


def production(classes):
    records = [record(f"d{i}", "7", classes=classes) for i in range(5)]
    return aggregate(records, reference=REFERENCE).version("7")


def test_trigger_only_past_the_threshold_with_enough_samples_and_outside_the_cooldown():
    assert retraining_trigger(production([20] * 10), POLICY, None, T0) is None           # no drift
    drifted = production([110, 58] + [4] * 8)
    trigger = retraining_trigger(drifted, POLICY, None, T0)
    assert trigger is not None and trigger.version == "7"
    assert "PSI" in trigger.reason and "over 1000 answers from 5 devices" in trigger.reason
    assert retraining_trigger(drifted, POLICY, T0 - timedelta(seconds=60), T0) is None    # cooling down
    assert retraining_trigger(drifted, POLICY, T0 - timedelta(seconds=4000), T0) is not None
    few = aggregate([record("d0", "7", classes=[30, 10] + [1] * 8)], reference=REFERENCE).version("7")
    assert retraining_trigger(few, POLICY, None, T0) is None                               # 48 answers < 500


def test_drift_starts_the_retraining_deployment_with_the_reason(prefect_api, tmp_path):
    from prefect import get_client

    from edgeship.flows.release import release

    deployment_id = release.to_deployment(name="scheduled-retraining",
                                          parameters={"workdir": str(tmp_path)}).apply()
    trigger = retraining_trigger(production([110, 58] + [4] * 8), POLICY, None, T0)
    run_id = start_retraining("release/scheduled-retraining", trigger.reason)

    async def read():
        async with get_client() as client:
            return await client.read_flow_run(run_id)

    run = asyncio.run(read())
    assert str(run.deployment_id) == str(deployment_id)
    assert run.parameters["reason"] == trigger.reason and run.parameters["workdir"] == str(tmp_path)
    assert "drift" in run.tags


def test_a_release_carries_its_test_split_distributions_as_drift_reference(tmp_path):
    import numpy as np

    from edgeship.fleet.drift import release_drift_reference

    from ota_world import make_artifact

    artifact = make_artifact(tmp_path, "5")
    x = np.random.default_rng(0).standard_normal((40, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "test.npz", x=x, y=np.zeros(40))
    reference = DriftReference.model_validate(release_drift_reference(tmp_path / "test.npz", [artifact], "5"))
    assert reference.samples == 40 and reference.version == "5" and reference.classes == 10
    assert sum(reference.class_distribution) == pytest.approx(1.0)
    assert sum(reference.confidence_histogram) == pytest.approx(1.0)
    # the label-free estimate's calibration: accuracy per confidence tenth; weighted by the tenths' shares it is the
    # split's accuracy (every label 0 here: the share answered 0); a tenth no answer fell in has none
    per_bin = reference.confidence_accuracy
    assert [a is None for a in per_bin] == [share == 0 for share in reference.confidence_histogram]
    assert sum(share * (a or 0.0) for share, a in zip(reference.confidence_histogram, per_bin)) == \
        pytest.approx(reference.class_distribution[0], abs=1e-5)
    assert release_drift_reference(tmp_path / "missing.npz", [artifact], "5") is None


def test_the_cooldown_holds_across_controller_passes_from_the_stored_retrain_decision(tmp_path):
    """Each pass of the controller checks drift afresh: the last `retrain` decision in the fleet store is what
    keeps a second start out of the cooldown, and once it has passed, drift that persists starts another."""
    from datetime import datetime, timezone

    from edgeship.fleet.drift import drift_checks
    from edgeship.fleet.store import FleetStore

    from ota_world import TARGET, OtaWorld

    world = OtaWorld(tmp_path)
    world.publish("7", drift_reference=REFERENCE.model_dump())
    store = FleetStore(f"sqlite:///{tmp_path}/fleet.db")
    now = datetime.now(timezone.utc)
    store.add_batch([record(f"d{i}", "7", at=now, target=TARGET, classes=[110, 58] + [4] * 8) for i in range(5)])
    policy = POLICY.model_copy(update={"window_s": 3 * 3600})       # the same records count in every pass below
    started: list[str] = []

    def passes_at(seconds: float) -> list[str]:
        at = now + timedelta(seconds=seconds)
        return [run for _, _, run in drift_checks(world.repository, store, "stable", policy, at,
                                                  start=lambda deployment, reason: started.append(reason)
                                                  or f"run-{len(started)}")]

    assert passes_at(0) == ["run-1"] and "fleet drift on production v7" in started[0]
    assert passes_at(60) == [] and passes_at(3599) == []                    # within cooldown_s (3600) of the start
    assert passes_at(3601) == ["run-2"]                                     # past it, the drift that persists
    assert passes_at(3700) == []                                            # counts from the second start now
    retrains = store.decisions("stable", TARGET, action="retrain", evidence=True)
    assert [d["evidence"]["flow_run_id"] for d in retrains] == ["run-1", "run-2"]
    store.close()
    world.close()
