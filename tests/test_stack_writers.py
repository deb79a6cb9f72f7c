"""Two publishers against the real-services stack itself (`infra/local-stack.sh`: its S3 endpoint, `rclone serve s3`,
and its PostgreSQL), forced to contend: a barrier releases both once they are ready, and the one that takes the
writer lock holds it until the other has found it held. The other then waits its turn (both releases land, one
signed version each), or, given little patience, fails with an error naming the holder. Either way an
independent TUF client (python-tuf's ngclient, over the stack's read-only HTTP server in front of the bucket)
refreshes and downloads every model.

The stack's S3 ignores conditional requests, so a lock in the bucket itself is refused with the fix, and the
stack's env (EDGESHIP_OTA_LOCK) puts the lease in PostgreSQL.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from contending_publishers import CONTENDERS, MODEL, contend, open_repository
from edgeship.files import sha256_of
from edgeship.ota.publish import publish_release, read_channel
from edgeship.ota.repository import OtaRepository
from edgeship.ota.storage import StorageError, open_storage
from ota_world import make_artifact

pytestmark = pytest.mark.e2e


def _where(env: dict, prefix: str) -> dict:
    return {"location": f"s3://edgeship-ota/{prefix}", "endpoint": env["EDGESHIP_S3_ENDPOINT_URL"],
            "lock": env["EDGESHIP_OTA_LOCK"]}


def _aws(env: dict) -> dict:
    return {name: env[name] for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}


def _timestamp_version(repository: OtaRepository) -> int:
    from tuf.api.metadata import Metadata

    return Metadata.from_bytes(repository.storage.get("metadata/timestamp.json")).signed.version


def _tuf_client(ota_url: str, prefix: str, root_json: bytes, tmp_path: Path, paths: list[str]) -> dict[str, str]:
    """python-tuf's own client, nothing of edgeship: refresh the metadata and download each target; their sha256."""
    from tuf.ngclient import Updater

    metadata = tmp_path / "client" / "metadata"
    metadata.mkdir(parents=True)
    updater = Updater(metadata_dir=str(metadata), metadata_base_url=f"{ota_url}/{prefix}/metadata/",
                      target_dir=str(tmp_path / "client"), target_base_url=f"{ota_url}/{prefix}/targets/",
                      bootstrap=root_json)
    updater.refresh()
    found = {}
    for path in paths:
        info = updater.get_targetinfo(path)
        assert info is not None, f"{path} is not in the signed targets"
        found[path] = sha256_of(updater.download_target(info, str(tmp_path / "client" / path.replace("/", "_"))))
    return found


@pytest.fixture
def repository_on_stack(stack, tmp_path, monkeypatch):
    """A repository in the stack's OTA bucket (a prefix of its own) holding v1 of both targets."""
    env, _ = stack
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "EDGESHIP_OTA_LOCK"):
        monkeypatch.setenv(name, env[name])
    prefix = f"writers-{uuid.uuid4().hex[:8]}"
    repository = open_repository(_where(env, prefix), tmp_path / "keys")
    publish_release(repository, MODEL, "1", [make_artifact(tmp_path / "builds", "1", target=t) for _, t in CONTENDERS])
    return env, prefix, repository


def test_the_stacks_s3_cannot_hold_the_lock_itself_and_says_where_to_put_it(stack, monkeypatch):
    from edgeship.ota.lock import writer_lock

    env, _ = stack
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.delenv("EDGESHIP_OTA_LOCK", raising=False)
    storage = open_storage(f"s3://edgeship-ota/probe-{uuid.uuid4().hex[:8]}", env["EDGESHIP_S3_ENDPOINT_URL"])
    with pytest.raises(StorageError, match=r"If-None-Match.*ota.lock: postgresql://"):
        with writer_lock(storage, "publish"):
            pass
    assert env["EDGESHIP_OTA_LOCK"].startswith("postgresql://")  # what stack.env sets instead


def test_two_publishers_forced_to_contend_on_the_stack_one_waits_its_turn(repository_on_stack, tmp_path):
    env, prefix, repository = repository_on_stack
    before = _timestamp_version(repository)
    results = contend(_where(env, prefix), tmp_path / "keys", tmp_path / "builds", wait_s=300, env=_aws(env))
    assert results == {"2": ("published", ""), "3": ("published", "")}, results

    reopened = open_repository(_where(env, prefix), tmp_path / "keys")
    assert _timestamp_version(reopened) == before + 2  # one signed version each, neither lost
    channel = read_channel(reopened, "stable")
    assert (channel.targets["onnx-int8"].base.version, channel.targets["tflite-int8"].base.version) == ("2", "3")
    paths = {f"models/{MODEL}/{v}/{t}/model.onnx": make_artifact(tmp_path / "builds", v, target=t).sha256
             for v, t in (("1", "onnx-int8"), ("2", "onnx-int8"), ("3", "tflite-int8"))}
    assert _tuf_client(env["EDGESHIP_OTA_URL"], prefix, reopened.trusted_root(), tmp_path, list(paths)) == paths


def test_two_publishers_forced_to_contend_on_the_stack_one_fails_naming_the_holder(repository_on_stack, tmp_path):
    env, prefix, repository = repository_on_stack
    before = _timestamp_version(repository)
    results = contend(_where(env, prefix), tmp_path / "keys", tmp_path / "builds", wait_s=1.0, env=_aws(env))
    statuses = sorted(status for status, _ in results.values())
    assert statuses == ["busy", "published"], results
    loser = next(v for v, (status, _) in results.items() if status == "busy")
    winner = "3" if loser == "2" else "2"
    assert f"publish v{winner}" in results[loser][1] and "another writer holds" in results[loser][1], results

    reopened = open_repository(_where(env, prefix), tmp_path / "keys")
    assert _timestamp_version(reopened) == before + 1
    path = f"models/{MODEL}/{winner}/{dict(CONTENDERS)[winner]}/model.onnx"
    expected = make_artifact(tmp_path / "builds", winner, target=dict(CONTENDERS)[winner]).sha256
    assert _tuf_client(env["EDGESHIP_OTA_URL"], prefix, reopened.trusted_root(), tmp_path, [path]) == {path: expected}
