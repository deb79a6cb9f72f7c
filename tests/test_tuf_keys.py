"""TUF as TUF intends: root offline, separate keys per role, thresholds, rotation, encrypted keys, signer URIs."""

from __future__ import annotations

import shutil

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import SSlibKey
from tuf.api.metadata import Metadata
from typer.testing import CliRunner

from edgeship.cli import app
from edgeship.errors import ConfigError
from edgeship.ota.keys import KeyPassphraseError, Keystore
from edgeship.ota.repository import OtaRepository
from edgeship.ota.root import add, init_repository, revoke, rotate, set_threshold
from edgeship.ota.storage import open_storage
from ota_world import QUICK_PROBATION, ROOT_DIR, OtaWorld


@pytest.fixture
def world(tmp_path):
    world = OtaWorld(tmp_path)
    yield world
    world.close()


def root_md(world: OtaWorld) -> Metadata:
    return Metadata.from_bytes((world.directory / "metadata/root.json").read_bytes())


def test_routine_publish_rollback_and_resign_never_need_the_root_key(world, tmp_path):
    world.publish("1")
    offline = tmp_path / "usb-stick"
    shutil.move(str(world.keystore.path("root")), offline)  # root goes offline
    repository = OtaRepository(open_storage(str(world.directory)), Keystore(world.keystore.directory))
    world.repository = repository
    world.publish("2")
    with repository.writing("resign"):
        repository.resign(force=True)
    from edgeship.ota.publish import rollback_release
    rollback_release(repository, "stable")
    assert root_md(world).signed.version == 1  # root never re-signed
    assert world.device(probation=QUICK_PROBATION).update().installed_version == "1"
    with pytest.raises(ConfigError, match="bring the offline root keys"):
        rotate(repository, "timestamp")


def test_root_two_of_three_rotation_and_revocation_keep_devices_updating(tmp_path, world):
    storage = open_storage(str(tmp_path / "repo-2of3"))
    keystore = Keystore(tmp_path / "keys-2of3")
    repository = init_repository(storage, keystore, root_keys=3, root_threshold=2)
    root = Metadata.from_bytes(storage.get("metadata/root.json")).signed
    assert (len(root.roles["root"].keyids), root.roles["root"].threshold) == (3, 2)
    assert len(set().union(*(root.roles[r].keyids for r in ("targets", "snapshot", "timestamp")))) == 3
    with pytest.raises(ConfigError, match="already holds an OTA repository"):
        init_repository(storage, keystore)

    # the device side: an OtaWorld device trusting the world's repository walks rotations of it
    world.publish("1")
    device = world.device(probation=QUICK_PROBATION)
    device.update()
    old_timestamp = root_md(world).signed.roles["timestamp"].keyids[0]
    new_timestamp = rotate(world.repository, "timestamp")
    assert root_md(world).signed.roles["timestamp"].keyids == [new_timestamp] != [old_timestamp]
    world.publish("2")
    assert device.update().installed_version == "2"  # root v2 verified by root v1's key, new timestamp key trusted

    # 2-of-3 root: a lost root key is revoked with the other two; one alone can sign nothing
    keyids = list(root.roles["root"].keyids)
    revoke(repository, "root", keyids[0][:12])
    with pytest.raises(ConfigError, match="would leave root with 1 key"):
        revoke(repository, "root", keyids[1][:12])
    added = add(repository, "root")
    root = Metadata.from_bytes(storage.get("metadata/root.json")).signed
    assert set(root.roles["root"].keyids) == {keyids[1], keyids[2], added} and root.roles["root"].threshold == 2
    with pytest.raises(ConfigError, match="a threshold lies in 1..3"):
        set_threshold(repository, "root", 4)

    def take_offline(keyid: str) -> None:
        for path in keystore.path("root").glob(f"{keyid}.*"):
            path.unlink()

    take_offline(keyids[1])
    rotate(repository, "snapshot")  # two of three root keys present: enough
    take_offline(keyids[2])
    with pytest.raises(ConfigError, match="needs 2 of the current root keys"):
        rotate(repository, "snapshot")


def test_keys_are_encrypted_at_rest_with_the_passphrase_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESHIP_KEY_PASSPHRASE", "correct horse battery staple")
    keystore = Keystore(tmp_path / "keys")
    key = keystore.generate("targets")
    pem = next(keystore.path("targets").glob("*.pem")).read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    monkeypatch.delenv("EDGESHIP_KEY_PASSPHRASE")
    with pytest.raises(KeyPassphraseError, match="is encrypted; set .EDGESHIP_KEY_PASSPHRASE_TARGETS"):
        Keystore(tmp_path / "keys").signer("targets", key.keyid)
    monkeypatch.setenv("EDGESHIP_KEY_PASSPHRASE_TARGETS", "wrong")
    with pytest.raises(KeyPassphraseError, match="passphrase .* is wrong"):
        Keystore(tmp_path / "keys").signer("targets", key.keyid)
    monkeypatch.setenv("EDGESHIP_KEY_PASSPHRASE_TARGETS", "correct horse battery staple")
    assert Keystore(tmp_path / "keys").signer("targets", key.keyid).public_key.keyid == key.keyid
    assert [k.keyid for k in Keystore(tmp_path / "keys").public_keys("targets")] == [key.keyid]  # no passphrase


def test_a_role_key_behind_a_signer_uri_signs_like_a_kms_would(world, tmp_path):
    private = Ed25519PrivateKey.generate()
    outside = tmp_path / "kms" / "snapshot.pem"
    outside.parent.mkdir()
    outside.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    public = SSlibKey.from_crypto(private.public_key(), scheme="ed25519")
    keyid = add(world.repository, "snapshot", f"file2:{outside}", public)
    assert not (world.keystore.path("snapshot") / f"{keyid}.pem").exists()  # no private bytes in the keystore
    old = [k for k in root_md(world).signed.roles["snapshot"].keyids if k != keyid]
    revoke(world.repository, "snapshot", old[0])
    world.publish("1")
    latest_root = Metadata.from_bytes((world.directory / f"metadata/{root_md(world).signed.version}.root.json")
                                   .read_bytes())
    assert keyid in latest_root.signed.roles["snapshot"].keyids
    assert world.device(probation=QUICK_PROBATION).update().installed_version == "1"


def test_keys_cli_lists_who_is_trusted(world, tmp_path):
    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"ota": {"repository": str(world.directory),
                                                                  "keystore": str(world.keystore.directory)}}))
    runner = CliRunner()
    listing = runner.invoke(app, ["keys", "list", "-C", str(tmp_path)],
                            env={"COLUMNS": "200"})
    assert listing.exit_code == 0, listing.output
    assert listing.stdout.count("yes") == 4 and "timestamp" in listing.stdout


def test_a_scheduled_resign_deployment_renews_metadata_before_it_expires(tmp_path):
    import yaml

    from edgeship.flows.deployments import deployments

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"ota": {"resign_every_hours": 4}}))
    resign = next(d for d in deployments(tmp_path, None) if d.name == "resign")
    assert resign.schedules[0].schedule.interval.total_seconds() == 4 * 3600
    declared = yaml.safe_load((ROOT_DIR / "prefect.yaml").read_text())["deployments"]
    entry = next(d for d in declared if d["name"] == "resign")
    assert entry["entrypoint"] == "edgeship.flows.publish.resign" and entry["schedules"][0]["interval"] < 24 * 3600
