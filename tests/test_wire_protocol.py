"""The device wire protocol survives version skew: the pipeline's client reads what a newer agent
(extra fields) or an older one (optional fields missing) answers, a real agent takes a newer
pipeline's request, and an agent of an incompatible protocol gets an error naming the side to upgrade.

The answers replayed are a real agent's (127.0.0.1, real ONNX Runtime), edited as the other
release would send them, served by a small HTTP server on 127.0.0.1 (port 0).
"""

from __future__ import annotations

import http.server
import json

import httpx
import pytest

from edgeship.config import BenchmarkParams
from edgeship.device.client import AgentClient, local_agent
from edgeship.errors import AgentProtocolMismatch
from edgeship.files import sha256_of
from edgeship.records import PROTOCOL, BenchmarkRequest, BenchmarkResult, DeviceInfo, LatencyStats, wire
from edgeship.tasks.benchmark import BenchmarkDevices, DeviceEndpoint
from onnx_models import write_tiny_classifier

QUICK = BenchmarkRequest(warmup=3, iterations=37, sensors=False)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_classifier(tmp_path_factory.mktemp("models") / "tiny.onnx")


@pytest.fixture(scope="module")
def agent():
    with local_agent(name="wire-device", job_timeout_s=60) as running:
        yield running


@pytest.fixture(scope="module")
def answers(agent, tiny_model) -> dict[str, dict]:
    """What the real agent answers to GET /info and POST /jobs/benchmark, as JSON."""
    headers = {"Authorization": f"Bearer {agent.token}"}
    info = httpx.get(f"{agent.url}/info", headers=headers, timeout=30).raise_for_status().json()
    form = {"sha256": sha256_of(tiny_model), "target": "onnx-fp32", "request": QUICK.model_dump_json()}
    files = {"artifact": ("model.onnx", tiny_model.read_bytes(), "application/octet-stream")}
    result = httpx.post(f"{agent.url}/jobs/benchmark", headers=headers, data=form, files=files,
                        timeout=60).raise_for_status().json()
    return {"/info": info, "/jobs/benchmark": result}


@pytest.fixture
def replay(http_server):
    """Serve fixed JSON answers per path on 127.0.0.1 (any method), as an agent of another release would."""

    def serve(by_path: dict[str, dict]) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                self.rfile.read(int(self.headers.get("content-length") or 0))
                body = json.dumps(by_path[self.path]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
                pass

        return http_server(Handler)

    return serve


def _without_optional(answer: dict, record) -> dict:
    """`answer` as an older agent sends it: none of the fields `record` gives a default."""
    return {key: value for key, value in answer.items()
            if key in record.model_fields and record.model_fields[key].is_required()}


def test_a_newer_agents_extra_fields_are_ignored(answers, replay, tiny_model):
    info = {**answers["/info"], "gpu_model": "a future field", "accelerators": [{"kind": "npu"}]}
    result = dict(answers["/jobs/benchmark"])
    result["latency_ms"] = {**result["latency_ms"], "p9999": 1.0}
    result["power_trace"] = [1.0, 2.0]
    url = replay({"/info": info, "/jobs/benchmark": result})

    with AgentClient(url, timeout_s=30) as client:
        described = client.info()
        measured = client.benchmark(tiny_model, "onnx-fp32", QUICK)
    assert described == DeviceInfo.model_validate(answers["/info"])
    assert described.protocol == PROTOCOL and described.name == "wire-device"
    assert measured == BenchmarkResult.model_validate(answers["/jobs/benchmark"])
    assert measured.status == "ok" and measured.latency_ms.p99 > 0 and measured.iterations == 37


def test_an_older_agents_missing_optional_fields_take_their_defaults(answers, replay, tiny_model):
    info = _without_optional(answers["/info"], DeviceInfo)
    result = _without_optional(answers["/jobs/benchmark"], BenchmarkResult)
    result["latency_ms"] = _without_optional(answers["/jobs/benchmark"]["latency_ms"], LatencyStats)
    assert "protocol" not in info and "sensors" not in info and "iterations" not in result  # really older
    url = replay({"/info": info, "/jobs/benchmark": result})

    with AgentClient(url, timeout_s=30) as client:
        described = client.info()
        measured = client.benchmark(tiny_model, "onnx-fp32", QUICK)
    assert described.protocol == 1  # an agent from before /info stated it spoke protocol 1
    assert described.cpu_model == answers["/info"]["cpu_model"] and described.sensors == []
    assert described.max_upload_mb is None and described.tls is False
    assert measured.status == "ok" and measured.iterations == 0 and measured.histogram is None
    assert measured.latency_ms.p99 == answers["/jobs/benchmark"]["latency_ms"]["p99"]
    assert measured.latency_ms.p999 is None


def test_a_real_agent_takes_a_newer_pipelines_request(agent, tiny_model):
    request = {**QUICK.model_dump(mode="json"), "energy_budget_mj": 5.0}  # a field this agent does not know
    form = {"sha256": sha256_of(tiny_model), "target": "onnx-fp32", "request": json.dumps(request)}
    files = {"artifact": ("model.onnx", tiny_model.read_bytes(), "application/octet-stream")}
    answer = httpx.post(f"{agent.url}/jobs/benchmark", headers={"Authorization": f"Bearer {agent.token}"},
                        data=form, files=files, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "ok" and answer.json()["iterations"] == 37


def test_an_agent_of_a_newer_protocol_is_refused(answers, replay):
    url = replay({"/info": {**answers["/info"], "protocol": PROTOCOL + 1}})
    with AgentClient(url, timeout_s=30) as client, pytest.raises(AgentProtocolMismatch) as refused:
        client.info()
    assert f"speaks protocol {PROTOCOL + 1}, this pipeline speaks up to {PROTOCOL}: upgrade the pipeline" \
        in str(refused.value)
    assert refused.value.transient is False


def test_an_agent_of_an_older_protocol_is_refused_and_the_stage_says_why(agent, monkeypatch):
    # This pipeline as its next release would be: protocol 2, no longer reading protocol 1 agents.
    monkeypatch.setattr(wire, "PROTOCOL", 2)
    monkeypatch.setattr(wire, "MIN_AGENT_PROTOCOL", 2)
    with agent.client(timeout_s=30) as client, pytest.raises(AgentProtocolMismatch,
                                                             match="speaks protocol 1, this pipeline needs 2: "
                                                                   "upgrade the agent"):
        client.info()

    devices = BenchmarkDevices([DeviceEndpoint("old-agent", agent.url, agent.token)],
                               BenchmarkParams(retries=3, retry_backoff_s=30))
    devices.probe()  # not transient: refused at once, never retried (a retry would wait 30 s here)
    assert "old-agent" not in devices.info
    assert "speaks protocol 1, this pipeline needs 2: upgrade the agent" in devices.lost["old-agent"]
