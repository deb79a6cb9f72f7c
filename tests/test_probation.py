"""On the device: identity, golden vectors, probation with automatic rollback, the fallback model, the runtime.

Every test runs the real updater against a real signed repository served on loopback
(tests/ota_world.py) and real ONNX Runtime sessions.
"""

from __future__ import annotations

import argparse
import json
import socket
import time

import numpy as np
import pytest

from edgeship.device import updater_cli
from edgeship.device.probation import ProbationPolicy
from edgeship.device.runtime import DeviceRuntime
from edgeship.device.state import DeviceState, active_model, device_identity, fallback_model, read_events
from edgeship.device.runtimes import open_session
from ota_world import QUICK_PROBATION, TARGET, OtaWorld, golden_inputs
from onnx_models import single_image_classifier, tiny_classifier
from timing import scaled


@pytest.fixture
def world(tmp_path):
    world = OtaWorld(tmp_path)
    yield world
    world.close()


def kinds(world: OtaWorld, name: str) -> list[tuple[str, str | None]]:
    return [(e.kind, e.version) for e in read_events(world.tmp_path / name)]


def test_a_device_id_is_generated_once_and_kept_never_the_hostname(tmp_path, world):
    first = device_identity(tmp_path / "a")
    assert first.device_id != socket.gethostname() and not first.provisioned
    assert device_identity(tmp_path / "a").device_id == first.device_id
    assert device_identity(tmp_path / "b").device_id != first.device_id  # two cloned images differ

    world.publish("1")
    parser = argparse.ArgumentParser()
    updater_cli.wire("provision", parser)
    args = parser.parse_args(["--state-dir", str(tmp_path / "p"), "--repo-url", world.url, "--root", str(world.root),
                              "--target", TARGET, "--device-id", "pi4-0017"])
    assert args.run(args) == 0
    update = argparse.ArgumentParser()
    updater_cli.wire("update", update)
    args = update.parse_args(["--state-dir", str(tmp_path / "p")])  # everything else from device.json
    assert args.run(args) == 0
    state = DeviceState.load(tmp_path / "p")
    assert state.active.version == "1" and (tmp_path / "p" / "root.json").is_file()


