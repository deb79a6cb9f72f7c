"""Fault injection: each trial ends with a device that runs a verified model, and nothing lost.

"Verified" is checked the same way every time (`settled`): state.json parses, the active
model's file is in place with the sha256 the signed channel named, it computes what
that release computes, no half-downloaded file is left behind, and events.jsonl has
strictly increasing sequence numbers.
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from tuf.api.metadata import Metadata

from edgeship.device.install import PAUSE_ENV, STEPS
from edgeship.device.state import DeviceState, is_intact, read_events
from edgeship.ota.lock import RepositoryBusy, writer_lock
from edgeship.ota.publish import read_channel
from edgeship.ota.repository import OtaRepository
from edgeship.ota.storage import StorageError, open_storage
from contending_publishers import contend
from ota_world import QUICK_PROBATION, ROOT_DIR, TARGET, OtaWorld, golden_inputs, wait_for
from onnx_models import tiny_classifier
from timing import scaled


@pytest.fixture
def world(tmp_path):
    world = OtaWorld(tmp_path)
    yield world
    world.close()


def settled(world: OtaWorld, name: str, version: str) -> DeviceState:
    state_dir = world.tmp_path / name
    state = DeviceState.load(state_dir)
    assert state.active is not None and state.active.version == version
    assert is_intact(state_dir, state.active)
    world.assert_runs(name, version)
    assert not list((state_dir / "downloads").glob("*")) if (state_dir / "downloads").exists() else True
    sequences = [e.sequence for e in read_events(state_dir)]
    assert sequences == sorted(set(sequences))
    return state


@pytest.mark.parametrize("step", STEPS)
def test_kill_9_of_the_updater_at_each_step(world, step):
    world.publish("1", golden=True)
    device = world.device(probation=QUICK_PROBATION)
    assert device.update().status == "updated"
    world.publish("2", golden=True)

    process = world.device_process("device-1", TARGET, {PAUSE_ENV: step})
    wait_for(world.tmp_path / "device-1" / f".paused-{step}", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    (world.tmp_path / "device-1" / f".paused-{step}").unlink()

    report = world.device(probation=QUICK_PROBATION).update()
    if step == "probation":  # a power cut during its self-check: the next check runs it again; v2 never failed
        assert report.status == "updated" and report.reason.endswith("; confirmed"), report
        state = settled(world, "device-1", "2")
        assert state.probation is None and state.bad == []
    else:  # killed before the swap took effect: v1 ran throughout, the next check installs v2
        assert report.status == "updated", report
        state = settled(world, "device-1", "2")
        assert state.probation is None and state.bad == []


def test_the_server_dropping_the_connection_mid_download(world):
    world.publish("1")
    device = world.device(probation=QUICK_PROBATION)
    device.update()
    world.publish("2")
    world.faults["/targets/models/"] = "drop"
    report = device.update()
    assert report.status in ("refused", "error") and report.installed_version == "1", report
    settled(world, "device-1", "1")
    world.faults.clear()
    assert device.update().installed_version == "2"
    settled(world, "device-1", "2")


def test_replayed_older_metadata_is_refused(world):
    world.publish("1")
    device = world.device(probation=QUICK_PROBATION)
    device.update()
    old_timestamp = (world.directory / "metadata/timestamp.json").read_bytes()
    world.publish("2")
    assert device.update().installed_version == "2"
    (world.directory / "metadata/timestamp.json").write_bytes(old_timestamp)  # an attacker replays v1's release

    report = device.update()
    assert report.status == "refused" and "BadVersionNumberError" in report.reason, report
    settled(world, "device-1", "2")


def test_an_expired_timestamp_keeps_the_model_and_reports_the_repository_stale(tmp_path):
    world = OtaWorld(tmp_path, timestamp_expiry_hours=2 / 3600)  # a two-second freeze window
    try:
        world.publish("1")
        device = world.device(probation=QUICK_PROBATION)
        assert device.update().status == "updated"
        time.sleep(2.5)
        report = device.update()
        assert report.status == "stale" and "expired" in report.reason and report.installed_version == "1"
        assert DeviceState.load(tmp_path / "device-1").stale
        assert [e.kind for e in read_events(tmp_path / "device-1")].count("stale_repository") == 1
        settled(world, "device-1", "1")
        with world.repository.writing("resign"):
            assert "timestamp" in world.repository.resign()
        assert device.update().status == "up_to_date"
        assert DeviceState.load(tmp_path / "device-1").stale is None
    finally:
        world.close()


def test_a_full_disk_during_the_download(world):
    world.publish("1")
    device = world.device(probation=QUICK_PROBATION)
    device.update()
    world.publish("2", content=tiny_classifier(classes=200, seed=2).SerializeToString())  # ~50 kB

    def small_disk():  # files this process writes may not grow past 32 kB
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, 32 * 1024))

    process = world.device_process("device-1", TARGET, None, preexec_fn=small_disk)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2 and '"installed_version":"1"' in out, (out, err)  # an error, not a refusal
    settled(world, "device-1", "1")
    assert device.update().installed_version == "2"
    settled(world, "device-1", "2")


def test_two_publishers_forced_to_contend_never_interleave(world):
    """Both ready, released by a barrier; the holder keeps the lock until the other has found it held."""
    world.publish("1", targets=(TARGET, "tflite-int8"))
    before = Metadata.from_file(str(world.directory / "metadata/timestamp.json")).signed.version
    results = contend({"location": str(world.directory)}, world.keystore.directory, world.directory.parent / "builds",
                      wait_s=300)
    assert results == {"2": ("published", ""), "3": ("published", "")}, results
    reopened = OtaRepository(open_storage(str(world.directory)), world.keystore)
    descriptor = read_channel(reopened, "stable")
    # both writes landed (neither publisher overwrote the other's channel), one signed version each
    assert descriptor.targets[TARGET].base.version == "2" and descriptor.targets["tflite-int8"].base.version == "3"
    after = Metadata.from_file(str(world.directory / "metadata/timestamp.json")).signed.version
    assert after == before + 2
    assert world.device(probation=QUICK_PROBATION).update().installed_version == "2"


def test_the_writer_lock_makes_a_second_writer_wait_and_then_give_up(world):
    storage = open_storage(str(world.directory))
    with writer_lock(storage, "publish v9 by alice"):
        with pytest.raises(RepositoryBusy, match="publish v9 by alice"):
            with world.repository.writing("publish v10 by bob", wait_s=0.3):
                pass
    with world.repository.writing("publish v10 by bob", wait_s=0.3):
        pass  # free again


def test_partly_missing_metadata_is_an_error_naming_it_never_a_fresh_repository(world):
    world.publish("1")
    (world.directory / "metadata/timestamp.json").unlink()
    with pytest.raises(StorageError, match="metadata/timestamp.json is missing.*never re-created"):
        OtaRepository(open_storage(str(world.directory)), world.keystore)
    assert not (world.directory / "metadata/timestamp.json").exists()
    assert (world.directory / "metadata/1.root.json").exists()
    shutil.rmtree(world.directory / "metadata")
    (world.directory / "metadata").mkdir()
    (world.directory / "metadata/2.snapshot.json").write_text("{}")
    with pytest.raises(StorageError, match="root.json is missing"):
        OtaRepository(open_storage(str(world.directory)), world.keystore)


RUNTIME = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    from edgeship.device.runtime import DeviceRuntime
    runtime = DeviceRuntime(sys.argv[1])
    runtime.predict(np.zeros((1, 1, 8, 8), dtype=np.float32))   # one answer towards probation, not enough
    Path(sys.argv[1], ".runtime-serving").write_text("1")
    time.sleep(3600)
""")


