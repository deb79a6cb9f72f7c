"""The pipeline's side of the fleet: real agents on 127.0.0.1 (several at once), real HTTP, real ONNX
Runtime. Fan-out, one job at a time per device, on-device accuracy, devices lost mid-job (killed),
garbage answers, time-outs, emulated profiles, and the Prefect tasks the release flow submits."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from edgeship.config import BenchmarkParams, DeviceParams, EmulationProfile, GatePolicy, Params
from edgeship.device.client import AgentClient, local_agents
from edgeship.device.runtimes import open_session, predict_classes
from edgeship.errors import DeviceUnreachable
from edgeship.files import sha256_of
from edgeship.records import BenchmarkResult, CompiledArtifact, DeviceInfo, PreparedData, TensorSpec
from edgeship.tasks.benchmark import (NO_DEVICE, BenchmarkDevices, BenchmarkJob, DeviceEndpoint, benchmark_artifacts,
                                      connected_devices, validation_batch)
from edgeship.tasks.gate import evaluate_gate

from onnx_models import write_tiny_classifier
from timing import scaled

QUICK = BenchmarkParams(warmup=2, iterations=30, warmup_until_stable=False, sustained_s=None, retries=1,
                        retry_backoff_s=0.05, timeout_s=30, sensor_interval_s=0.2, probe_timeout_s=5)


def _artifact(path: Path, target: str, runtime: str = "onnxruntime") -> CompiledArtifact:
    return CompiledArtifact(target=target, path=path, sha256=sha256_of(path), bytes=path.stat().st_size,
                            precision="fp32", runtime=runtime, inputs=[TensorSpec(name="input", shape=(1, 1, 8, 8))],
                            outputs=[TensorSpec(name="logits", shape=(1, 10))])


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> list[CompiledArtifact]:
    folder = tmp_path_factory.mktemp("artifacts")
    return [_artifact(write_tiny_classifier(folder / "a.onnx", seed=1), "onnx-fp32"),
            _artifact(write_tiny_classifier(folder / "b.onnx", seed=2), "onnx-int8")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> PreparedData:
    """A prepared-data record whose test split fits the tiny classifier ([N, 1, 8, 8], 10 classes)."""
    folder = tmp_path_factory.mktemp("prepared")
    rng = np.random.default_rng(3)
    np.savez(folder / "test.npz", x=rng.standard_normal((40, 1, 8, 8)).astype(np.float32),
             y=rng.integers(0, 10, 40).astype(np.int64))
    return PreparedData(directory=folder, classes=[str(i) for i in range(10)], input_shape=(1, 8, 8),
                        counts={"test": 40})


@pytest.fixture(scope="module")
def fleet_devices():
    """Three loopback devices from an inventory: two emulated one-core profiles sharing tags, one plain."""
    inventory = [DeviceParams(name="emu-0", tags=["cpu", "x86"], emulate=EmulationProfile(threads=1, cpus=[0])),
                 DeviceParams(name="emu-1", tags=["cpu", "x86"], emulate=EmulationProfile(threads=1, cpus=[1])),
                 DeviceParams(name="plain", tags=["edge"], sustained_s=0.3)]
    with connected_devices(inventory, QUICK) as devices:
        yield devices


def test_fans_out_in_parallel_one_job_at_a_time_per_device(fleet_devices, artifacts, data, tmp_path, monkeypatch):
    spans: list[tuple[str, float, float]] = []
    real_benchmark = AgentClient.benchmark

    def recorded(self, *args, **kwargs):
        started = time.monotonic()
        try:
            return real_benchmark(self, *args, **kwargs)
        finally:
            spans.append((self.url, started, time.monotonic()))

    monkeypatch.setattr(AgentClient, "benchmark", recorded)
    batch = validation_batch(data, tmp_path)
    results = benchmark_artifacts(artifacts, BenchmarkDevices(fleet_devices, QUICK), batch)

    assert set(results) == {"onnx-fp32", "onnx-int8"}
    for target, measured in results.items():
        assert [r.device for r in measured] == ["emu-0", "emu-1", "plain"]
        assert all(r.status == "ok" and r.attempts == 2 and r.substitute_for is None for r in measured), measured
    # Emulated profiles say so, and ran pinned; the plain device ran a short sustained run.
    for result in results["onnx-fp32"]:
        if result.device.startswith("emu"):
            assert result.emulated and result.threads == 1 and result.cpus == [int(result.device[-1])]
        else:
            assert not result.emulated and result.mode == "duration" and result.duration_s >= 0.3
            # A window in which the loaded 2-core host ran nothing is left out, so there may be fewer.
            assert 2 <= len(result.windows) <= QUICK.sustained_windows and result.drift_ratio > 0
    # On-device accuracy equals what the same runtime predicts here for the same batch.
    with np.load(batch.path) as arrays:
        x, y = arrays["x"], arrays["y"]
    for artifact in artifacts:
        expected = float(np.mean(predict_classes(open_session("onnxruntime", artifact.path), x) == y))
        assert {r.accuracy for r in results[artifact.target]} == {expected}
        assert {r.accuracy_samples for r in results[artifact.target]} == {40}
    # Never two requests at once on one device; the devices did work at the same time.
    by_device: dict[str, list[tuple[float, float]]] = {}
    for url, started, ended in spans:
        by_device.setdefault(url, []).append((started, ended))
    for windows in by_device.values():
        windows.sort()
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(windows, windows[1:])), windows
    assert any(a[0] < b[1] and b[0] < a[1]
               for one, other in [(u, v) for u in by_device for v in by_device if u < v]
               for a in by_device[one] for b in by_device[other]), "the devices never worked in parallel"


def test_plan_reports_targets_no_device_serves(fleet_devices, artifacts):
    inventory = [*fleet_devices[:2], DeviceEndpoint(**{**fleet_devices[2].__dict__,
                                                      "runtimes": ("onnxruntime", "tensorrt")})]
    fleet = BenchmarkDevices(inventory, QUICK)
    fleet.probe()
    assert set(fleet.info) == {"emu-0", "emu-1", "plain"} and not fleet.lost
    assert fleet.info["emu-0"].emulated and fleet.info["emu-0"].cpus == [0] and fleet.info["emu-0"].threads == 1
    engine = artifacts[0].model_copy(update={"target": "tensorrt-fp16", "runtime": "tensorrt"})
    jobs, unserved = fleet.plan([artifacts[0], engine])

    assert [(j.artifact.target, j.device) for j in jobs] == [("onnx-fp32", "emu-0"), ("onnx-fp32", "emu-1"),
                                                            ("onnx-fp32", "plain")]
    assert [(r.target, r.device, r.status) for r in unserved] == [("tensorrt-fp16", "plain", "not_measured")]
    assert "inventory says plain serves runtime 'tensorrt'" in unserved[0].error

    fleet = BenchmarkDevices(fleet_devices[:2], QUICK)
    fleet.probe()
    jobs, unserved = fleet.plan([engine])
    assert not jobs and unserved[0].device == NO_DEVICE and "no device in the inventory" in unserved[0].error

    # A device that never answered /info keeps its jobs (its inventory runtimes, or all): it fails closed.
    unprobed = BenchmarkDevices(fleet_devices[:1], QUICK)
    unprobed.lost["emu-0"] = "did not answer"
    jobs, unserved = unprobed.plan([engine])
    assert [(j.artifact.target, j.device) for j in jobs] == [("tensorrt-fp16", "emu-0")] and not unserved
    assert unprobed.run(jobs[0]).status == "not_measured"


def _kill_when_busy(agent, give_up_s: float = 20) -> None:
    """Kill an agent and its job process as soon as it is measuring (a device that loses power mid-job)."""
    deadline = time.monotonic() + give_up_s
    while time.monotonic() < deadline:
        if httpx.get(f"{agent.url}/health", timeout=5).json()["busy"]:
            break
        time.sleep(0.01)
    processes = [psutil.Process(agent.process.pid), *psutil.Process(agent.process.pid).children(recursive=True)]
    for process in processes:
        process.kill()
    psutil.wait_procs(processes, timeout=10)


def test_a_device_lost_mid_job_hands_it_to_a_same_tag_device_else_not_measured(artifacts):
    names = ["pi-a", "pi-b", "solo"]
    with local_agents([{"name": name, "job_timeout_s": 30} for name in names]) as agents:
        tags = {"pi-a": ("pi4",), "pi-b": ("pi4",), "solo": ("jetson",)}
        devices = [DeviceEndpoint(a.name, a.url, a.token, tags[a.name], sustained_s=1.5) for a in agents]
        fleet = BenchmarkDevices(devices, QUICK)
        fleet.probe()
        outcome: dict[str, BenchmarkResult] = {}
        runs = [threading.Thread(target=lambda d=d: outcome.setdefault(d, fleet.run(BenchmarkJob(artifacts[0], d))))
                for d in ("pi-a", "solo")]
        killers = [threading.Thread(target=_kill_when_busy, args=(agents[i],)) for i in (0, 2)]
        for thread in [*runs, *killers]:
            thread.start()
        for thread in [*killers, *runs]:
            thread.join(timeout=60)

    replaced, alone = outcome["pi-a"], outcome["solo"]
    assert replaced.status == "ok" and replaced.device == "pi-b" and replaced.substitute_for == "pi-a"
    assert any("in place of pi-a" in note for note in replaced.notes)
    assert set(fleet.lost) == {"pi-a", "solo"}

    assert alone.status == "not_measured" and alone.device == "solo" and alone.latency_ms is None
    assert "lost" in alone.error and "jetson" in alone.error
    gate = evaluate_gate("onnx-fp32", GatePolicy(p99_latency_ms=100, max_accuracy_drop=None), 0.9, artifacts[0],
                         None, [replaced, alone])
    assert not gate.passed and gate.checks[0].measured is None and "solo" in gate.checks[0].reason


class _RawServer:
    """A TCP server on loopback that answers every connection with `reply(request_bytes)` (or never)."""

    def __init__(self, reply):
        self._reply = reply
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._stop = threading.Event()
        self._connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            self._connections.append(connection)
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        try:
            connection.settimeout(5)
            request = connection.recv(65536)
            answer = self._reply(request)
            if answer is None:
                self._stop.wait()  # hold the connection, say nothing
            else:
                connection.sendall(answer)
        except OSError:
            pass
        finally:
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close()


@pytest.fixture
def raw_server():
    servers = []

    def start(reply) -> _RawServer:
        servers.append(_RawServer(reply))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _http(body: bytes, status: str = "200 OK") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


def test_garbage_answers_are_a_lost_device_not_a_crash(raw_server, artifacts):
    not_http = raw_server(lambda request: b"SSH-2.0-OpenSSH_9.6\r\n\x00\xff garbage")
    wrong_json = raw_server(lambda request: _http(b'{"hello": "world"}'))
    with AgentClient(wrong_json.url, token="t", timeout_s=5) as client, \
            pytest.raises(DeviceUnreachable, match="not a BenchmarkResult") as caught:
        client.benchmark(artifacts[0].path, "onnx-fp32")
    assert caught.value.transient

    devices = [DeviceEndpoint("ssh-box", not_http.url, "t", ("x",)), DeviceEndpoint("web-box", wrong_json.url, "t")]
    results = benchmark_artifacts(artifacts[:1], BenchmarkDevices(devices, QUICK))["onnx-fp32"]
    assert [(r.device, r.status) for r in results] == [("ssh-box", "not_measured"), ("web-box", "not_measured")]
    assert "cannot reach" in results[0].error and "not a DeviceInfo" in results[1].error
    assert "no other device with the tags ['x']" in results[0].error
    assert "no tags" in results[1].error


def test_a_device_that_stops_answering_mid_job_times_out_and_is_lost(raw_server, artifacts):
    info = DeviceInfo(name="hangs", hostname="h", os="Linux", platform="p", machine="x86_64", cpu_model="c",
                      cpu_count=1, memory_total_mb=1.0, runtimes={"onnxruntime": "1"}, python_version="3",
                      agent_version="0").model_dump_json().encode()
    hangs = raw_server(lambda request: _http(info) if request.startswith(b"GET /info") else None)
    params = QUICK.model_copy(update={"timeout_s": 1.0, "retries": 0, "probe_timeout_s": 1.0})
    fleet = BenchmarkDevices([DeviceEndpoint("hangs", hangs.url, "t", ("solo",))], params)
    fleet.probe()
    assert "hangs" in fleet.info
    started = time.monotonic()
    result = fleet.run(BenchmarkJob(artifacts[0], "hangs"))
    assert time.monotonic() - started < scaled(10)
    assert result.status == "not_measured" and "in time" in result.error and "hangs" in fleet.lost


def test_a_job_past_the_agents_timeout_fails_without_retry(artifacts):
    with local_agents([{"name": "slow", "job_timeout_s": 1.0}]) as (agent,):
        fleet = BenchmarkDevices([DeviceEndpoint("slow", agent.url, agent.token, sustained_s=5.0)],
                      QUICK.model_copy(update={"timeout_s": 1.0}))
        fleet.probe()
        result = fleet.run(BenchmarkJob(artifacts[0], "slow"))
        assert httpx.get(f"{agent.url}/health").json()["busy"] is False
    assert result.status == "failed" and result.attempts == 1 and "timeout" in result.error
    assert not fleet.lost


def test_benchmark_on_fleet_submits_a_task_per_job_and_logs_figures(artifacts, data, monkeypatch):
    """The release flow's fleet stage. Prefect itself is replaced by a thread pool here (an ephemeral
    Prefect server costs 10-30 s on 2 cores); the release's end-to-end test runs it on real Prefect."""
    import concurrent.futures

    from edgeship.flows import release_tasks
    from edgeship.flows.release_tasks import benchmark_on_devices

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)
    submitted = []

    def submit(*args):
        submitted.append(args[1])
        return pool.submit(release_tasks.benchmark_on_device.fn, *args)

    monkeypatch.setattr(release_tasks.benchmark_on_device, "submit", submit)

    class Run:
        """Stands in for ReleaseRun: what the tasks log, kept in memory."""

        tracking_uri, run_id = "sqlite:///unused.db", "in-memory"

        def __init__(self):
            self.metrics, self.figures, self.json, self.lock = {}, {}, {}, threading.Lock()

        def log_metrics(self, metrics, step=None):
            with self.lock:
                self.metrics.update({k: v for k, v in metrics.items() if v is not None})

        def log_bytes(self, data, name):
            with self.lock:
                self.figures[name] = data

        def log_json(self, value, name):
            with self.lock:
                self.json[name] = value

    params = Params(devices=[DeviceParams(name="local", tags=["cpu"], sustained_s=0.3)],
                    benchmark=QUICK.model_copy(update={"evaluate_max_samples": 25}))
    run = Run()
    engine = artifacts[0].model_copy(update={"target": "coreml", "runtime": "coreml"})

    with pool:
        results = benchmark_on_devices([*artifacts, engine], data, params, run)
    assert submitted == ["local", "local"]
    assert [r.status for r in results["onnx-fp32"] + results["onnx-int8"]] == ["ok", "ok"], results
    assert results["onnx-fp32"][0].accuracy_samples == 25
    assert results["coreml"][0].status == "not_measured" and results["coreml"][0].device == NO_DEVICE
    for target in ("onnx-fp32", "onnx-int8"):
        assert run.figures[f"benchmarks/{target}/local/latency_histogram.png"].startswith(b"\x89PNG")
        assert run.figures[f"benchmarks/{target}/local/timeline.png"].startswith(b"\x89PNG")
        assert run.metrics[f"{target}/local/p999_ms"] >= run.metrics[f"{target}/local/p99_ms"]
        assert 0 <= run.metrics[f"{target}/local/accuracy"] <= 1
        assert run.json[f"benchmarks/{target}/local.json"]["status"] == "ok"
    assert run.json[f"benchmarks/coreml/{NO_DEVICE}.json"]["status"] == "not_measured"


