"""The device's daemons as a service manager and Prometheus see them: a real `edgeship-device serve` and a real
agent on 127.0.0.1, scraped over HTTP and parsed with prometheus-client's text parser; READY, watchdog pings and
STOPPING arrive on a notify socket as systemd's would; their log lines on stderr are JSON lines when asked."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgeship.command_line import configure_logging
from edgeship.device.client import AgentClient
from edgeship.device.metrics import _InferenceCounters
from edgeship.device.runtime import InferenceRecord
from edgeship.fleet.broker import free_port
from edgeship.records import BenchmarkRequest

from onnx_models import write_tiny_classifier
from ota_world import ROOT_DIR, TARGET, OtaWorld
from timing import scaled, wait_until


def scrape(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """sample name -> [(labels, value), ...], through prometheus-client's own parser."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def value(samples, name: str, **labels) -> float:
    found = [v for sample_labels, v in samples.get(name, []) if all(sample_labels.get(k) == w for k, w in labels.items())]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


class NotifySocket:
    """What systemd listens on for sd_notify: a datagram socket; `messages` holds what arrived."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def received(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def environment(self, watchdog_s: float) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.path, "WATCHDOG_USEC": str(int(watchdog_s * 1e6))}


def stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    try:
        return process.communicate(timeout=scaled(30))[1]
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()[1]


def json_lines(stderr: str) -> list[dict]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]  # every line: one JSON object
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines), lines
    return lines


def test_serve_metrics_watchdog_and_json_logs(tmp_path):
    world = OtaWorld(tmp_path)
    notify = NotifySocket(tmp_path / "notify.sock")
    process = None
    try:
        world.publish("1", fallback="0")
        report = world.run_device("dev", TARGET, "--app-confirms", "--confirm-after", "5")
        assert report["status"] == "updated" and report["on_probation"], report
        port, dead_broker = free_port(), free_port()  # telemetry to a broker that is down: records are spooled
        process = subprocess.Popen(
            [sys.executable, "-m", "edgeship.device.cli", "--log-format", "json", "serve",
             "--state-dir", str(tmp_path / "dev"), "--port", str(port), "--broker", f"127.0.0.1:{dead_broker}",
             "--window-s", "0.3"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT_DIR,
            env={**os.environ, "PYTHONPATH": str(ROOT_DIR), **notify.environment(watchdog_s=scaled(1.0))})
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=scaled(10))
        wait_until(lambda: "READY=1" in notify.received(), 60, "READY=1 on the notify socket")
        wait_until(lambda: notify.received().count("WATCHDOG=1") >= 3, 10, "watchdog pings every half interval")

        samples = scrape(client.get("/metrics").text)
        assert value(samples, "edgeship_model_version_info", slot="active") == 1
        assert {labels["version"] for labels, _ in samples["edgeship_model_version_info"]
                if labels["slot"] in ("active", "fallback")} == {"1", "0"}
        assert value(samples, "edgeship_probation_active") == 1
        assert value(samples, "edgeship_probation_inferences", kind="required") == 5
        assert value(samples, "edgeship_serving_slot", slot="active") == 1

        batch = np.random.default_rng(1).standard_normal((2, 1, 8, 8)).astype(np.float32)
        for _ in range(3):
            assert client.post("/predict", json={"inputs": batch.tolist()}).status_code == 200
        junk = client.post("/predict", content=b"\x00not json", headers={"content-type": "application/json"})
        assert junk.status_code == 400, junk.text
        samples = scrape(client.get("/metrics").text)
        assert value(samples, "edgeship_inferences_total", slot="active", outcome="ok") == 3
        assert value(samples, "edgeship_inference_latency_seconds_count", slot="active") == 3
        assert value(samples, "edgeship_inference_latency_seconds_bucket", slot="active", le="+Inf") == 3
        assert value(samples, "edgeship_http_requests_total", route="/predict", code="200") == 3
        assert value(samples, "edgeship_http_requests_total", route="/predict", code="400") == 1
        assert value(samples, "edgeship_http_request_duration_seconds_count", route="/predict") == 4
        assert value(samples, "edgeship_probation_inferences", kind="successes") == 3
        assert value(samples, "edgeship_fallback_switches_total") == 0

        for _ in range(2):  # the 4th and 5th good answers confirm v1
            assert client.post("/predict", json={"inputs": batch.tolist()}).status_code == 200
        wait_until(lambda: value(scrape(client.get("/metrics").text), "edgeship_probation_active") == 0, 10,
                   "probation confirmed")
        wait_until(lambda: value(scrape(client.get("/metrics").text), "edgeship_telemetry_spool_records") >= 1, 20,
                   "a telemetry window spooled while the broker is down")
        client.close()
        stderr = stop(process)
        process = None
        assert "STOPPING=1" in notify.received()
        lines = json_lines(stderr)
        # a daemon logs at INFO unless told otherwise: the confirmation is in its log
        assert any(line["level"] == "INFO" and line["logger"] == "edgeship.device.probation"
                   and "confirmed version 1" in line["message"] for line in lines), lines
    finally:
        if process is not None:
            process.kill()
            process.wait()
        world.close()


def test_agent_metrics_need_its_token_and_count_jobs(tmp_path):
    model = write_tiny_classifier(tmp_path / "model.onnx")
    notify = NotifySocket(tmp_path / "notify.sock")
    port, token = free_port(), "metrics-test-token"
    process = subprocess.Popen(
        [sys.executable, "-m", "edgeship.device.cli", "--log-format", "json", "agent", "--port", str(port),
         "--name", "metrics", "--no-sensors"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT_DIR,
        env={**os.environ, "PYTHONPATH": str(ROOT_DIR), "EDGESHIP_AGENT_TOKEN": token,
             **notify.environment(watchdog_s=scaled(1.0))})
    try:
        wait_until(lambda: "READY=1" in notify.received(), 60, "READY=1 from the agent")
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/metrics").status_code == 401  # like /info: the token, or nothing
        result = AgentClient(url, token).benchmark(model, TARGET, BenchmarkRequest(warmup=2, iterations=5))
        assert result.latency_ms is not None and result.latency_ms.p50 > 0
        for _ in range(2):
            httpx.get(f"{url}/health")
        answer = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"})
        assert answer.headers["content-type"].startswith("text/plain; version=")
        samples = scrape(answer.text)
        assert value(samples, "edgeship_agent_jobs_started_total") == 1
        assert value(samples, "edgeship_agent_jobs_failed_total") == 0
        assert value(samples, "edgeship_agent_busy") == 0 and value(samples, "edgeship_agent_jobs_queued") == 0
        assert value(samples, "edgeship_http_requests_total", route="/jobs/benchmark", code="200") == 1
        assert value(samples, "edgeship_http_request_duration_seconds_count", route="/jobs/benchmark") == 1
        assert value(samples, "edgeship_http_requests_total", route="/health", code="200") >= 2
        assert value(samples, "edgeship_http_requests_total", route="/metrics", code="401") == 1
        wait_until(lambda: notify.received().count("WATCHDOG=1") >= 2, scaled(10.0), "two watchdog pings")
    finally:
        stderr = stop(process)
    assert "STOPPING=1" in notify.received()
    lines = json_lines(stderr)  # uvicorn's own lines too: one format for the whole process
    assert any(line["logger"].startswith("uvicorn") for line in lines), lines


def test_fallback_switches_count_moves_to_the_fallback_not_answers():
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    counters = _InferenceCounters(registry)
    for slot, ok in [("active", True), ("active", False), ("fallback", True), ("fallback", True), ("active", True),
                     ("fallback", True)]:
        counters(InferenceRecord(1.5, slot, "1", None, ok))
    assert registry.get_sample_value("edgeship_fallback_switches_total") == 2
    assert registry.get_sample_value("edgeship_inferences_total", {"slot": "active", "outcome": "error"}) == 1
    assert registry.get_sample_value("edgeship_inferences_total", {"slot": "fallback", "outcome": "ok"}) == 3


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_log_format_once_per_process(log_format, monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging(logging.INFO, log_format)
    configure_logging(logging.INFO, log_format)  # a second call replaces the first: one line per record
    try:
        logging.getLogger("edgeship.device.test").info("installed v%s", 7)
        logging.getLogger("edgeship.device.test").debug("not at INFO")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("edgeship.device.test").exception("a check failed")
    finally:
        configure_logging(logging.WARNING)
    text = stream.getvalue()
    if log_format == "json":
        first, second = (json.loads(line) for line in text.splitlines())  # a traceback stays inside its line
        assert first["level"] == "INFO" and first["logger"] == "edgeship.device.test"
        assert first["message"] == "installed v7" and first["time"].endswith("Z")
        assert second["level"] == "ERROR" and "RuntimeError: boom" in second["exception"]
    else:
        lines = text.splitlines()
        assert lines[0].endswith("INFO edgeship.device.test: installed v7") and lines[0][:4].isdigit()
        assert "not at INFO" not in text and text.count("installed v7") == 1
