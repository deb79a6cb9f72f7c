"""The device agent, its client and `edgeship-device`: a real agent process on 127.0.0.1, real HTTP,
real ONNX Runtime. One agent serves the whole module (1 MB upload limit, so the limit is cheap to hit;
a 3 s upload timeout, so a stalled client is cheap to show); TLS gets an agent of its own."""

from __future__ import annotations

import ast
import concurrent.futures
import datetime
import ipaddress
import json
import os
import platform
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime
import pytest

from edgeship.device.cli import main as device_cli
from edgeship.device.client import AgentClient, local_agent
from edgeship.device.jobs import run_benchmark_job
from edgeship.device.runtimes import available_runtimes, open_session, predict_classes
from edgeship.errors import DeviceJobFailed, DeviceUnreachable
from edgeship.files import sha256_of
from edgeship.records import BenchmarkRequest, DeviceInfo, EvaluationRequest

from onnx_models import tiny_classifier, write_tiny_classifier
from timing import scaled

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
    with local_agent(name="test-device", max_upload_mb=1, job_timeout_s=60, work_dir=work_dir,
                     upload_timeout_s=3) as running:
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
    assert info.runtimes["onnxruntime"] == onnxruntime.__version__
    assert info.machine == platform.machine() and info.os == platform.system()
    assert info.cpu_count >= 1 and info.memory_total_mb > 0 and info.cpu_model
    assert info.python_version == platform.python_version()
    assert info.max_upload_mb == 1 and info.emulated is False and info.tls is False
    assert info.cpus == sorted(os.sched_getaffinity(0)) and info.threads is None
    sensors = {sensor.name: sensor for sensor in info.sensors}
    assert {"thermal", "cpufreq", "rapl", "rpi-throttle", "tegrastats", "meter"} <= set(sensors)
    assert all(s.available or s.detail for s in sensors.values()), "an absent sensor must say why"


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
    assert saw_busy and slowest < scaled(1.0)
    assert job_dir_modes == {0o700}, "a job directory was not private (or was never seen)"


def test_timeout_stops_the_job(tiny_model):
    started = time.monotonic()
    with pytest.raises(DeviceJobFailed, match="timeout"):
        run_benchmark_job(tiny_model, "onnxruntime", BenchmarkRequest(iterations=1_000_000), timeout_s=0.3)
    assert time.monotonic() - started < scaled(5)


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
    modules = ["edgeship.device.agent", "edgeship.device.client", "edgeship.device.jobs",
               "edgeship.device.job_process", "edgeship.device.fork_server", "edgeship.device.measure",
               "edgeship.device.evaluate",
               "edgeship.device.cli", "edgeship.device.runtimes", "edgeship.device.sensors",
               "edgeship.device.sensors.sysfs", "edgeship.device.sensors.raspberrypi",
               "edgeship.device.sensors.jetson", "edgeship.device.sensors.meter"]
    if (DEVICE_DIR / "updater.py").exists():
        modules.append("edgeship.device.updater")
    script = (f"import importlib, json, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
              "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                                       text=True, timeout=60).stdout)
    assert FORBIDDEN.isdisjoint(loaded), FORBIDDEN & set(loaded)

    for source in sorted(DEVICE_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            heavy = {name.split(".")[0] for name in names} & FORBIDDEN
            assert not heavy, f"{source.name}:{node.lineno} imports {heavy}"


# --- measurement method ------------------------------------------------------------------------------


def test_benchmark_reports_tails_memory_histogram_and_windows(client, tiny_model):
    result = client.benchmark(tiny_model, "onnx-fp32", BenchmarkRequest(warmup=5, iterations=400, windows=4))
    latency = result.latency_ms
    assert latency.min <= latency.p50 <= latency.p99 <= latency.p999 <= latency.max
    assert result.mode == "iterations" and result.warmup_stable is None and result.runtime_version
    assert result.load_rss_delta_mb > 0 and result.peak_rss_mb > result.load_rss_delta_mb
    assert sum(result.histogram.counts) == 400 and len(result.histogram.edges_ms) == 41
    assert result.histogram.edges_ms[0] == pytest.approx(latency.min)
    assert result.histogram.edges_ms[-1] == pytest.approx(latency.max)
    assert sum(w.iterations for w in result.windows) == 400 and result.drift_ratio is None  # not sustained
    assert result.started_at <= result.finished_at <= time.time()
    assert result.cpus == sorted(os.sched_getaffinity(0))
    assert result.sensors is not None and {s.name for s in result.sensors.sensors} >= {"thermal", "rapl"}


def test_warm_up_until_stable_and_a_sustained_run(client, tiny_model):
    request = BenchmarkRequest(warmup=5, warmup_until_stable=True, warmup_max=3000, duration_s=0.6, windows=3,
                               cpus=[0])
    result = client.benchmark(tiny_model, "onnx-fp32", request)
    assert result.mode == "duration" and result.duration_s >= 0.6
    assert result.warmup >= 5 and result.warmup_stable is not None
    assert result.warmup_stable or any("did not stabilise" in note for note in result.notes)
    assert result.iterations > 100 and 1 <= len(result.windows) <= 3 and result.cpus == [0]
    assert result.windows[-1].end_s == pytest.approx(result.duration_s, rel=0.01)
    assert result.throughput_ips > 0 and result.drift_ratio > 0


def test_a_cpu_the_agent_may_not_use_is_refused(client, tiny_model):
    with pytest.raises(DeviceJobFailed, match=r"422.*CPU\(s\) \[4096\]"):
        client.benchmark(tiny_model, "onnx-fp32", QUICK.model_copy(update={"cpus": [4096]}))


def test_jobs_queue_one_at_a_time(agent, client, tiny_model):
    """Three clients at once: the agent measures one job after the other, never two together."""
    request = BenchmarkRequest(warmup=0, duration_s=0.3, sensors=False)
    queued = []

    def watch(stop: threading.Event) -> None:
        while not stop.is_set():
            queued.append(httpx.get(f"{agent.url}/health", timeout=5).json()["queued"])
            time.sleep(0.05)

    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(stop,))
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda _: agent.client(timeout_s=60).benchmark(tiny_model, "t", request),
                                    range(3)))
    finally:
        stop.set()
        watcher.join()
    spans = sorted((r.started_at, r.finished_at) for r in results)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), spans
    assert max(queued) >= 1