def test_inventory_fields_and_what_they_resolve_to():
    from edgeship.config import parse_params
    from edgeship.errors import ConfigError
    from edgeship.tasks.benchmark import _sustained_s, benchmark_request

    params = parse_params({"devices": [
        {"name": "local", "tags": ["cpu"]},
        {"name": "emu", "emulate": {"threads": 1, "cpus": [0]}},
        {"name": "pi", "url": "https://pi.local:8765", "token_env": "PI_TOKEN", "tags": ["pi4"],
         "runtimes": ["onnxruntime"], "ca_file": "ca.pem"},
        {"name": "orin", "url": "https://orin.local:8765", "sustained_s": 300},
        {"name": "quick-pi", "url": "https://pi2.local:8765", "sustained_s": 0}]})
    sustained = {d.name: _sustained_s(d, params.benchmark) for d in params.devices}
    assert sustained == {"local": None, "emu": None, "pi": 120, "orin": 300, "quick-pi": None}
    request = benchmark_request(params.benchmark, "onnxruntime", sustained["pi"])
    assert request.duration_s == 120 and request.warmup_until_stable and request.windows == 10
    with pytest.raises(ConfigError, match="both a url and 'emulate'"):
        parse_params({"devices": [{"name": "x", "url": "http://a:1", "emulate": {"cpus": [0]}}]})
    with pytest.raises(ConfigError, match="cpus"):
        parse_params({"devices": [{"name": "x", "emulate": {"cpus": []}}]})


