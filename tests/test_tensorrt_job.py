"""The TensorRT build job: `POST /jobs/tensorrt-build`, the agent's engine cache, `GET /engines/{sha256}`,
and the fleet's build-then-benchmark of an engine.

Everything a machine without an NVIDIA GPU can show runs here on real agents over real HTTP: the
form's checks, the 501 with the reason (while the agent keeps serving), a builder that fails or
crashes in its child process, and the fleet sending no TensorRT job to a device whose /info lacks it.
The fleet's sequence (build, fetch the engine, benchmark and evaluate it by sha256) runs against an
in-process agent whose TensorRT is a stand-in: its "engine" is the ONNX re-serialized, measured by
ONNX Runtime. The real build and benchmark run only where `tensorrt` is installed and a CUDA
device exists, and are skipped with that reason elsewhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest

from edgeship.config import BenchmarkParams, GatePolicy
from edgeship.device import agent as agent_module
from edgeship.device.client import local_agent
from edgeship.device.runtimes import available_runtimes, nvidia_gpu_present, unavailable_reason
from edgeship.device.tensorrt_build import EngineCache, engine_key
from edgeship.errors import DeviceJobFailed
from edgeship.files import sha256_of
from edgeship.records import (BenchmarkRequest, CompiledArtifact, EvaluationRequest, TensorRTBuildOptions,
                              TensorSpec)
from edgeship.tasks.benchmark import NO_DEVICE, BenchmarkDevices, DeviceEndpoint, benchmark_artifacts, validation_batch
from edgeship.tasks.gate import evaluate_gate

from onnx_models import write_tiny_classifier

QUICK = BenchmarkRequest(warmup=2, iterations=20, sensors=False)
FLEET = BenchmarkParams(warmup=2, iterations=20, warmup_until_stable=False, sustained_s=None, retries=0,
                        timeout_s=60, probe_timeout_s=5)


def _why_no_tensorrt() -> str | None:
    """Why a real engine cannot be built here (None when it can), in the words the agent's 501 uses."""
    missing = []
    if importlib.util.find_spec("tensorrt") is None:
        missing.append("the tensorrt package is not installed")
    if not nvidia_gpu_present():
        missing.append("no CUDA device (no /dev/nvidia*, no Jetson GPU)")
    return f"{unavailable_reason('tensorrt')}: {' and '.join(missing)}" if missing else None


NO_TENSORRT = _why_no_tensorrt()


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    """A static batch-1 ONNX classifier, as the tensorrt targets ship it."""
    return write_tiny_classifier(tmp_path_factory.mktemp("trt") / "model_static.onnx", batch=1)


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    """A real agent process on loopback, with its engine cache in a temporary directory."""
    cache = tmp_path_factory.mktemp("trt-cache")
    with _environment(EDGESHIP_TRT_CACHE_DIR=str(cache)), \
            local_agent(name="no-gpu", job_timeout_s=60, max_upload_mb=1) as running:
        yield running


@pytest.fixture
def client(agent):
    with agent.client(timeout_s=60) as open_client:
        yield open_client


def _build_form(path: Path, sha256: str, options: str | None = '{"precision": "int8"}') -> dict:
    data = {"sha256": sha256, "target": "tensorrt-int8"}
    if options is not None:
        data["options"] = options
    return {"data": data, "files": {"artifact": ("model.onnx", path.read_bytes(), "application/octet-stream")}}


def _auth(agent) -> dict:
    return {"Authorization": f"Bearer {agent.token}"}


@contextlib.contextmanager
def _environment(**variables):
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --- the endpoint's checks, on any machine ---------------------------------------------------------


def test_build_and_engine_download_need_the_token(agent, onnx_model):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        answer = httpx.post(f"{agent.url}/jobs/tensorrt-build", headers=headers,
                            **_build_form(onnx_model, sha256_of(onnx_model)))
        assert answer.status_code == 401 and answer.headers["www-authenticate"].startswith("Bearer")
        assert httpx.get(f"{agent.url}/engines/{'0' * 64}", headers=headers).status_code == 401