# --- on-device accuracy ------------------------------------------------------------------------------


def _batch(path: Path, count: int = 30, **arrays) -> Path:
    rng = np.random.default_rng(7)
    arrays.setdefault("x", rng.standard_normal((count, 1, 8, 8)).astype(np.float32))
    arrays.setdefault("y", rng.integers(0, 10, len(arrays["x"])).astype(np.int64))
    np.savez(path, **arrays)
    return path


def test_evaluate_returns_the_runtimes_predictions(client, tiny_model, tmp_path):
    batch = _batch(tmp_path / "val.npz")
    result = client.evaluate(tiny_model, "onnx-fp32", batch, EvaluationRequest(batch_size=8))
    with np.load(batch) as arrays:
        expected = predict_classes(open_session("onnxruntime", tiny_model), arrays["x"])
        labels = arrays["y"]
    assert result.predictions == expected.tolist() and result.samples == 30
    assert result.accuracy == pytest.approx(float(np.mean(expected == labels)))
    assert (result.sha256, result.batch_sha256) == (sha256_of(tiny_model), sha256_of(batch))


def test_hostile_batches_are_refused_and_the_agent_stays_up(agent, client, tiny_model, tmp_path, work_dir):
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([{"__reduce__": "os.system"}], dtype=object), y=np.zeros(1, dtype=np.int64))
    bomb = tmp_path / "bomb.npz"  # 8 KB on the wire, 8 MB once inflated: over 4x the 1 MB upload limit
    np.savez_compressed(bomb, x=np.zeros((2_000_000, 1), dtype=np.float32))
    cases = {
        pickled: "cannot be read as plain arrays",
        bomb: "inflates to",
        _batch(tmp_path / "shape.npz", x=np.zeros((4, 3, 8, 8), dtype=np.float32)): r"shape \(4, 3, 8, 8\)",
        _batch(tmp_path / "labels.npz", y=np.zeros(2, dtype=np.float32)): "one integer label per sample",
        tmp_path / "junk.npz": "not an .npz archive",
    }
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    for batch, message in cases.items():
        with pytest.raises(DeviceJobFailed, match=message):
            client.evaluate(tiny_model, "onnx-fp32", batch)

    answer = httpx.post(f"{agent.url}/jobs/evaluate", headers=_auth(agent), **_form(tiny_model, sha256_of(tiny_model)))
    assert answer.status_code == 422 and "'batch'" in answer.json()["detail"]
    assert client.evaluate(tiny_model, "onnx-fp32", _batch(tmp_path / "ok.npz")).samples == 30
    assert list(work_dir.iterdir()) == []


