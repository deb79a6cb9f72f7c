"""The device agent, its client and `edgeship-device`: a real agent process on 127.0.0.1, real HTTP,
real ONNX Runtime. One agent serves the whole module (1 MB upload limit, so the limit is cheap to hit)."""

from __future__ import annotations

import ast
import json
import platform
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import onnxruntime
import pytest

from edgeship.device.benchmark import run_benchmark_job
from edgeship.device.cli import main as device_cli
from edgeship.device.client import AgentClient, local_agent
from edgeship.errors import DeviceJobFailed, DeviceUnreachable
from edgeship.files import sha256_of
from edgeship.records import BenchmarkRequest, DeviceInfo

from onnx_models import write_tiny_classifier

DEVICE_DIR = Path(__file__).resolve().parents[1] / "edgeship" / "device"
FORBIDDEN = {"torch", "tensorflow", "mlflow", "prefect"}
QUICK = BenchmarkRequest(warmup=3, iterations=37)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_classifier(tmp_path_factory.mktemp("models") / "tiny.onnx")


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("agent-jobs")


@pytest.fixture(scope="module")
def agent(work_dir):
    with local_agent(name="test-device", max_upload_mb=1, job_timeout_s=60, work_dir=work_dir) as running:
        yield running
    assert running.process.poll() is not None, "the agent process outlived its context"


@pytest.fixture
def client(agent):
    with agent.client(timeout_s=60) as open_client:
        yield open_client


def _form(path: Path, sha256: str, request: BenchmarkRequest = QUICK) -> dict:
    """The keyword arguments of a raw httpx POST /jobs/benchmark."""
    return {"data": {"sha256": sha256, "target": "onnx-fp32", "request": request.model_dump_json()},
            "files": {"artifact": ("model.onnx", path.read_bytes(), "application/octet-stream")}}


def _auth(agent) -> dict:
    return {"Authorization": f"Bearer {agent.token}"}


def test_health_needs_no_token(agent):
    answer = httpx.get(f"{agent.url}/health")
    assert answer.status_code == 200
    assert answer.json()["status"] == "ok" and answer.json()["name"] == "test-device"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Basic abc"}],
                         ids=["no-token", "wrong-token", "wrong-scheme"])
def test_requests_without_the_token_get_401(agent, tiny_model, headers):
    for method, endpoint, kwargs in [("GET", "/info", {}),
                                     ("POST", "/jobs/benchmark", _form(tiny_model, sha256_of(tiny_model)))]:
        answer = httpx.request(method, f"{agent.url}{endpoint}", headers=headers, **kwargs)
        assert answer.status_code == 401, endpoint
        assert answer.headers["www-authenticate"].startswith("Bearer")
    with AgentClient(agent.url, token="wrong-token") as wrong, pytest.raises(DeviceJobFailed, match="401"):
        wrong.info()


def test_info_describes_the_device(client):
    info = client.info()
    assert isinstance(info, DeviceInfo)
    assert info.name == "test-device"
    assert info.runtimes == {"onnxruntime": onnxruntime.__version__}
    assert info.machine == platform.machine() and info.os == platform.system()
    assert info.cpu_count >= 1 and info.memory_total_mb > 0 and info.cpu_model
    assert info.python_version == platform.python_version()
    assert info.max_upload_mb == 1 and info.emulated is False


def test_benchmark_measures_the_model(client, tiny_model, work_dir):
    result = client.benchmark(tiny_model, "onnx-fp32", QUICK)
    assert result.status == "ok" and result.error is None
    assert (result.target, result.device, result.runtime) == ("onnx-fp32", "test-device", "onnxruntime")
    assert result.sha256 == sha256_of(tiny_model)
    assert (result.warmup, result.iterations, result.threads) == (3, 37, 1)
    latency = result.latency_ms
    assert 0 < latency.p50 <= latency.p90 <= latency.p95 <= latency.p99 <= latency.max
    assert latency.mean > 0 and latency.std >= 0
    assert result.throughput_ips > 0 and result.load_ms > 0 and result.first_inference_ms > 0
    assert result.peak_rss_mb > 0
    assert list(work_dir.iterdir()) == [], "the job's directory was left behind"


def test_sha256_mismatch_is_refused_before_anything_runs(agent, client, tiny_model, work_dir):
    before = client.health()["jobs_started"]
    answer = httpx.post(f"{agent.url}/jobs/benchmark", headers=_auth(agent), **_form(tiny_model, "0" * 64))
    assert answer.status_code == 400
    assert "expected " + "0" * 64 in answer.json()["detail"] and f"got {sha256_of(tiny_model)}" in answer.json()["detail"]
    assert client.health()["jobs_started"] == before
    assert list(work_dir.iterdir()) == []


