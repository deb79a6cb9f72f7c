"""Promotion webhook: a real MLflow server (SQL backend) delivers a signed alias event over loopback HTTP."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from edgeship.errors import SignatureError
from edgeship.flows.webhook import WatchedAlias, create_app, register_webhook, verify_delivery

SECRET = "test-secret-7f3a"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen | None = None, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(url)


def stop_session(process: subprocess.Popen, timeout_s: float = 20) -> None:
    """Stop a process started with start_new_session=True, and whatever it forked: TERM, then KILL."""
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on SQLite with webhooks allowed to call loopback over plain HTTP."""
    from cryptography.fernet import Fernet

    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
           "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode()}
    log = open(root / "server.log", "w")
    process = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                                "--port", str(port), "--workers", "1",
                                "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                                "--default-artifact-root", str(root / "artifacts")],
                               env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_session(process)
        log.close()


@pytest.fixture
def receiver():
    """The webhook receiver on a loopback port; promotions land in a queue."""
    promoted: queue.Queue = queue.Queue()
    app = create_app(WatchedAlias("digits-classifier", "production", SECRET),
                     lambda name, version: promoted.put((name, version)))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_healthy(f"http://127.0.0.1:{port}/health")
    yield f"http://127.0.0.1:{port}/webhooks/mlflow", promoted
    server.should_exit = True
    thread.join(timeout=10)


def signed(body: bytes, secret: str = SECRET, delivery: str = "d-1", timestamp: int | None = None) -> dict:
    timestamp = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(secret.encode(), f"{delivery}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return {"X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": timestamp,
            "X-MLflow-Signature": "v1," + base64.b64encode(digest).decode(), "Content-Type": "application/json"}


def alias_event(alias: str = "production", name: str = "digits-classifier", version: str = "3") -> bytes:
    return json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "now",
                       "data": {"name": name, "alias": alias, "version": version}}).encode()


def test_mlflow_alias_delivery_triggers_publication(mlflow_server, receiver):
    from mlflow import MlflowClient

    url, promoted = receiver
    register_webhook(mlflow_server, url, SECRET)
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    client.create_registered_model("digits-classifier")
    run = client.create_run(client.create_experiment("webhook-test"))
    version = client.create_model_version("digits-classifier", source=f"runs:/{run.info.run_id}/model",
                                          run_id=run.info.run_id)
    client.set_registered_model_alias("digits-classifier", "candidate", version.version)
    client.set_registered_model_alias("digits-classifier", "production", version.version)
    assert promoted.get(timeout=30) == ("digits-classifier", str(version.version))
    time.sleep(1)
    assert promoted.empty(), "the candidate alias must not publish"


def test_unsigned_forged_and_replayed_deliveries_are_refused(receiver):
    url, promoted = receiver
    body = alias_event()
    assert httpx.post(url, content=body, headers={"Content-Type": "application/json"}).status_code == 401
    forged = httpx.post(url, content=body, headers=signed(body, secret="not-the-secret"))
    assert forged.status_code == 401 and "different secrets" in forged.json()["detail"]
    replay = httpx.post(url, content=body, headers=signed(body, timestamp=int(time.time()) - 3600))
    assert replay.status_code == 401 and "replay" in replay.json()["detail"]
    tampered = httpx.post(url, content=alias_event(version="99"), headers=signed(body))
    assert tampered.status_code == 401
    assert promoted.empty()


def test_other_aliases_models_and_duplicate_deliveries_are_ignored(receiver):
    url, promoted = receiver
    for body in (alias_event(alias="staging"), alias_event(name="other-model")):
        answer = httpx.post(url, content=body, headers=signed(body))
        assert answer.status_code == 200 and "ignored" in answer.json()
    body = alias_event(version="5")
    assert httpx.post(url, content=body, headers=signed(body, delivery="same")).json()["publishing"]["version"] == "5"
    assert "ignored" in httpx.post(url, content=body, headers=signed(body, delivery="same")).json()
    assert promoted.get(timeout=5) == ("digits-classifier", "5")
    time.sleep(0.5)
    assert promoted.empty()


def test_verify_delivery_checks_every_part():
    body = alias_event()
    headers = {k.lower(): v for k, v in signed(body, timestamp=1_000_000).items()}
    assert verify_delivery(SECRET, headers, body, now=1_000_010)["data"]["version"] == "3"
    with pytest.raises(SignatureError, match="old"):
        verify_delivery(SECRET, headers, body, now=1_000_000 + 301)
    with pytest.raises(SignatureError, match="not signed"):
        verify_delivery(SECRET, {}, body)


def serve(app) -> tuple[str, uvicorn.Server, threading.Thread]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_healthy(f"http://127.0.0.1:{port}/health")
    return f"http://127.0.0.1:{port}", server, thread


def stop(server: uvicorn.Server, thread: threading.Thread) -> None:
    server.should_exit = True
    thread.join(timeout=10)