def test_update_and_serve_tell_one_identity_story(tmp_path, world, capsys):
    """Both refuse a state directory nobody provisioned, naming the command that does; both take provision's flags,
    which provision the directory (keeping an id generated earlier), so the other command follows them."""
    from edgeship.device.cli import main
    from edgeship.device.serve import add_arguments

    empty = tmp_path / "empty"
    for command in ("update", "serve"):
        assert main([command, "--state-dir", str(empty)]) == 2                   # bad input (docs/cli.md)
        said = capsys.readouterr().err
        assert f"{empty} is not provisioned" in said and f"edgeship-device provision --state-dir {empty}" in said
        assert f"give `edgeship-device {command}` the same --repo-url, --root and --target" in said

    world.publish("1")
    state_dir = tmp_path / "d"
    generated = device_identity(state_dir).device_id                              # e.g. the Python API ran first
    assert main(["update", "--state-dir", str(state_dir), "--repo-url", world.url, "--root", str(world.root),
                 "--target", TARGET]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "updated"
    identity = json.loads((state_dir / "device.json").read_text())
    assert identity | {"root": None} == {"device_id": generated, "channel": "stable", "target": TARGET,
                                         "repository_url": world.url, "root": None, "provisioned": True}
    assert (state_dir / "root.json").read_bytes() == world.root.read_bytes()      # kept beside it, as provision does
    serve = argparse.ArgumentParser()
    add_arguments(serve)
    args = serve.parse_args(["--state-dir", str(state_dir), "--channel", "canary"])
    assert updater_cli.settled_identity(args, "serve").channel == "canary"       # serve's flags provision too
    assert json.loads((state_dir / "device.json").read_text())["channel"] == "canary"
    assert json.loads((state_dir / "device.json").read_text())["device_id"] == generated


def test_golden_vectors_refuse_a_model_that_runs_but_computes_the_wrong_thing(world):
    world.publish("1", golden=True)
    device = world.device(probation=QUICK_PROBATION)
    assert device.update().status == "updated"
    # v2's file is a valid model, signed and hashed, but its golden vectors are v1's outputs
    world.publish("2", golden=True, golden_from="1", content=tiny_classifier(seed=99).SerializeToString())

    report = device.update()
    assert report.status == "refused" and "golden vectors" in report.reason and "top-1" in report.reason
    world.assert_runs("device-1", "1")
    again = device.update()  # marked bad: not downloaded again
    assert again.status == "refused" and "marked bad" in again.reason
    assert ("refused", "2") in kinds(world, "device-1")


def test_a_model_over_its_latency_budget_fails_probation_and_rolls_back_by_itself(world):
    world.publish("1", golden=True)
    device = world.device(probation=QUICK_PROBATION)
    device.update()
    world.publish("2", golden=True, budget_ms=1e-6)  # no real model answers in a nanosecond

    report = device.update()
    assert report.status == "rolled_back" and "probation: latency" in report.reason
    assert (report.installed_version, report.on_probation) == ("1", False)
    world.assert_runs("device-1", "1")
    state = DeviceState.load(world.tmp_path / "device-1")
    assert [(b.version, b.reason) for b in state.bad] == [("2", "probation: latency")]
    assert device.update().status == "refused"  # not retried...
    world.publish("3", golden=True)  # ...until a newer version appears
    assert device.update().installed_version == "3"
    assert kinds(world, "device-1")[-4:] == [("installed", "2"), ("rolled_back", "2"), ("installed", "3"),
                                             ("confirmed", "3")]


def test_the_runtime_confirms_a_model_the_application_runs_well(world):
    world.publish("1")
    world.device(probation=QUICK_PROBATION).update()
    world.publish("2", budget_ms=1000)
    device = world.device(probation=ProbationPolicy(required=5, max_failures=1, deadline_s=60), self_check=False)
    report = device.update()
    assert (report.status, report.installed_version, report.on_probation) == ("updated", "2", True)

    seen = []
    runtime = DeviceRuntime(world.tmp_path / "device-1", observers=[seen.append])
    for image in golden_inputs(5):
        prediction = runtime.predict(image[None])
        assert (prediction.slot, prediction.version) == ("active", "2")
    assert active_model(world.tmp_path / "device-1").on_probation is False
    assert ("confirmed", "2") in kinds(world, "device-1")
    assert len(seen) == 5 and all(r.ok and r.slot == "active" for r in seen)


def test_an_unconfirmed_model_is_rolled_back_at_its_deadline_and_confirm_works_from_the_cli(world, capsys):
    world.publish("1")
    world.device(probation=QUICK_PROBATION).update()
    world.publish("2")
    # the deadline must pass between two checks, and must not before a confirm that follows an install at once
    short = world.device(probation=ProbationPolicy(required=5, max_failures=1, deadline_s=scaled(0.2)),
                         self_check=False)
    assert short.update().on_probation
    time.sleep(scaled(0.3))
    report = short.update()  # the next check finds the deadline passed
    assert report.status == "refused" and "probation: deadline" in report.reason
    world.assert_runs("device-1", "1")

    world.publish("3")
    assert short.update().on_probation
    parser = argparse.ArgumentParser()
    updater_cli.wire("confirm", parser)
    args = parser.parse_args(["--state-dir", str(world.tmp_path / "device-1")])
    assert args.run(args) == 0 and json.loads(capsys.readouterr().out)["kind"] == "confirmed"
    time.sleep(scaled(0.3))
    assert short.update().status == "up_to_date"
    world.assert_runs("device-1", "3")


def test_the_runtime_switches_to_the_fallback_when_the_primary_is_slow_and_back_when_it_recovers(world):
    world.publish("1", fallback="1", budget_ms=1000)
    device = world.device(probation=QUICK_PROBATION)
    assert device.update().fallback_version == "1"
    assert fallback_model(world.tmp_path / "device-1").path.is_file()

    runtime = DeviceRuntime(world.tmp_path / "device-1", window=4, miss_ratio=0.5, retry_every=2, recover_after=2)
    batch = golden_inputs(1)
    assert runtime.predict(batch).slot == "active"
    runtime.primary.installed = runtime.primary.installed.__class__(
        runtime.primary.installed.path, runtime.primary.installed.model.model_copy(update={"latency_budget_ms": 1e-6}),
        "active")
    answers = [runtime.predict(batch) for _ in range(6)]
    assert "over its" in runtime.reason
    from_fallback = [a for a in answers if a.slot == "fallback"]
    assert from_fallback, [a.slot for a in answers]
    np.testing.assert_allclose(from_fallback[0].outputs, runtime.fallback.session.run(batch))  # its own answer
    runtime.primary.installed = runtime.primary.installed.__class__(
        runtime.primary.installed.path, runtime.primary.installed.model.model_copy(update={"latency_budget_ms": 1e6}),
        "active")
    slots = [runtime.predict(batch).slot for _ in range(8)]
    assert slots[-1] == "active", slots


def test_the_runtime_answers_from_the_fallback_when_the_primary_raises_and_returns_when_it_answers_again(world):
    """A model whose file says it takes any batch but whose graph reshapes to one image passes its checks, then
    raises on the batch of two an application sends: the fallback answers that request, the primary is tried again
    every `retry_every` requests, and `recover_after` good tries in a row hand the answers back to it."""
    world.publish("1", content=single_image_classifier().SerializeToString(), fallback="9")
    assert world.device(probation=QUICK_PROBATION).update().status == "updated"     # its own checks: one image each
    seen = []
    runtime = DeviceRuntime(world.tmp_path / "device-1", observers=[seen.append], retry_every=3, recover_after=2)
    pair, single = golden_inputs(2), golden_inputs(1)
    answer = runtime.predict(pair)
    assert (answer.slot, answer.version, answer.outputs.shape) == ("fallback", "9", (2, 10))
    fallback = fallback_model(world.tmp_path / "device-1").path
    np.testing.assert_allclose(answer.outputs, open_session("onnxruntime", fallback, threads=1).run(pair), rtol=1e-6)
    assert runtime.slot == "fallback" and runtime.reason.startswith("primary raised: ")
    assert [(r.slot, r.version, r.ok) for r in seen] == [("active", "1", False), ("fallback", "9", True)]
    assert "reshape" in seen[0].error.lower()                                       # ONNX Runtime's own words
    # every third request tries the primary (its answer is the primary's); the second good try in a row switches back
    assert [runtime.predict(single).slot for _ in range(7)] == ["fallback", "fallback", "active", "fallback",
                                                                 "fallback", "active", "active"]
    assert (runtime.slot, runtime.reason) == ("active", "")
    assert runtime.predict(pair).slot == "fallback"                                  # and falls back again at once


def test_a_batch_the_primary_does_not_declare_goes_to_the_fallback_without_counting_against_the_primary(world):
    """A model exported for single images (its file declares batch 1): a pair is the client's mismatch, not the
    model's failure. The fallback, which takes any batch, answers it; the primary stays in charge."""
    world.publish("1", content=tiny_classifier(batch=1).SerializeToString(), fallback="9")
    assert world.device(probation=QUICK_PROBATION).update().status == "updated"
    seen = []
    runtime = DeviceRuntime(world.tmp_path / "device-1", observers=[seen.append])
    assert runtime.predict(golden_inputs(2)).slot == "fallback"
    assert (runtime.slot, [(r.slot, r.ok) for r in seen]) == ("active", [("fallback", True)])
    assert runtime.predict(golden_inputs(1)).slot == "active"


def test_the_runtime_answers_from_the_fallback_when_the_primary_does_not_load(world):
    world.publish("1", fallback="1")
    world.device(probation=QUICK_PROBATION).update()
    active = active_model(world.tmp_path / "device-1")
    active.path.write_bytes(b"not a model any more")  # the disk went bad under the runtime
    runtime = DeviceRuntime(world.tmp_path / "device-1")
    prediction = runtime.predict(golden_inputs(1))
    assert prediction.slot == "fallback" and "does not load" in runtime.reason


def test_device_cli_status_and_rollback_as_real_processes(world):
    import subprocess
    import sys

    from ota_world import ROOT_DIR

    world.publish("1")
    device = world.device(probation=QUICK_PROBATION)
    device.update()
    world.publish("2")
    device.update()
    state_dir = str(world.tmp_path / "device-1")

    def device_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edgeship.device.cli", *args, "--state-dir", state_dir],
                              capture_output=True, text=True, cwd=ROOT_DIR, timeout=60)

    status = json.loads(device_cli("status").stdout)
    assert status["state"]["active"]["version"] == "2" and status["state"]["last_known_good"]["version"] == "1"
    assert [e["kind"] for e in status["last_events"]][-2:] == ["installed", "confirmed"]
    rolled = device_cli("rollback", "--reason", "operator: wrong labels in the field")
    assert rolled.returncode == 0 and json.loads(rolled.stdout)["installed_version"] == "1", rolled.stderr
    world.assert_runs("device-1", "1")
    assert device.update().status == "refused"  # v2 is marked bad here now
    assert device_cli("rollback").returncode == 2  # nothing left to roll back to: bad input (docs/cli.md)