def test_a_model_reaching_outside_its_directory_is_refused(client, tiny_model, tmp_path):
    model = tiny_classifier()
    weight = model.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    location = weight.external_data.add()
    location.key, location.value = "location", "../../../../../../etc/hostname"
    hostile = tmp_path / "hostile.onnx"
    hostile.write_bytes(model.SerializeToString())
    with pytest.raises(DeviceJobFailed, match="422.*(escapes|outside|external)"):
        client.benchmark(hostile, "onnx-fp32", QUICK)
    assert client.benchmark(tiny_model, "onnx-fp32", QUICK).status == "ok"


# --- robustness and security -------------------------------------------------------------------------


def test_a_stalled_upload_does_not_hold_the_queue(agent, client, tiny_model):
    """A client that sends half a job and stops gets 408 after the upload timeout; the next job runs."""
    boundary = "stall"
    head = (f"POST /jobs/benchmark HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {agent.token}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 100000\r\n\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"artifact\"; filename=\"a\"\r\n\r\n")
    port = int(agent.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as stalled:
        stalled.sendall(head.encode() + b"\0" * 1000)
        time.sleep(0.2)  # the stalled job takes its turn first
        started = time.monotonic()
        assert client.benchmark(tiny_model, "onnx-fp32", QUICK).status == "ok"
        waited = time.monotonic() - started
        reply = stalled.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408") and b"upload-timeout" in reply
    assert 1.5 < waited < 30


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA), made with `cryptography`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeship test agent")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    (folder / "key.pem").chmod(0o600)
    return folder / "cert.pem", folder / "key.pem"