def test_the_build_form_is_checked_before_anything_runs(agent, client, onnx_model):
    before = client.health()["jobs_started"]
    answer = httpx.post(f"{agent.url}/jobs/tensorrt-build", headers=_auth(agent),
                        **_build_form(onnx_model, "0" * 64))
    assert answer.status_code == 400
    assert "sha256 mismatch for 'artifact'" in answer.json()["detail"]
    assert f"got {sha256_of(onnx_model)}" in answer.json()["detail"]

    bad_options = {'{"precision": "int4"}': "precision",
                   '{"precision": "fp16", "workspace": 64}': "workspace",
                   '{"workspace_mb": 1}': "workspace_mb",
                   "not json": "options"}
    for options, word in bad_options.items():
        answer = httpx.post(f"{agent.url}/jobs/tensorrt-build", headers=_auth(agent),
                            **_build_form(onnx_model, sha256_of(onnx_model), options))
        detail = answer.json()["detail"]
        assert answer.status_code == 422 and word in detail, detail
        assert "it takes precision, workspace_mb, optimization_level, sparse_weights, timing_cache" in detail

    answer = httpx.post(f"{agent.url}/jobs/tensorrt-build", headers=_auth(agent),
                        **_build_form(onnx_model, sha256_of(onnx_model), options=None))
    assert answer.status_code == 422 and "['options']" in answer.json()["detail"]
    assert client.health()["jobs_started"] == before


def test_engine_references_are_checked(agent, client, onnx_model, tmp_path):
    unknown = "ab" * 32
    answer = httpx.get(f"{agent.url}/engines/{unknown}", headers=_auth(agent))
    assert answer.status_code == 404 and "POST /jobs/tensorrt-build" in answer.json()["detail"]
    with pytest.raises(DeviceJobFailed, match="404"):
        client.fetch_engine(unknown, tmp_path / "engine")
    assert not list(tmp_path.iterdir()), "a failed download left a file behind"

    # Naming an engine is for the tensorrt runtime only, and a malformed name never reaches the cache.
    for request, engine, message in [(QUICK, unknown, "names a TensorRT engine"),
                                     (QUICK, "not-a-hash", "64 hex digits")]:
        with pytest.raises(DeviceJobFailed, match=f"400.*{message}"):
            client.benchmark(None, "tensorrt-int8", request, runtime="onnxruntime", engine_sha256=engine)
    answer = httpx.post(f"{agent.url}/jobs/benchmark", headers=_auth(agent),
                        data={"target": "t", "request": QUICK.model_dump_json()},
                        files={"unrelated": ("x", b"x", "application/octet-stream")})
    assert answer.status_code == 422 and "neither the file 'artifact' nor the field 'engine_sha256'" in answer.text


@pytest.mark.skipif(NO_TENSORRT is None, reason="checks the answer of a device without TensorRT")
def test_without_tensorrt_the_build_is_501_with_the_reason_and_the_agent_keeps_serving(agent, client, onnx_model):
    reason = unavailable_reason("tensorrt")
    answer = httpx.post(f"{agent.url}/jobs/tensorrt-build", headers=_auth(agent),
                        **_build_form(onnx_model, sha256_of(onnx_model)))
    assert answer.status_code == 501 and answer.json()["detail"].startswith(reason)
    with pytest.raises(DeviceJobFailed, match="501: TensorRT needs the tensorrt package and a CUDA GPU") as caught:
        client.build_tensorrt_engine(onnx_model, "tensorrt-fp16")
    assert caught.value.status_code == 501 and not caught.value.transient  # the fleet does not retry it

    assert "tensorrt" not in client.info().runtimes
    with pytest.raises(DeviceJobFailed, match="400.*runtime 'tensorrt' is not available"):
        client.benchmark(None, "tensorrt-int8", QUICK, engine_sha256="ab" * 32)
    assert client.health()["status"] == "ok" and agent.process.poll() is None
    assert client.benchmark(onnx_model, "onnx-fp32", QUICK).status == "ok"