def test_devices_in_the_shadow_cohort_install_the_shadow_beside_the_active_model(world):
    from edgeship.device.state import shadow_model
    from edgeship.ota.publish import publish_shadow, read_channel, remove_shadow
    from ota_world import MODEL, make_artifact

    world.publish("1")
    shadow = make_artifact(world.tmp_path / "shadow", "7", seed=7)
    publish_shadow(world.repository, "tiny-next", "7", shadow, shadow_fraction=0.5, sample_rate=0.2)
    entry = read_channel(world.repository, "stable").targets[TARGET]
    assert (entry.shadow.model_name, entry.shadow_sample_rate, entry.base.version) == ("tiny-next", 0.2, "1")
    names = [f"dev-{i}" for i in range(12)]
    inside = [n for n in names if entry.runs_shadow(n, MODEL)]
    assert 0 < len(inside) < len(names)
    for name in names:
        world.device(name, probation=QUICK_PROBATION).update()
        installed = shadow_model(world.tmp_path / name)
        assert (installed is not None) == (name in inside), name
        world.assert_runs(name, "1")  # the active model is untouched by the shadow
    assert ("shadow_installed", "7") in kinds(world, inside[0])

    remove_shadow(world.repository, "stable", TARGET)
    world.device(inside[0], probation=QUICK_PROBATION).update()
    assert shadow_model(world.tmp_path / inside[0]) is None
