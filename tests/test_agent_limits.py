"""The device agent under a hostile or careless client: a model that allocates 2 GB, more jobs than the queue takes,
and hundreds of connections that never finish a request. A real agent process on 127.0.0.1 with a 1 GB job memory
limit, a 128-file descriptor limit and a short request-head timeout; it ends serving a verified model's benchmark."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from edgeship.device.client import AgentClient
from edgeship.errors import DeviceJobFailed
from edgeship.files import sha256_of
from edgeship.records import BenchmarkRequest
from onnx_models import memory_hog, tiny_classifier
from timing import scaled, wait_until

ROOT_DIR = Path(__file__).resolve().parents[1]
QUICK = BenchmarkRequest(warmup=2, iterations=10, sensors=False)
HEAD_TIMEOUT_S = scaled(1.0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    """`edgeship-device agent` with small limits; yields (url, its log file)."""
    directory = tmp_path_factory.mktemp("limited-agent")
    port, log = free_port(), directory / "agent.log"

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "edgeship.device.cli", "agent", "--host", "127.0.0.1", "--port", str(port),
             "--name", "limited", "--job-memory-mb", "1024", "--max-queued-jobs", "0", "--max-connections", "32",
             "--header-timeout-s", str(HEAD_TIMEOUT_S), "--no-sensors"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT_DIR, preexec_fn=few_files,
            env={**os.environ, "PYTHONPATH": str(ROOT_DIR), "EDGESHIP_AGENT_TOKEN": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: healthy(url), 60, "the agent answering /health")
        yield url, log, directory
    finally:
        process.terminate()
        try:
            process.wait(timeout=scaled(10))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def model_file(directory: Path, name: str, model) -> Path:
    path = directory / name
    path.write_bytes(model.SerializeToString())
    return path


def test_a_model_that_allocates_2_gb_fails_its_job_and_a_full_queue_answers_503(agent):
    url, _, directory = agent
    client = AgentClient(url, None, timeout_s=scaled(60))
    with pytest.raises(DeviceJobFailed, match=r"(?s)422.*Failed to allocate.*memory limit is 1024 MB"):
        client.benchmark(model_file(directory, "hog.onnx", memory_hog(2.0)), "onnx-fp32", QUICK)

    tiny = model_file(directory, "tiny.onnx", tiny_classifier())
    long_job = threading.Thread(target=client.benchmark, args=(tiny, "onnx-fp32", BenchmarkRequest(
        warmup=0, duration_s=scaled(3), sensors=False)))
    long_job.start()
    try:
        wait_until(lambda: httpx.get(f"{url}/health").json()["busy"], 30, "the long job running")
        form = {"data": {"sha256": sha256_of(tiny), "target": "onnx-fp32", "request": QUICK.model_dump_json()},
                "files": {"artifact": ("model.onnx", tiny.read_bytes(), "application/octet-stream")}}
        refused = httpx.post(f"{url}/jobs/benchmark", timeout=scaled(30), **form)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "30", refused.text
        assert "--max-queued-jobs" in refused.json()["detail"]
    finally:
        long_job.join()
    assert client.benchmark(tiny, "onnx-fp32", QUICK).status == "ok"  # the device measures a good model as before


def test_half_open_connections_are_closed_and_new_clients_are_served(agent):
    """200 connections that never send (or never finish) a request head, against an agent allowed 128 files: the
    agent keeps at most 32 open, closes the rest at once and the silent ones after the head timeout, answers
    /health meanwhile, and its log stays small."""
    url, log, directory = agent
    port = int(url.rpartition(":")[2])
    logged_before = log.stat().st_size
    silent = []
    for index in range(200):
        connection = socket.create_connection(("127.0.0.1", port), timeout=scaled(5))
        if index % 2:
            connection.sendall(b"GET /health HTTP/1.1\r\nHost: device\r\n")  # a head that never ends
        silent.append(connection)
    try:
        wait_until(lambda: healthy(url), 20, "/health answering beside 200 half-open connections")

        def closed(connection: socket.socket) -> bool:
            connection.settimeout(0.01)
            try:
                return connection.recv(1024) == b""
            except TimeoutError:
                return False
            except OSError:
                return True

        remaining = list(silent)

        def all_closed() -> bool:
            remaining[:] = [connection for connection in remaining if not closed(connection)]
            return not remaining

        wait_until(all_closed, 20, "the agent closing every half-open connection")
    finally:
        for connection in silent:
            connection.close()
    assert log.stat().st_size - logged_before < 64 * 1024, log.read_text()[-3000:]
    client = AgentClient(url, None, timeout_s=scaled(60))
    assert client.benchmark(model_file(directory, "tiny2.onnx", tiny_classifier(seed=3)), "onnx-fp32",
                            QUICK).status == "ok"