def test_tls_agent_serves_clients_that_trust_its_certificate(certificate, tiny_model):
    cert, key = certificate
    with local_agent(name="tls-device", tls_cert=cert, tls_key=key) as secure:
        assert secure.url.startswith("https://127.0.0.1:")
        with secure.client(timeout_s=60) as trusting:
            assert trusting.info().tls is True
            assert trusting.benchmark(tiny_model, "onnx-fp32", QUICK).status == "ok"
        with AgentClient(secure.url, secure.token, timeout_s=10) as untrusting, \
                pytest.raises(DeviceUnreachable, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            untrusting.info()
        plain = secure.url.replace("https://", "http://")
        with AgentClient(plain, secure.token, timeout_s=10) as cleartext, pytest.raises(DeviceUnreachable):
            cleartext.info()


def test_cli_wants_both_halves_of_a_tls_pair(certificate, capsys):
    assert device_cli(["agent", "--port", "1", "--tls-cert", str(certificate[0])]) == 2
    assert "both --tls-cert and --tls-key" in capsys.readouterr().err


def test_a_job_process_killed_mid_run_is_an_error_and_the_agent_goes_on(agent, client, tiny_model):
    """A runtime that crashes (here: SIGKILL from outside) ends only the job's own process."""
    import psutil

    outcome = {}
    job = threading.Thread(target=lambda: outcome.setdefault("error", _expect_failure(
        client, tiny_model, BenchmarkRequest(warmup=0, duration_s=20, sensors=False))))
    job.start()
    try:
        deadline, victim = time.monotonic() + 20, None
        while victim is None and time.monotonic() < deadline:
            # The job's process: forked by the agent's fork-server helper (or, without one, the agent's child).
            running = [p for p in psutil.Process(agent.process.pid).children(recursive=True)
                       if p.ppid() != agent.process.pid or "--fork-server" not in p.cmdline()]
            victim = running[0] if running else None
            time.sleep(0.05)
        assert victim is not None, "no job process appeared"
        time.sleep(0.3)  # well into the timed run
        victim.kill()
    finally:
        job.join(timeout=60)
    assert "killed by SIGKILL" in str(outcome["error"])
    assert client.benchmark(tiny_model, "onnx-fp32", QUICK).status == "ok"


def _expect_failure(client, model, request):
    try:
        client.benchmark(model, "onnx-fp32", request)
    except DeviceJobFailed as error:
        return error
    return "no error"


def test_fork_server_runs_jobs_and_recovers_when_its_helper_dies(tiny_model):
    from edgeship.device import fork_server

    assert fork_server.start_fork_server()
    try:
        server = fork_server._fork_server
        first = run_benchmark_job(tiny_model, "onnxruntime", QUICK, timeout_s=60)
        helper = server._process
        helper.kill()
        helper.wait()
        second = run_benchmark_job(tiny_model, "onnxruntime", QUICK, timeout_s=60)  # restarted for this job
        assert server._process is not helper and server._process.poll() is None
        with pytest.raises(DeviceJobFailed, match="timeout"):
            run_benchmark_job(tiny_model, "onnxruntime", BenchmarkRequest(duration_s=30), timeout_s=1.5)
        third = run_benchmark_job(tiny_model, "onnxruntime", QUICK, timeout_s=60)
    finally:
        fork_server.stop_fork_server()
    for result in (first, second, third):
        assert result["iterations"] == 37 and result["peak_rss_mb"] > result["load_rss_delta_mb"] > 0
    assert fork_server._fork_server is None


# --- runtime options ---------------------------------------------------------------------------------


def _tiny_tflite(path: Path, size: int = 8, classes: int = 10) -> Path:
    """A one-op LiteRT model ([1, size*size] -> FULLY_CONNECTED -> [1, classes]), written with LiteRT's own
    flatbuffer schema (no TensorFlow, no converter)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    rng = np.random.default_rng(0)
    arrays = [None, None, rng.standard_normal((classes, size * size)).astype(np.float32),
              rng.standard_normal(classes).astype(np.float32), None]
    model = schema.ModelT()
    model.version, model.description = 3, "edgeship test"
    model.buffers = []
    for array in arrays:
        buffer = schema.BufferT()
        buffer.data = None if array is None else list(array.tobytes())
        model.buffers.append(buffer)
    graph = schema.SubGraphT()
    graph.tensors = []
    for index, (name, shape) in enumerate([("input", [1, size * size]), ("weight", [classes, size * size]),
                                           ("bias", [classes]), ("logits", [1, classes])], start=1):
        tensor = schema.TensorT()
        tensor.name, tensor.shape, tensor.type, tensor.buffer = name, shape, schema.TensorType.FLOAT32, index
        graph.tensors.append(tensor)
    graph.inputs, graph.outputs = [0], [3]
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1, 2], [3]
    op.builtinOptionsType = schema.BuiltinOptions.FullyConnectedOptions
    op.builtinOptions = schema.FullyConnectedOptionsT()
    graph.operators = [op]
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.FULLY_CONNECTED
    code.version = 1
    model.operatorCodes, model.subgraphs = [code], [graph]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())
    return path


needs_litert = pytest.mark.skipif("litert" not in available_runtimes(),
                                  reason="LiteRT (the ai-edge-litert package) is not installed here")


@needs_litert
def test_runtime_options_reach_the_adapter_and_come_back(client, tmp_path):
    model = _tiny_tflite(tmp_path / "tiny.tflite")
    on, off, default = (client.benchmark(model, "tflite-fp32", QUICK.model_copy(update={
        "runtime": "litert", "runtime_options": options})) for options in ({"xnnpack": True}, {"xnnpack": False}, {}))
    assert on.runtime_options == {"xnnpack": True} and off.runtime_options == {"xnnpack": False}
    assert default.runtime_options == {"xnnpack": True}  # the adapter's default, reported as in effect
    assert all(r.status == "ok" and r.runtime == "litert" and r.iterations == 37 for r in (on, off, default))

    batch = _batch(tmp_path / "val.npz", x=np.random.default_rng(1).standard_normal((6, 64)).astype(np.float32))
    without = client.evaluate(model, "tflite-fp32", batch, EvaluationRequest(runtime="litert",
                                                                            runtime_options={"xnnpack": False}))
    with np.load(batch) as arrays:
        expected = predict_classes(open_session("litert", model, xnnpack=False), arrays["x"])
    assert without.predictions == expected.tolist()


@needs_litert
def test_runtime_options_an_adapter_does_not_take_are_refused_by_name(agent, client, tiny_model, tmp_path):
    model = _tiny_tflite(tmp_path / "tiny.tflite")
    before = client.health()["jobs_started"]
    cases = [(tiny_model, "onnxruntime", {"xnnpack": False}, "runtime 'onnxruntime' takes no option 'xnnpack'; "
                                                              "it takes: none"),
             (model, "litert", {"xnnpak": False}, "takes no option 'xnnpak'; it takes: xnnpack (bool)"),
             (model, "litert", {"xnnpack": 1}, "litert.xnnpack wants a bool, got 1")]
    for path, runtime, options, message in cases:
        request = QUICK.model_copy(update={"runtime": runtime, "runtime_options": options})
        answer = httpx.post(f"{agent.url}/jobs/benchmark", headers=_auth(agent),
                            **_form(path, sha256_of(path), request))
        assert answer.status_code == 400 and message in answer.json()["detail"], answer.text
        assert f"benchmark.runtime_options.{runtime}" in answer.json()["detail"]
    with pytest.raises(DeviceJobFailed, match="400.*takes no option 'threads'"):
        client.evaluate(model, "tflite-fp32", _batch(tmp_path / "v.npz"),
                        EvaluationRequest(runtime="litert", runtime_options={"threads": 2}))
    assert client.health()["jobs_started"] == before
