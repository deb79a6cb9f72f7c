"""The signed OTA path end to end: publish into a TUF repository, serve it over real
HTTP on loopback, and let the device updater verify, smoke-test and install.

Attacks are played for real against the served files: a changed byte in a model,
metadata re-signed with a key the root does not trust, a file that verifies but
does not run. Each must leave the installed model in place and running.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer

from edgeship.device import updater_cli
from edgeship.device.state import installed_model
from edgeship.device.updater import DeviceUpdater, UpdaterConfig, rollback_local
from edgeship.errors import SignatureError
from edgeship.ota.keys import Keystore
from edgeship.ota.publish import ReleaseError, publish_release, read_channel, rollback_release
from edgeship.ota.repository import KeystoreMismatch, OtaRepository
from edgeship.ota.storage import StorageError, open_storage, public_read_policy
from edgeship.records import CompiledArtifact
from ota_world import make_artifact, predict

MODEL = "tiny"
TARGET = "onnx-int8"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def served(tmp_path):
    """A repository directory served over HTTP on 127.0.0.1; yields (directory, base URL)."""
    directory = tmp_path / "ota-repo"
    directory.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield directory, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


class Fleet:
    """A publisher and devices around one served repository."""

    def __init__(self, tmp_path: Path, directory: Path, url: str):
        self.tmp_path, self.directory, self.url = tmp_path, directory, url
        self.keystore = Keystore(tmp_path / "keys")
        self.repository = OtaRepository(open_storage(str(directory)), self.keystore)
        self.root = tmp_path / "provisioned-root.json"
        self.root.write_bytes(self.repository.trusted_root())
        self.artifacts: dict[str, CompiledArtifact] = {}

    def publish(self, version: str, content: bytes | None = None, **kwargs):
        artifact = make_artifact(self.tmp_path, version, content)
        self.artifacts[version] = artifact
        return publish_release(self.repository, MODEL, version, [artifact], **kwargs)

    def device(self, name: str = "device-1") -> DeviceUpdater:
        return DeviceUpdater(UpdaterConfig(repository_url=self.url, trusted_root=self.root,
                                           state_dir=self.tmp_path / name, channel="stable", target=TARGET,
                                           device_id=name))

    def served_model(self, version: str) -> Path:
        artifact = self.artifacts[version]
        return self.directory / "targets/models" / MODEL / version / TARGET / f"{artifact.sha256}.model.onnx"


@pytest.fixture
def fleet(tmp_path, served) -> Fleet:
    return Fleet(tmp_path, *served)


def assert_runs(device: DeviceUpdater, fleet: Fleet, version: str) -> None:
    """The device's current model is `version`, intact and running."""
    path = installed_model(device.state_dir)
    assert path is not None and path.parent.name == version
    np.testing.assert_array_equal(predict(path), predict(fleet.artifacts[version].path))


def test_first_update_installs_the_published_model_then_is_up_to_date(fleet):
    fleet.publish("1")
    device = fleet.device()

    report = device.update()
    assert (report.status, report.installed_version, report.previous_version) == ("updated", "1", None)
    assert report.model_path == installed_model(device.state_dir)
    assert_runs(device, fleet, "1")

    assert device.update().status == "up_to_date"


def test_a_new_version_replaces_current_and_keeps_the_old_one_as_previous(fleet):
    fleet.publish("1")
    device = fleet.device()
    device.update()
    descriptor = fleet.publish("2")
    assert descriptor.targets[TARGET].previous.version == "1" and descriptor.targets[TARGET].base.version == "2"

    report = device.update()
    assert (report.status, report.installed_version, report.previous_version) == ("updated", "2", "1")
    assert_runs(device, fleet, "2")
    assert (device.state_dir / "current").resolve() == device.state_dir / "versions/2/model.onnx"
    state = json.loads((device.state_dir / "state.json").read_text())
    assert (state["active"]["version"], state["last_known_good"]["version"]) == ("2", "1")
    assert state["probation"] is None  # the updater's own check confirmed it
    assert device.update().status == "up_to_date"


