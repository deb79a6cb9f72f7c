"""`edgeship-device serve` as a real process: a client's bad request, a restart, a junk body, a huge batch or a stray
spool file never condemns a good model or stops the service.

Each test runs the real updater against a signed repository on loopback (tests/ota_world.py), then
`edgeship-device serve` on a Unix socket, and ends with the device running a verified model and no good version
marked bad.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgeship.device.probation import ProbationPolicy
from edgeship.device.state import DeviceState, provision, read_events
from onnx_models import deep_classifier
from ota_world import QUICK_PROBATION, ROOT_DIR, TARGET, OtaWorld, golden_inputs
from timing import scaled, wait_until

ON_PROBATION = ProbationPolicy(required=5, max_failures=1, deadline_s=600)


@pytest.fixture
def world(tmp_path):
    world = OtaWorld(tmp_path)
    yield world
    world.close()


def v2_on_probation(world: OtaWorld) -> Path:
    """v1 confirmed, with a fallback; v2 installed on probation for the application (serve) to confirm."""
    world.publish("1", fallback="9")
    assert world.device(probation=QUICK_PROBATION).update().status == "updated"
    world.publish("2", fallback="9")
    assert world.device(probation=ON_PROBATION, self_check=False).update().on_probation
    state_dir = world.tmp_path / "device-1"
    provision(state_dir, "device-1", "stable", TARGET, world.url, world.root)
    return state_dir


class Served:
    """`edgeship-device serve` on a Unix socket, and a client for it."""

    def __init__(self, world: OtaWorld, state_dir: Path, *flags: str):
        self.socket_path = str(state_dir.parent / f"serve-{len(world.processes)}.sock")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edgeship.device.cli", "serve", "--state-dir", str(state_dir), "--uds",
             self.socket_path, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT_DIR,
            env={**os.environ, "PYTHONPATH": str(ROOT_DIR)})
        world.processes.append(self.process)
        self.client = httpx.Client(transport=httpx.HTTPTransport(uds=self.socket_path), base_url="http://device",
                                   timeout=scaled(30))
        wait_until(self._up, 60, "serve answering /health")

    def _up(self) -> bool:
        assert self.process.poll() is None, self.process.stderr.read()
        with contextlib.suppress(httpx.TransportError):
            return self.client.get("/health").status_code == 200
        return False

    def predict(self, batch) -> httpx.Response:
        """An array as .npy, a list as JSON."""
        if isinstance(batch, list):
            return self.client.post("/predict", json={"inputs": batch})
        body = io.BytesIO()
        np.save(body, batch)
        return self.client.post("/predict", content=body.getvalue(), headers={"content-type": "application/x-npy"})

    def stop(self, sig: int = signal.SIGTERM) -> str:
        self.client.close()
        self.process.send_signal(sig)
        return self.process.communicate(timeout=scaled(30))[1]


def assert_confirmed(state_dir: Path, version: str) -> None:
    state = DeviceState.load(state_dir)
    assert (state.active.version, state.probation, state.bad) == (version, None, [])
    assert ("confirmed", version) in [(e.kind, e.version) for e in read_events(state_dir)]


def test_requests_that_do_not_fit_the_model_are_refused_and_never_count_against_it_on_probation(world):
    """30 requests of the wrong shape, rank, dtype or with NaN during probation (max_failures=1): each one is
    refused with a 400 that says why, no answer comes from the fallback, and 5 good requests confirm the model."""
    state_dir = v2_on_probation(world)
    served = Served(world, state_dir)
    wrong = [np.zeros((2, 1, 9, 9)), np.zeros((2, 64)), np.full((1, 1, 8, 8), np.nan), [["a"] * 8] * 8]
    for index in range(30):
        answer = served.predict(wrong[index % len(wrong)]) if index % 5 else \
            served.client.post("/predict", content=b'{"inputs": [[1, 2], [3]]}')
        assert answer.status_code == 400, answer.text
        assert any(word in answer.json()["detail"] for word in ("shape", "rank", "NaN", "numbers", "send a .npy"))
    assert "the model takes (N, 1, 8, 8)" in served.predict(np.zeros((2, 1, 9, 9))).json()["detail"]
    health = served.client.get("/health").json()
    assert (health["slot"], health["versions"]["active"], DeviceState.load(state_dir).probation.failures) == \
        ("active", "2", 0)
    for image in golden_inputs(5):
        answer = served.predict(image[None])
        assert answer.status_code == 200 and answer.json()["version"] == "2"
    assert_confirmed(state_dir, "2")
    served.stop()
    world.assert_runs("device-1", "2")


def test_a_restart_during_probation_resumes_it_and_never_marks_the_model_bad(world):
    """SIGTERM (an upgrade, systemd restarting the service) and kill -9 of serve while v2 is on probation: each
    restart takes the probation up where it was (counts kept), and the model is confirmed."""
    state_dir = v2_on_probation(world)
    served = Served(world, state_dir)
    assert served.predict(golden_inputs(1)).json()["version"] == "2"
    served.stop(signal.SIGTERM)
    probation = DeviceState.load(state_dir).probation
    assert probation is not None and (probation.holder, probation.successes) == (None, 1)  # handed over cleanly

    served = Served(world, state_dir)
    assert served.predict(golden_inputs(1)).json()["version"] == "2"
    served.stop(signal.SIGKILL)  # a power cut: the holder dies without a word

    served = Served(world, state_dir)
    for image in golden_inputs(3):
        assert served.predict(image[None]).json()["version"] == "2"
    assert_confirmed(state_dir, "2")
    served.stop()
    world.assert_runs("device-1", "2")


def raw_post(socket_path: str, head: bytes, body: bytes, timeout_s: float) -> tuple[bytes, int]:
    """POST over a raw Unix socket, sending the body in 64 KB pieces until the server answers; (its answer, body
    bytes sent)."""
    import select

    with socket.socket(socket.AF_UNIX) as connection:
        connection.connect(socket_path)
        connection.settimeout(timeout_s)
        connection.sendall(head)
        sent = 0
        for start in range(0, len(body), 1 << 16):
            if select.select([connection], [], [], 0)[0]:
                break  # the answer is there: stop sending
            try:
                connection.sendall(body[start:start + (1 << 16)])
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += min(1 << 16, len(body) - start)
        try:
            return connection.recv(65536), sent
        except (TimeoutError, ConnectionResetError):
            return b"", sent


def test_junk_bodies_are_refused_without_reading_them_whole_and_the_model_is_untouched(world):
    """100 MB of junk is refused with 413 after at most the 16 MB body limit (declared or streamed), and junk that fits
    is a 400 naming the problem, never a 500; the model on probation answers the next good requests."""
    state_dir = v2_on_probation(world)
    served = Served(world, state_dir)  # the default body limit: 16 MB
    junk = os.urandom(100 << 20)
    declared = b"POST /predict HTTP/1.1\r\nHost: device\r\nContent-Length: 104857600\r\n\r\n"
    answer, sent = raw_post(served.socket_path, declared, junk, scaled(10))
    assert answer.startswith(b"HTTP/1.1 413") and sent < (4 << 20), (answer[:200], sent)
    streamed = b"POST /predict HTTP/1.1\r\nHost: device\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked = b"".join(b"10000\r\n" + junk[i:i + (1 << 16)] + b"\r\n" for i in range(0, 32 << 20, 1 << 16))
    answer, sent = raw_post(served.socket_path, streamed, chunked, scaled(10))
    assert answer.startswith(b"HTTP/1.1 413") and sent < (24 << 20), (answer[:200], sent)

    npy = io.BytesIO()
    np.save(npy, np.array(["a", "b"]))
    for body, kind in [(os.urandom(4096), "application/x-npy"), (os.urandom(4096), "application/json"),
                       (npy.getvalue(), "application/x-npy"), (b"[1, 2, 3]", "application/json"),
                       (b'{"inputs": {"a": 1}}', "application/json"), (b'{"inputs": null}', "application/json"),
                       (b'{"inputs": [[[[1e999]]]]}', "application/json"), (npy.getvalue()[:20], "application/x-npy")]:
        answer = served.client.post("/predict", content=body, headers={"content-type": kind})
        assert answer.status_code == 400 and answer.json()["detail"], (body[:40], answer.text)
    assert DeviceState.load(state_dir).probation.failures == 0
    for image in golden_inputs(5):
        assert served.predict(image[None]).json()["version"] == "2"
    assert_confirmed(state_dir, "2")
    served.stop()


def test_a_huge_batch_is_refused_and_health_answers_while_a_long_one_runs(world):
    """A batch of 100,000 images as JSON (19 MB) is refused with 413 by the default limits, with no answer lost;
    a batch of 1,024 through a model that takes the runtime about a second runs off the event loop, so /health keeps
    answering while it runs."""
    world.publish("1", fallback="9")
    assert world.device(probation=QUICK_PROBATION).update().status == "updated"
    world.publish("2", content=deep_classifier(depth=16).SerializeToString(), fallback="9")
    assert world.device(probation=ON_PROBATION, self_check=False).update().on_probation
    state_dir = world.tmp_path / "device-1"
    provision(state_dir, "device-1", "stable", TARGET, world.url, world.root)
    served = Served(world, state_dir)

    def while_polling(send) -> tuple[httpx.Response, int]:
        """`send()` on a thread; how many /health answers arrived before it returned."""
        done, answers = threading.Event(), []
        asker = threading.Thread(target=lambda: (answers.append(send()), done.set()))
        asker.start()
        with httpx.Client(transport=httpx.HTTPTransport(uds=served.socket_path), base_url="http://device",
                          timeout=scaled(30)) as poller:
            during = 0
            while not done.is_set():
                during += poller.get("/health").status_code == 200 and not done.is_set()
        asker.join()
        return answers[0], during

    huge = json.dumps({"inputs": np.random.default_rng(5).integers(0, 9, (100_000, 1, 8, 8)).tolist()}).encode()
    answer, _ = while_polling(lambda: served.client.post("/predict", content=huge,
                                                        headers={"content-type": "application/json"}))
    assert answer.status_code == 413 and "limit" in answer.json()["detail"], answer.text

    long_batch = np.random.default_rng(6).standard_normal((1024, 1, 8, 8)).astype(np.float32)
    answer, during = while_polling(lambda: served.predict(long_batch))
    assert answer.status_code == 200 and answer.json()["version"] == "2" and len(answer.json()["outputs"]) == 1024
    assert during >= 3, f"/health answered {during} times while the batch ran"
    for image in golden_inputs(4):
        served.predict(image[None])
    assert_confirmed(state_dir, "2")
    served.stop()


def test_a_stray_file_or_a_corrupt_counter_in_the_telemetry_spool_never_stops_inference(world):
    """What a crash, an operator or another program leaves in the spool (a stray name, a directory under a record's
    name, a torn temporary file, a drop counter that is not a number) is set aside and counted; serve starts and
    answers."""
    from edgeship.device.serve import FieldRuntime
    from edgeship.device.telemetry_mqtt import MqttSettings

    state_dir = v2_on_probation(world)
    spool = state_dir / "telemetry" / "spool"
    (spool / "sent").mkdir(parents=True)
    (spool / "notes.txt").write_text("left by someone")
    (spool / "backup.json").write_text("{}")
    (spool / "000000000007.json").write_text('{"sequence": 7}')  # a real one: kept, and sent when it can be
    (spool / "000000000009.json").mkdir()
    (spool / ".000000000010.json.k2j3").write_bytes(b"{")
    (spool / "sent" / "x.json").write_text("{}")
    (state_dir / "telemetry" / "spool-dropped").write_text("12\x00garbage")
    with socket.socket() as probe:  # a broker that is not there: telemetry stays spooled
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    field = FieldRuntime(state_dir, telemetry=MqttSettings(port=port, fleet="stray"), window_s=3600)
    try:
        for image in golden_inputs(5):
            assert field.predict(image[None]).version == "2"
        health = field.health()
        assert (health["spool_quarantined"], health["spool_dropped"]) == (6, 0), health
        assert len(list((spool / "quarantine").iterdir())) == 6
        assert (spool / "000000000007.json").is_file() and health["spooled"] >= 1
    finally:
        field.close()
    assert_confirmed(state_dir, "2")