def test_the_fleet_sends_no_tensorrt_job_to_a_device_without_it(agent, onnx_model, monkeypatch):
    from edgeship.device.client import AgentClient

    sent = []
    monkeypatch.setattr(AgentClient, "build_tensorrt_engine", lambda self, *args, **kw: sent.append(args))
    devices = [DeviceEndpoint("no-gpu", agent.url, agent.token)]
    fleet = BenchmarkDevices(devices, FLEET)
    fleet.probe()
    jobs, unserved = fleet.plan([_artifact(onnx_model)])
    assert not jobs and [(r.device, r.status) for r in unserved] == [(NO_DEVICE, "not_measured")]
    assert "no device in the inventory serves runtime 'tensorrt'" in unserved[0].error

    results = benchmark_artifacts([_artifact(onnx_model)], BenchmarkDevices(devices, FLEET))["tensorrt-int8"]
    assert [r.status for r in results] == ["not_measured"] and results[0].latency_ms is None and not sent
    gate = evaluate_gate("tensorrt-int8", GatePolicy(p99_latency_ms=100, max_accuracy_drop=None), 0.9,
                         _artifact(onnx_model), None, results)
    assert not gate.passed


def _artifact(path: Path, target: str = "tensorrt-int8") -> CompiledArtifact:
    return CompiledArtifact(target=target, path=path, sha256=sha256_of(path), bytes=path.stat().st_size,
                            precision="int8" if target.endswith("int8") else "fp16", runtime="tensorrt",
                            inputs=[TensorSpec(name="input", shape=(1, 1, 8, 8))],
                            outputs=[TensorSpec(name="logits", shape=(1, 10))])


# --- the build job's child process -----------------------------------------------------------------