def test_a_changed_byte_in_the_served_model_is_refused(fleet):
    fleet.publish("1")
    device = fleet.device()
    device.update()
    fleet.publish("2")
    served = fleet.served_model("2")
    data = bytearray(served.read_bytes())
    data[len(data) // 2] ^= 0x01
    served.write_bytes(bytes(data))

    report = device.update()
    assert report.status == "refused" and "LengthOrHashMismatchError" in report.reason
    assert report.installed_version == "1"
    assert_runs(device, fleet, "1")


def test_metadata_signed_with_a_key_the_root_does_not_trust_is_refused(fleet):
    fleet.publish("1")
    device = fleet.device()
    device.update()
    fleet.publish("2")
    # An attacker with write access to the storage but not the keys re-signs the new release.
    intruder = CryptoSigner.generate_ed25519()
    timestamp = Metadata.from_file(str(fleet.directory / "metadata/timestamp.json"))
    targets_file = fleet.directory / f"metadata/{timestamp.signed.version}.targets.json"
    for path in (targets_file, fleet.directory / "metadata/timestamp.json"):
        md = Metadata.from_file(str(path))
        md.sign(intruder, append=False)
        path.write_bytes(md.to_bytes(JSONSerializer()))

    report = device.update()
    assert report.status == "refused" and "UnsignedMetadataError" in report.reason
    assert report.installed_version == "1"
    assert_runs(device, fleet, "1")


def test_a_file_that_verifies_but_does_not_run_is_refused_by_the_smoke_test(fleet):
    fleet.publish("1")
    device = fleet.device()
    device.update()
    fleet.publish("2", content=b"signed, hashed, and not a model")

    report = device.update()
    assert report.status == "refused" and "SmokeTestFailed" in report.reason
    assert report.installed_version == "1"
    assert_runs(device, fleet, "1")
    assert not list((device.state_dir / "downloads").glob("*.model.onnx"))


def test_rollback_release_takes_devices_back_to_the_previous_version(fleet):
    fleet.publish("1")
    device = fleet.device()
    device.update()
    fleet.publish("2")
    device.update()

    descriptor = rollback_release(fleet.repository, "stable")
    assert descriptor.targets[TARGET].base.version == "1" and descriptor.targets[TARGET].previous is None
    report = device.update()
    assert (report.status, report.installed_version, report.previous_version) == ("updated", "1", "2")
    assert_runs(device, fleet, "1")
    with pytest.raises(ReleaseError, match="no previous version"):
        rollback_release(fleet.repository, "stable")


def test_a_device_outside_the_rollout_cohort_stays_on_the_previous_version(fleet):
    fleet.publish("1")
    device = fleet.device()
    device.update()
    fleet.publish("2", rollout_fraction=0.0)

    report = device.update()
    assert (report.status, report.installed_version, report.offered_version) == ("not_in_cohort", "1", "1")
    assert_runs(device, fleet, "1")
    newcomer = fleet.device("device-2")  # nothing installed yet: it takes the previous release
    assert newcomer.update().installed_version == "1"

    fleet.publish("2", rollout_fraction=1.0)  # widen the same version to everyone
    assert read_channel(fleet.repository, "stable").targets[TARGET].previous.version == "1"
    assert read_channel(fleet.repository, "stable").targets[TARGET].base.version == "2"
    assert device.update().installed_version == "2"


def test_rollback_local_swaps_back_and_skips_the_bad_version(fleet):
    fleet.publish("1")
    device = fleet.device()
    device.update()
    fleet.publish("2")
    device.update()

    report = rollback_local(device.state_dir)
    assert report.installed_version == "1"
    assert_runs(device, fleet, "1")
    again = device.update()
    assert again.status == "refused" and "marked bad on this device" in again.reason
    assert_runs(device, fleet, "1")


def test_reopened_repository_extends_versions_and_survives_root_re_signing(fleet):
    fleet.publish("1")
    device = fleet.device()
    device.update()
    before = Metadata.from_file(str(fleet.directory / "metadata/timestamp.json")).signed.version

    reopened = OtaRepository(open_storage(str(fleet.directory)), Keystore(fleet.keystore.directory))
    with reopened.edit_root():
        pass  # root v2, same keys: the device holds v1 and must walk the chain
    fleet.repository = reopened
    fleet.publish("2")

    assert Metadata.from_file(str(fleet.directory / "metadata/timestamp.json")).signed.version > before
    assert (fleet.directory / "metadata/2.root.json").is_file()
    assert device.update().installed_version == "2"


def test_keys_are_private_and_a_foreign_keystore_is_refused(fleet, tmp_path):
    assert stat.S_IMODE(fleet.keystore.directory.stat().st_mode) == 0o700
    for role in ("root", "targets", "snapshot", "timestamp"):
        assert stat.S_IMODE(fleet.keystore.path(role).stat().st_mode) == 0o700
        (key,) = fleet.keystore.path(role).glob("*.pem")
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(KeystoreMismatch, match="point ota.keystore"):
        OtaRepository(open_storage(str(fleet.directory)), Keystore(tmp_path / "other-keys"))


def test_publish_refuses_an_artifact_that_changed_after_compile(fleet):
    artifact = make_artifact(fleet.tmp_path, "1")
    artifact.path.write_bytes(artifact.path.read_bytes() + b"\0")
    with pytest.raises(SignatureError, match="changed after it was compiled"):
        publish_release(fleet.repository, MODEL, "1", [artifact])
    assert read_channel(fleet.repository, "stable") is None


def test_cli_update_checks_once_and_prints_the_report(fleet, capsys):
    fleet.publish("1")
    parser = argparse.ArgumentParser()
    updater_cli.wire("update", parser)
    args = parser.parse_args(["--repo-url", fleet.url, "--root", str(fleet.root), "--state-dir",
                              str(fleet.tmp_path / "cli-device"), "--target", TARGET, "--device-id", "cli"])
    assert args.run(args) == 0
    assert json.loads(capsys.readouterr().out)["installed_version"] == "1"

    args.target = "tflite-int8"  # the channel ships no such target: bad input, exit 2 (docs/cli.md)
    assert args.run(args) == 2
    assert "ships no model for target" in json.loads(capsys.readouterr().out)["reason"]

    args.target = TARGET
    fleet.publish("2")
    served = fleet.served_model("2")
    served.write_bytes(served.read_bytes() + b"\0")  # the file no longer matches its signed length and hash
    assert args.run(args) == 3  # refused by policy
    assert json.loads(capsys.readouterr().out)["status"] == "refused"


def test_publish_into_s3_and_update_straight_from_the_endpoint(tmp_path, monkeypatch):
    import boto3
    from moto.server import ThreadedMotoServer

    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        with pytest.raises(StorageError, match="does not exist"):
            OtaRepository(open_storage("s3://ota/fleet", endpoint), Keystore(tmp_path / "keys"))
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="ota")
        s3.put_bucket_policy(Bucket="ota", Policy=json.dumps(public_read_policy("ota", "fleet")))

        storage = open_storage("s3://ota/fleet", endpoint)
        assert storage.create("locks/probe.json", b"1") and not storage.create("locks/probe.json", b"2")  # If-None-Match
        storage.delete("locks/probe.json")
        repository = OtaRepository(storage, Keystore(tmp_path / "keys"))
        artifact = make_artifact(tmp_path, "1")
        publish_release(repository, MODEL, "1", [artifact])
        root = tmp_path / "root.json"
        root.write_bytes(repository.trusted_root())

        device = DeviceUpdater(UpdaterConfig(repository_url=f"{endpoint}/ota/fleet", trusted_root=root,
                                             state_dir=tmp_path / "device", target=TARGET, device_id="s3-device"))
        report = device.update()
        assert (report.status, report.installed_version) == ("updated", "1"), report.reason
        np.testing.assert_array_equal(predict(installed_model(device.state_dir)), predict(artifact.path))
    finally:
        server.stop()
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint"):
        OtaRepository(open_storage("s3://ota/fleet", endpoint), Keystore(tmp_path / "keys"))


def test_the_updater_imports_nothing_heavy():
    heavy = ["torch", "tensorflow", "mlflow", "prefect", "edgeship.ota.repository", "edgeship.ota.storage",
             "edgeship.ota.keys"]
    code = ("import sys, edgeship.device.updater, edgeship.device.runtime, edgeship.device.updater_cli; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parent.parent)
    assert result.stdout.strip() == "[]"