def test_runtime_options_and_build_options_from_params_go_into_each_job():
    from edgeship.config import parse_params
    from edgeship.errors import ConfigError
    from edgeship.tasks.benchmark import benchmark_request, tensorrt_build_options

    params = parse_params({"benchmark": {"runtime_options": {"litert": {"xnnpack": False},
                                                             "coreml": {"compute_units": "cpu_and_ne"}},
                                         "tensorrt_build": {"workspace_mb": 256, "optimization_level": 5}}})
    assert benchmark_request(params.benchmark, "litert").runtime_options == {"xnnpack": False}
    assert benchmark_request(params.benchmark, "coreml").runtime_options == {"compute_units": "CPU_AND_NE"}
    assert benchmark_request(params.benchmark, "onnxruntime").runtime_options == {}
    engine = CompiledArtifact(target="tensorrt-int8", path=Path("m.onnx"), sha256="0" * 64, bytes=1,
                              precision="int8", runtime="tensorrt", inputs=[], outputs=[])
    options = tensorrt_build_options(params.benchmark, engine)
    assert (options.precision, options.workspace_mb, options.optimization_level) == ("int8", 256, 5)
    for bad, message in [({"runtime_options": {"litert": {"xnnpak": False}}}, "it takes: xnnpack"),
                         ({"runtime_options": {"onnxruntime": {"threads": 2}}}, "it takes: none"),
                         ({"tensorrt_build": {"precision": "int8"}}, "its target's"),
                         ({"tensorrt_build": {"workspace": 1}}, "tensorrt_build.workspace")]:
        with pytest.raises(ConfigError, match=message):
            parse_params({"benchmark": bad})