def test_incomplete_form_and_unknown_runtime_are_refused(agent, tiny_model):
    no_sha = _form(tiny_model, "")
    del no_sha["data"]["sha256"]
    answer = httpx.post(f"{agent.url}/jobs/benchmark", headers=_auth(agent), **no_sha)
    assert answer.status_code == 422 and "sha256" in answer.json()["detail"]

    other_runtime = _form(tiny_model, sha256_of(tiny_model), BenchmarkRequest(runtime="tensorrt"))
    answer = httpx.post(f"{agent.url}/jobs/benchmark", headers=_auth(agent), **other_runtime)
    assert answer.status_code == 400 and "tensorrt" in answer.json()["detail"]


def test_corrupt_model_fails_and_the_agent_serves_the_next_job(client, tiny_model, tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07 this is not a protobuf " * 50)
    with pytest.raises(DeviceJobFailed, match="422.*ONNX Runtime cannot load"):
        client.benchmark(corrupt, "onnx-fp32", QUICK)
    assert client.benchmark(tiny_model, "onnx-fp32", QUICK).status == "ok"


def test_upload_over_the_limit_is_413(agent, tmp_path):
    big = tmp_path / "big.onnx"
    big.write_bytes(b"\0" * (3 << 20))
    # Content-Length says it all: refused before the body is read.
    answer = httpx.post(f"{agent.url}/jobs/benchmark", headers=_auth(agent), **_form(big, sha256_of(big)))
    assert answer.status_code == 413 and "--max-upload-mb" in answer.json()["detail"]

    # No Content-Length (chunked): refused while streaming, once the artifact passes 1 MB.
    boundary = "edgeship-test-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"artifact\"; filename=\"a\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()

    def body():
        yield head
        for _ in range(24):  # 1.5 MB in 64 KB chunks
            yield b"\0" * (64 << 10)
        yield f"\r\n--{boundary}--\r\n".encode()

    answer = httpx.post(f"{agent.url}/jobs/benchmark", content=body(),
                        headers={**_auth(agent), "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert answer.status_code == 413


def test_health_answers_while_a_job_runs(agent, client, tiny_model, work_dir):
    long_job = BenchmarkRequest(warmup=0, iterations=30_000)
    outcome = {}
    job = threading.Thread(target=lambda: outcome.setdefault("result", client.benchmark(tiny_model, "t", long_job)))
    job.start()
    saw_busy, job_dir_modes, slowest = False, set(), 0.0
    try:
        while job.is_alive():
            started = time.monotonic()
            health = httpx.get(f"{agent.url}/health", timeout=5).json()
            slowest = max(slowest, time.monotonic() - started)
            if health["busy"]:
                saw_busy = True
                job_dir_modes |= {stat.S_IMODE(p.stat().st_mode) for p in work_dir.iterdir() if p.exists()}
            time.sleep(0.02)
    finally:
        job.join(timeout=60)
    assert outcome["result"].iterations == 30_000
    assert saw_busy and slowest < 1.0
    assert job_dir_modes == {0o700}, "a job directory was not private (or was never seen)"


def test_timeout_stops_the_job(tiny_model):
    started = time.monotonic()
    with pytest.raises(DeviceJobFailed, match="timeout"):
        run_benchmark_job(tiny_model, "onnxruntime", BenchmarkRequest(iterations=1_000_000), timeout_s=0.3)
    assert time.monotonic() - started < 5


def test_unreachable_agent_raises_device_unreachable():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with AgentClient(url, token="t", timeout_s=5) as nobody, pytest.raises(DeviceUnreachable, match=url):
        nobody.health()


def test_cli_refuses_a_public_host_without_a_token(monkeypatch, capsys):
    monkeypatch.delenv("EDGESHIP_AGENT_TOKEN", raising=False)
    assert device_cli(["agent", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "without a token" in capsys.readouterr().err


def test_device_modules_import_no_heavy_frameworks():
    modules = ["edgeship.device.agent", "edgeship.device.client", "edgeship.device.benchmark",
               "edgeship.device.cli", "edgeship.device.runtimes"]
    if (DEVICE_DIR / "updater.py").exists():
        modules.append("edgeship.device.updater")
    script = (f"import importlib, json, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
              "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                                       text=True, timeout=60).stdout)
    assert FORBIDDEN.isdisjoint(loaded), FORBIDDEN & set(loaded)

    for source in sorted(DEVICE_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            heavy = {name.split(".")[0] for name in names} & FORBIDDEN
            assert not heavy, f"{source.name}:{node.lineno} imports {heavy}"