def test_kill_9_of_the_application_runtime_during_probation(world):
    """A runtime killed while it runs a probation: the next start resumes it (the model never failed); one that
    keeps dying while it runs the new model rolls it back after MAX_RESTARTS deaths."""
    from edgeship.device.probation import MAX_RESTARTS, ProbationPolicy
    from edgeship.device.runtime import DeviceRuntime

    world.publish("1")
    world.device(probation=QUICK_PROBATION).update()
    world.publish("2")
    app_confirms = world.device(probation=ProbationPolicy(required=50, max_failures=2, deadline_s=600),
                                self_check=False)
    assert app_confirms.update().on_probation
    state_dir = world.tmp_path / "device-1"
    for death in range(1, MAX_RESTARTS + 1):
        (state_dir / ".runtime-serving").unlink(missing_ok=True)
        process = subprocess.Popen([sys.executable, "-c", RUNTIME, str(state_dir)], cwd=ROOT_DIR,
                                   stderr=subprocess.PIPE, text=True)
        world.processes.append(process)
        wait_for(state_dir / ".runtime-serving", process)
        probation = DeviceState.load(state_dir).probation
        assert (probation.holder.pid, probation.restarts, probation.successes) == (process.pid, death - 1, death)
        process.send_signal(signal.SIGKILL)
        process.wait()

    runtime = DeviceRuntime(state_dir)  # the third death in a row: the new model goes, the last-known-good runs
    assert runtime.predict(golden_inputs(1)).version == "1"
    state = settled(world, "device-1", "1")
    assert [(b.version, b.reason) for b in state.bad] == [("2", "probation: interrupted")]


def test_a_publisher_killed_holding_the_lock_does_not_block_the_next_one(world):
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    killed.wait()
    lock = {"token": "t", "purpose": "publish v5", "host": socket.gethostname(), "pid": killed.pid,
            "acquired_at": "2026-01-01T00:00:00+00:00", "expires_at": "2999-01-01T00:00:00+00:00"}
    assert open_storage(str(world.directory)).create("locks/writer.json", json.dumps(lock).encode())
    started = time.monotonic()
    world.publish("1")
    assert time.monotonic() - started < scaled(10) and not (world.directory / "locks/writer.json").exists()
