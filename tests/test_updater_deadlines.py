"""The updater's waits end and its checks judge the model, not the clock: a repository that drips bytes, a wall
clock stepped forward during probation, and a model whose outputs are not what its target declares.

Each test runs the real updater against a real signed repository on loopback (tests/ota_world.py) and ends with
the device running a verified model and no good version marked bad.
"""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest

from edgeship.device.probation import ProbationPolicy
from edgeship.device.runtime import DeviceRuntime
from edgeship.device.state import DeviceState
from onnx_models import tiny_classifier
from ota_world import QUICK_PROBATION, OtaWorld, golden_inputs
from timing import scaled


@pytest.fixture
def world(tmp_path):
    world = OtaWorld(tmp_path)
    yield world
    world.close()


def bounded_check(device, limit_s: float):
    """One update check on a thread; fails the test (instead of hanging it) if it does not end within `limit_s`."""
    reports = []
    thread = threading.Thread(target=lambda: reports.append(device.update()), daemon=True)
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"the update check was still running after {limit_s:g} s"
    return reports[0]


def test_a_repository_that_drips_bytes_cannot_hold_the_updater_or_its_lock(world):
    """A model download at one byte per 0.5 s fails on the minimum rate; metadata dripped the same way fails at the
    check's time limit. Each check ends, frees the lock, keeps v1, and the next check after the fault installs v2."""
    world.publish("1")
    slow_network = dict(probation=QUICK_PROBATION, min_download_bytes_per_s=1024, download_grace_s=scaled(1),
                        check_timeout_s=scaled(4))
    device = world.device(**slow_network)
    assert device.update().status == "updated"
    world.publish("2")

    world.faults["models/"] = "drip"
    report = bounded_check(device, scaled(30))
    assert report.status == "error" and "slower than 1024 bytes/s" in report.reason, report
    assert report.installed_version == "1" and not (world.tmp_path / "device-1" / "downloads").exists()

    del world.faults["models/"]
    world.faults["timestamp.json"] = "drip"
    patient = world.device(**{**slow_network, "min_download_bytes_per_s": 1})  # only the check's limit is left
    report = bounded_check(patient, scaled(30))
    assert report.status == "error" and "time limit" in report.reason, report

    del world.faults["timestamp.json"]
    report = device.update()  # the lock was freed: no "another updater is working"
    assert (report.status, report.installed_version) == ("updated", "2"), report
    world.assert_runs("device-1", "2")
    assert DeviceState.load(world.tmp_path / "device-1").bad == []


def test_a_wall_clock_stepped_forward_does_not_end_a_probation(world):
    """NTP stepping the clock a day ahead after boot (a device without a real-time clock) makes a probation begun
    at the old time look a day old. Its deadline counts time served, so the runtime keeps the model and confirms it."""
    world.publish("1")
    world.device(probation=QUICK_PROBATION).update()
    world.publish("2")
    app_confirms = world.device(probation=ProbationPolicy(required=5, max_failures=1, deadline_s=scaled(600)),
                                self_check=False)
    assert app_confirms.update().on_probation
    state_path = world.tmp_path / "device-1" / "state.json"
    state = json.loads(state_path.read_text())
    for key in ("started_at", "deadline"):  # as the stepped clock reads them now: a day in the past
        stamp = DeviceState.model_validate(state).probation.model_dump()[key] - timedelta(days=1)
        state["probation"][key] = stamp.isoformat()
    state_path.write_text(json.dumps(state))

    assert app_confirms.update().status == "up_to_date"  # the updater's check finds nothing expired
    runtime = DeviceRuntime(world.tmp_path / "device-1")  # nor does the runtime starting up
    assert {runtime.predict(image[None]).version for image in golden_inputs(5)} == {"2"}
    state = DeviceState.load(world.tmp_path / "device-1")
    assert state.probation is None and state.bad == [] and state.active.version == "2"
    world.assert_runs("device-1", "2")


def test_without_golden_vectors_a_model_whose_outputs_differ_from_its_targets_spec_is_refused(world):
    """A 3-class model released for a 10-class target (its record declares outputs (1, 10)), without golden
    vectors: the updater runs it once, sees (1, 3), and refuses it before the swap."""
    world.publish("1")
    device = world.device(probation=QUICK_PROBATION)
    assert device.update().status == "updated"
    world.publish("2", content=tiny_classifier(classes=3, seed=2).SerializeToString(), outputs=(1, 10))

    report = device.update()
    assert report.status == "refused" and "model spec" in report.reason and "(1, 3)" in report.reason, report
    world.assert_runs("device-1", "1")
    assert [(b.version, b.reason) for b in DeviceState.load(world.tmp_path / "device-1").bad] == [("2", "model spec")]
    assert "marked bad" in device.update().reason  # not downloaded again
    world.publish("3")
    assert device.update().installed_version == "3"
    world.assert_runs("device-1", "3")