def test_a_delivery_is_done_only_after_the_publish_succeeded_and_survives_restarts(tmp_path):
    from edgeship.flows.webhook import DeliveryStore

    calls: list[tuple[str, str]] = []

    def flaky(name: str, version: str) -> None:  # the OTA storage is down for the first two attempts
        calls.append((name, version))
        if len(calls) <= 2:
            raise ConnectionError("S3 endpoint unreachable")

    store_path = tmp_path / "deliveries.sqlite"
    watched = WatchedAlias("digits-classifier", "production", SECRET)
    base, server, thread = serve(create_app(watched, flaky, DeliveryStore(store_path), retry_s=0.1))
    body = alias_event(version="7")
    assert httpx.post(f"{base}/webhooks/mlflow", content=body, headers=signed(body, delivery="d-7")).json() == \
        {"publishing": {"model": "digits-classifier", "version": "7"}}
    deadline = time.monotonic() + 20
    while httpx.get(f"{base}/deliveries/d-7").json()["state"] != "done":
        assert time.monotonic() < deadline, httpx.get(f"{base}/deliveries/d-7").json()
        time.sleep(0.1)
    assert calls == [("digits-classifier", "7")] * 3  # retried until it succeeded, the event's version each time
    stop(server, thread)

    # A restarted receiver remembers the delivery: MLflow's redelivery does not publish twice
    base, server, thread = serve(create_app(watched, flaky, DeliveryStore(store_path), retry_s=0.1))
    again = httpx.post(f"{base}/webhooks/mlflow", content=body, headers=signed(body, delivery="d-7"))
    assert "ignored" in again.json()
    time.sleep(0.5)
    assert len(calls) == 3
    stop(server, thread)


def test_a_delivery_pending_when_the_receiver_stopped_is_published_after_the_restart(tmp_path):
    from edgeship.flows.webhook import DeliveryStore

    store = DeliveryStore(tmp_path / "deliveries.sqlite")
    assert store.accept("d-8", "digits-classifier", "8")  # accepted, then the process died before publishing
    published = queue.Queue()
    watched = WatchedAlias("digits-classifier", "production", SECRET)
    base, server, thread = serve(create_app(watched, lambda n, v: published.put((n, v)),
                                            DeliveryStore(tmp_path / "deliveries.sqlite"), retry_s=0.1))
    assert published.get(timeout=10) == ("digits-classifier", "8")
    stop(server, thread)


def test_an_oversized_body_is_refused_before_it_is_read(receiver):
    url, promoted = receiver
    body = b"x" * (64 * 1024 + 1)
    answer = httpx.post(url, content=body, headers=signed(body))
    assert answer.status_code == 413 and "limit" in answer.json()["detail"]
    assert promoted.empty()


def test_a_version_refused_by_its_gate_is_not_retried(tmp_path):
    from edgeship.errors import GateFailed
    from edgeship.flows.webhook import DeliveryStore

    calls = []

    def refusing(name: str, version: str) -> None:
        calls.append(version)
        raise GateFailed(f"{name} v{version} failed its required gate")

    watched = WatchedAlias("digits-classifier", "production", SECRET)
    base, server, thread = serve(create_app(watched, refusing, DeliveryStore(tmp_path / "d.sqlite"), retry_s=0.05))
    body = alias_event(version="9")
    httpx.post(f"{base}/webhooks/mlflow", content=body, headers=signed(body, delivery="d-9"))
    deadline = time.monotonic() + 10
    while httpx.get(f"{base}/deliveries/d-9").json()["state"] == "pending":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    answer = httpx.get(f"{base}/deliveries/d-9").json()
    assert answer["state"] == "refused" and "failed its required gate" in answer["error"] and calls == ["9"]
    stop(server, thread)


def test_concurrent_deliveries_for_one_version_publish_it_once_and_a_signed_non_json_body_is_400(tmp_path):
    """MLflow retrying with new delivery ids, or an alias set twice, sends several deliveries for one version at
    once: exactly one publishes it. Moving the alias on and back publishes again; a signed body that is not an
    MLflow event is a 400, not a 500."""
    import concurrent.futures

    from edgeship.flows.webhook import DeliveryStore

    calls: list[str] = []
    watched = WatchedAlias("digits-classifier", "production", SECRET)
    base, server, thread = serve(create_app(watched, lambda name, version: calls.append(version),
                                            DeliveryStore(tmp_path / "d.sqlite"), retry_s=0.05))
    try:
        body = alias_event(version="11")

        def deliver(delivery: str) -> dict:
            return httpx.post(f"{base}/webhooks/mlflow", content=body, headers=signed(body, delivery=delivery),
                              timeout=30).json()

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(deliver, [f"d-11-{i}" for i in range(8)]))
        publishing = [a for a in answers if "publishing" in a]
        assert len(publishing) == 1 and all("names version 11 already" in a["ignored"] for a in answers
                                            if a not in publishing), answers
        accepted = next(f"d-11-{i}" for i, a in enumerate(answers) if "publishing" in a)
        deadline = time.monotonic() + 20
        while httpx.get(f"{base}/deliveries/{accepted}").json()["state"] != "done":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for version in ("12", "11"):  # on to 12, then an operator moves production back to 11
            moved = alias_event(version=version)
            answer = httpx.post(f"{base}/webhooks/mlflow", content=moved,
                                headers=signed(moved, delivery=f"m-{version}"))
            assert answer.json()["publishing"]["version"] == version
        deadline = time.monotonic() + 20
        while len(calls) < 3:
            assert time.monotonic() < deadline, calls
            time.sleep(0.05)
        time.sleep(0.3)
        assert calls == ["11", "12", "11"]

        for junk in (b"not json at all", b"[1, 2, 3]", b'{"entity": "model_version_alias", "data": "x"}'):
            answer = httpx.post(f"{base}/webhooks/mlflow", content=junk, headers=signed(junk, delivery="j"))
            assert answer.status_code == 400 and answer.json()["detail"], answer.text
    finally:
        stop(server, thread)
