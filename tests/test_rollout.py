"""Per-target staged rollout with a stable base, on a split fleet.

Cohorts are computed through the updater's own choice (`ChannelEntry.choose`, what
`DeviceUpdater` calls) over hundreds of device ids on two targets, on descriptors read
back from a real signed repository; a few real `edgeship-device update` processes
on loopback confirm that what the choice says is what devices install.
"""

from __future__ import annotations

import json
import math

import pytest

from edgeship.ota.publish import ReleaseError, read_channel, rollback_release
from edgeship.ota.rollout import abort, pause, resume, set_fraction
from ota_world import MODEL, TARGET, OtaWorld

OTHER = "tflite-int8"
FLEET = [f"dev-{i:04d}" for i in range(600)]


@pytest.fixture
def world(tmp_path):
    world = OtaWorld(tmp_path)
    yield world
    world.close()


def versions(world: OtaWorld, target: str) -> dict[str, str | None]:
    """What every device of the fleet would run on `target` now."""
    entry = read_channel(world.repository, "stable").targets[target]
    chosen = {}
    for device in FLEET:
        model, _ = entry.choose(device, MODEL)
        chosen[device] = model.version if model else None
    return chosen


def within_binomial(count: int, n: int, p: float) -> bool:
    sigma = math.sqrt(n * p * (1 - p))
    return abs(count - n * p) <= 4.5 * sigma + 1


def test_split_fleet_cohorts_widen_without_moving_anyone_back_and_targets_stay_apart(world):
    world.publish("1", targets=(TARGET, OTHER))
    world.publish("2", targets=(TARGET,), rollout_fraction=0.01)
    other_before = versions(world, OTHER)
    assert set(other_before.values()) == {"1"}

    had_it: set[str] = set()
    for fraction in (0.01, 0.1, 0.5):
        if fraction != 0.01:
            set_fraction(world.repository, "stable", TARGET, fraction, expected_version="2")
        chosen = versions(world, TARGET)
        cohort = {d for d, v in chosen.items() if v == "2"}
        assert within_binomial(len(cohort), len(FLEET), fraction), (fraction, len(cohort))
        assert had_it <= cohort, "widening moved a device back to the base"
        assert set(chosen.values()) == {"1", "2"}  # everyone else stays on the base
        assert versions(world, OTHER) == other_before, "touching onnx-int8 moved a tflite-int8 device"
        had_it = cohort

    descriptor = set_fraction(world.repository, "stable", TARGET, 1.0, expected_version="2")
    entry = descriptor.targets[TARGET]
    assert (entry.base.version, entry.candidate, entry.previous.version, entry.rollout_state) == \
        ("2", None, "1", "completed")
    assert set(versions(world, TARGET).values()) == {"2"}
    assert versions(world, OTHER) == other_before


def test_a_new_candidate_over_an_unfinished_one_replaces_it_and_keeps_the_base(world):
    world.publish("1")
    world.publish("2", rollout_fraction=0.1)
    descriptor = world.publish("3", rollout_fraction=0.1)
    entry = descriptor.targets[TARGET]
    assert (entry.base.version, entry.candidate.version, entry.fraction) == ("1", "3", 0.1)
    assert set(versions(world, TARGET).values()) == {"1", "3"}  # nobody is moved onto the unfinished v2

    with pytest.raises(ReleaseError, match="candidate is v3, not v2"):
        set_fraction(world.repository, "stable", TARGET, 0.5, expected_version="2")


def test_pause_resume_abort_and_rollback_act_on_one_target(world):
    world.publish("1", targets=(TARGET, OTHER))
    world.publish("2", targets=(TARGET, OTHER), rollout_fraction=0.5)
    pause(world.repository, "stable", TARGET, "error rate 3% > 2%")
    with pytest.raises(ReleaseError, match="paused"):
        set_fraction(world.repository, "stable", TARGET, 0.9, expected_version="2")
    resume(world.repository, "stable", TARGET)
    descriptor = abort(world.repository, "stable", TARGET, "error rate", expected_version="2")
    assert descriptor.targets[TARGET].rollout_state == "aborted" and descriptor.targets[TARGET].candidate is None
    assert set(versions(world, TARGET).values()) == {"1"}
    assert descriptor.targets[OTHER].candidate.version == "2"  # the other target's rollout goes on

    descriptor = rollback_release(world.repository, "stable", [OTHER])  # unfinished: rollback is abort
    assert descriptor.targets[OTHER].candidate is None and descriptor.targets[OTHER].base.version == "1"
    with pytest.raises(ReleaseError, match="no previous version"):
        rollback_release(world.repository, "stable", [TARGET])


def test_real_updater_processes_follow_the_cohort_the_choice_function_names(world):
    world.publish("1")
    world.publish("2", rollout_fraction=0.5)
    chosen = versions(world, TARGET)
    inside = next(d for d, v in chosen.items() if v == "2")
    outside = next(d for d, v in chosen.items() if v == "1")
    processes = {name: world.device_process(name) for name in (inside, outside)}
    for name, process in processes.items():
        out, err = process.communicate(timeout=120)
        report = json.loads(out.strip().splitlines()[-1])
        assert report["installed_version"] == chosen[name], (report, err)
        world.assert_runs(name, chosen[name])
    assert world.run_device(outside)["status"] == "not_in_cohort"  # on the base while the rollout runs

    set_fraction(world.repository, "stable", TARGET, 1.0, expected_version="2")
    assert world.run_device(outside)["installed_version"] == "2"
    world.assert_runs(outside, "2")


def test_updaters_from_before_per_target_rollouts_read_new_descriptors_and_stay_on_the_base(world):
    """The wire format the previous updater parsed (one model per entry, one fraction per channel)."""
    from pydantic import BaseModel, ConfigDict

    from edgeship.records import TensorSpec

    class OldReleased(BaseModel):
        model_config = ConfigDict(extra="ignore")
        version: str
        target_path: str
        sha256: str
        bytes: int
        runtime: str
        inputs: list[TensorSpec]

    class OldEntry(OldReleased):
        previous: OldReleased | None = None

    class OldDescriptor(BaseModel):
        model_config = ConfigDict(extra="ignore")
        channel: str
        model_name: str
        rollout_fraction: float = 1.0
        targets: dict[str, OldEntry]

    world.publish("1")
    world.publish("2", rollout_fraction=0.3)
    data = world.repository.get_target("channels/stable.json")
    old = OldDescriptor.model_validate_json(data)
    assert (old.rollout_fraction, old.targets[TARGET].version) == (1.0, "1")  # the base, for everyone
    assert old.targets[TARGET].sha256 == read_channel(world.repository, "stable").targets[TARGET].base.sha256


def test_publishing_the_base_again_withdraws_the_candidate(world):
    world.publish("1")
    world.publish("2", rollout_fraction=0.2)
    entry = world.publish("1").targets[TARGET]
    assert (entry.base.version, entry.candidate, entry.rollout_state) == ("1", None, "aborted")
    assert "published again" in entry.state_reason