def test_a_builder_that_crashes_ends_only_its_own_process(tmp_path, onnx_model, monkeypatch):
    """TensorRT's lean runtime segfaults on import without a GPU: that must end the job, not the caller."""
    from edgeship.device.jobs import run_tensorrt_build_job

    fake = tmp_path / "fake-tensorrt"
    fake.mkdir()
    (fake / "tensorrt.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    monkeypatch.setenv("PYTHONPATH", str(fake))
    with pytest.raises(DeviceJobFailed, match="killed by SIGSEGV"):
        run_tensorrt_build_job(onnx_model, tmp_path / "model.engine", TensorRTBuildOptions(), timeout_s=60)
    monkeypatch.delenv("PYTHONPATH")
    if importlib.util.find_spec("tensorrt") is None:  # the real builder, without TensorRT: its own words
        with pytest.raises(DeviceJobFailed, match="TensorRT is not installed on this device"):
            run_tensorrt_build_job(onnx_model, tmp_path / "model.engine", TensorRTBuildOptions(), timeout_s=60)


def test_the_engine_cache_keys_engines_and_drops_the_least_recently_used(tmp_path):
    cache = EngineCache(tmp_path / "engines", max_bytes=2500)
    keys = [engine_key("a" * 64, {"precision": p}, "10.0", "Orin") for p in ("fp16", "int8", "fp32")]
    assert len(set(keys)) == 3 and keys[0] == engine_key("a" * 64, {"precision": "fp16"}, "10.0", "Orin")
    assert keys[0] != engine_key("a" * 64, {"precision": "fp16"}, "10.3", "Orin")  # tied to TensorRT
    assert keys[0] != engine_key("a" * 64, {"precision": "fp16"}, "10.0", "RTX 4090")  # and to the GPU
    shas = []
    for index, key in enumerate(keys):
        data = bytes([index]) * 1000
        shas.append(hashlib.sha256(data).hexdigest())
        (tmp_path / "built").write_bytes(data)
        cache.put(key, tmp_path / "built", {"engine_sha256": shas[-1], "onnx_sha256": "a" * 64})
        if index == 1:
            time.sleep(0.01)
            assert cache.get(shas[0]) is not None  # used: now the first is the most recent
    assert cache.find(keys[1]) is None and cache.get(shas[1]) is None  # the least recently used went
    assert cache.find(keys[0])["engine_sha256"] == shas[0] and cache.get(shas[2])[0].read_bytes()[:1] == b"\x02"
    assert not (tmp_path / "engines" / f"{keys[1]}.key").exists()
    assert cache.get("../../etc/passwd") is None
    assert oct((tmp_path / "engines").stat().st_mode & 0o777) == "0o700"


# --- build, fetch, benchmark: the fleet against a stand-in TensorRT ---------------------------------


class _StandInTensorRT:
    """What the agent calls TensorRT through, replaced: `build` re-serializes the ONNX as the "engine";
    benchmark and evaluate jobs on the tensorrt runtime run that file on ONNX Runtime (in a child, as ever)."""

    def __init__(self):
        self.builds = 0
        self.runtimes_seen: list[str] = []

    def build(self, onnx_path, engine_path, options, timeout_s, memory_mb=None):
        self.builds += 1
        model = onnx.load(str(onnx_path))
        model.producer_name = f"stand-in engine ({options.precision})"
        data = model.SerializeToString()
        Path(engine_path).write_bytes(data)
        return {"engine_path": str(engine_path), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                "precision": options.precision, "tensorrt_version": "10.0-stand-in", "device": "Stand-in GPU",
                "build_s": 0.01, "timing_cache": None, "log": [f"[I] line {i}" for i in range(100)]}

    def benchmark(self, path, runtime, job, timeout_s, sensors=None, memory_mb=None):
        self.runtimes_seen.append(runtime)
        fields = self._real_benchmark(path, "onnxruntime", job.model_copy(update={"runtime": "onnxruntime"}),
                                      timeout_s, sensors, memory_mb)
        return {**fields, "runtime": runtime}

    def evaluate(self, path, batch, job, timeout_s, max_batch_bytes, memory_mb=None):
        self.runtimes_seen.append(job.runtime)
        answer = self._real_evaluate(path, batch, job.model_copy(update={"runtime": "onnxruntime"}), timeout_s,
                                     max_batch_bytes, memory_mb)
        return {**answer, "runtime": job.runtime}

    _real_benchmark = staticmethod(agent_module.run_benchmark_job)
    _real_evaluate = staticmethod(agent_module.run_evaluation_job)


@contextlib.contextmanager
def _gpu_agent(monkeypatch, cache_dir: Path, stand_in: _StandInTensorRT | None):
    """An agent in this process that believes it has TensorRT and a GPU; `stand_in=None` keeps the real
    builder (which then fails in its child process, having no TensorRT to import)."""
    import socket

    import uvicorn

    runtimes = {**available_runtimes(), "tensorrt": "10.0-stand-in"}
    monkeypatch.setattr(agent_module, "available_runtimes", lambda: runtimes)
    monkeypatch.setattr(agent_module, "unavailable_reason", lambda runtime: None)
    monkeypatch.setattr(agent_module, "gpu_name", lambda: "Stand-in GPU")
    if stand_in is not None:
        monkeypatch.setattr(agent_module, "run_tensorrt_build_job", stand_in.build)
        monkeypatch.setattr(agent_module, "run_benchmark_job", stand_in.benchmark)
        monkeypatch.setattr(agent_module, "run_evaluation_job", stand_in.evaluate)
    settings = agent_module.AgentSettings(name="gpu-box", token="gpu-token", fork_server=False, sensors=False,
                                          engine_cache_dir=cache_dir, job_timeout_s=60)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(agent_module.create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield DeviceEndpoint("gpu-box", f"http://127.0.0.1:{port}", "gpu-token")
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from edgeship.records import PreparedData

    folder = tmp_path_factory.mktemp("prepared")
    rng = np.random.default_rng(3)
    np.savez(folder / "test.npz", x=rng.standard_normal((12, 1, 8, 8)).astype(np.float32),
             y=rng.integers(0, 10, 12).astype(np.int64))
    return PreparedData(directory=folder, classes=[str(i) for i in range(10)], input_shape=(1, 8, 8),
                        counts={"test": 12})


def test_the_fleet_builds_on_the_device_stores_the_engine_and_measures_it(onnx_model, data, tmp_path, monkeypatch):
    from edgeship.device.runtimes import open_session, predict_classes

    stand_in = _StandInTensorRT()
    artifact = _artifact(onnx_model)
    params = FLEET.model_copy(update={"tensorrt_build": {"workspace_mb": 256}})
    batch = validation_batch(data, tmp_path)
    with _gpu_agent(monkeypatch, tmp_path / "cache", stand_in) as device:
        fleet = BenchmarkDevices([device], params, engine_dir=tmp_path / "engines")
        fleet.probe()
        assert "tensorrt" in fleet.info["gpu-box"].runtimes
        (result,) = benchmark_artifacts([artifact], fleet, batch)["tensorrt-int8"]
        (again,) = benchmark_artifacts([artifact], fleet)["tensorrt-int8"]

    assert result.status == "ok" and result.error is None, result
    build = result.build
    assert (build.onnx_sha256, build.precision, build.options.workspace_mb) == (artifact.sha256, "int8", 256)
    assert (build.gpu, build.tensorrt_version, build.device, build.cached) == ("Stand-in GPU", "10.0-stand-in",
                                                                               "gpu-box", False)
    assert build.log_tail == [f"[I] line {i}" for i in range(40, 100)]  # the tail only
    # The result is of the artifact the pipeline sent, measured as the engine the device built from it ...
    assert result.sha256 == artifact.sha256 and result.engine_sha256 == build.engine_sha256 != artifact.sha256
    assert result.runtime == "tensorrt" and result.latency_ms.p50 > 0 and result.attempts == 3  # build, bench, eval
    # ... and that engine is fetched, to be stored with the release like any artifact.
    stored = Path(result.engine_path)
    assert stored.parent == tmp_path / "engines" and sha256_of(stored) == build.engine_sha256
    with np.load(batch.path) as arrays:
        expected = np.mean(predict_classes(open_session("onnxruntime", stored), arrays["x"]) == arrays["y"])
    assert result.accuracy == pytest.approx(expected) and result.accuracy_samples == 12
    assert stand_in.runtimes_seen == ["tensorrt", "tensorrt", "tensorrt"]  # benchmark, evaluate, benchmark

    # The second release finds the engine in the device's cache: not built again, the same engine measured.
    assert stand_in.builds == 1 and again.build.cached and again.engine_sha256 == build.engine_sha256
    assert again.status == "ok" and again.engine_path == result.engine_path


def test_a_failed_build_fails_that_device_with_the_builders_words(onnx_model, tmp_path, monkeypatch):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("the real builder would not fail here: TensorRT is installed")
    with _gpu_agent(monkeypatch, tmp_path / "cache", stand_in=None) as device:
        fleet = BenchmarkDevices([device], FLEET)
        (result,) = benchmark_artifacts([_artifact(onnx_model, "tensorrt-fp16")], fleet)["tensorrt-fp16"]
        with httpx.Client(base_url=device.url, headers={"Authorization": "Bearer gpu-token"}) as http:
            health = http.get("/health").json()
    assert result.status == "failed" and result.latency_ms is None and result.engine_sha256 is None
    assert "the TensorRT engine build on gpu-box failed" in result.error
    assert "422" in result.error and "TensorRT is not installed on this device" in result.error
    assert result.attempts == 1 and not fleet.lost  # the builder's answer is final: no retry, device not lost
    assert health["status"] == "ok" and health["jobs_failed"] == 1
    gate = evaluate_gate("tensorrt-fp16", GatePolicy(p99_latency_ms=100, max_accuracy_drop=None), 0.9,
                         _artifact(onnx_model, "tensorrt-fp16"), None, [result])
    assert not gate.passed


# --- the real thing, where TensorRT and a GPU exist ------------------------------------------------


@pytest.mark.skipif(NO_TENSORRT is not None, reason=NO_TENSORRT or "")
def test_a_real_engine_is_built_fetched_and_measured(client, onnx_model, tmp_path):
    build = client.build_tensorrt_engine(onnx_model, "tensorrt-fp16", TensorRTBuildOptions(precision="fp16"))
    assert build.onnx_sha256 == sha256_of(onnx_model) and build.engine_bytes > 0 and build.log_tail
    assert build.tensorrt_version and build.gpu and not build.cached
    engine = client.fetch_engine(build.engine_sha256, tmp_path / "model.engine")
    assert sha256_of(engine) == build.engine_sha256
    result = client.benchmark(None, "tensorrt-fp16", QUICK, engine_sha256=build.engine_sha256)
    assert result.status == "ok" and result.runtime == "tensorrt" and result.latency_ms.p50 > 0
    assert (result.sha256, result.engine_sha256) == (build.onnx_sha256, build.engine_sha256)
    batch = tmp_path / "val.npz"
    np.savez(batch, x=np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32),
             y=np.zeros(5, dtype=np.int64))
    evaluation = client.evaluate(None, "tensorrt-fp16", batch, EvaluationRequest(runtime="tensorrt"),
                                 engine_sha256=build.engine_sha256)
    assert evaluation.samples == 5
    assert client.build_tensorrt_engine(onnx_model, "tensorrt-fp16").cached
