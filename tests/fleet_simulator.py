"""A fleet on loopback, after python-tuf's RepositorySimulator: one object plays the publisher, the broker, the
collector, the rollout controller and many devices, each a real `edgeship-device serve` process (its own
updater, runtime, shadow and telemetry over real MQTT) fed with real test images (scikit-learn's digits).

    >>> with FleetSimulator(tmp_path, devices=10, window_s=1.0) as fleet:
    ...     good = fleet.roll_out("2", fleet.models["good-2"], shadow_fraction=0.5)
    ...     bad = fleet.roll_out("3", fleet.models["bad"], restart_broker_after_s=1.0)
    >>> good.outcome, bad.outcome, fleet.blast_radius("3"), fleet.records_lost()

Used by benchmarks/rollout.py (40 devices) and by tests/test_fleet_loop.py (a small fleet).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeship.device.state import provision
from edgeship.device.telemetry_mqtt import MqttSettings
from edgeship.fleet.broker import LocalBroker
from edgeship.fleet.collector import Collector
from edgeship.fleet.policy import ChannelPolicy
from edgeship.fleet.rollout import control_channel, offer_shadow
from edgeship.fleet.store import FleetStore

from edgeship.ota.channel import cohort_position

from onnx_models import IR_VERSION, OPSET
from ota_world import MODEL, ROOT_DIR, TARGET, OtaWorld
from timing import scaled


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as [N, 1, 8, 8] float32 in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), y


def classifier_onnx(coef: np.ndarray, intercept: np.ndarray, slow_steps: int = 0) -> bytes:
    """Flatten -> Gemm(coef) logits; with `slow_steps`, an ONNX Loop of that many tiny MatMuls is added at
    weight ~0: the same answers, a slower model (a few microseconds per step), a small file."""
    init = [numpy_helper.from_array(coef.astype(np.float32), "w"), numpy_helper.from_array(intercept.astype(np.float32), "b")]
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "w", "b"], ["linear"], transB=1)]
    out = "linear"
    if slow_steps:
        init += [numpy_helper.from_array(np.eye(10, dtype=np.float32) * 0.5, "mix"),
                 numpy_helper.from_array(np.array(slow_steps, dtype=np.int64), "steps"),
                 numpy_helper.from_array(np.array(True), "go"),
                 numpy_helper.from_array(np.array(1e-12, dtype=np.float32), "tiny")]
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
             helper.make_node("MatMul", ["v_in", "mix"], ["m"]), helper.make_node("Tanh", ["m"], ["v_out"])],
            "slow_body",
            [helper.make_tensor_value_info("i", TensorProto.INT64, []),
             helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
             helper.make_tensor_value_info("v_in", TensorProto.FLOAT, ["N", 10])],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["N", 10])])
        nodes += [helper.make_node("Loop", ["steps", "go", "linear"], ["slow"], body=body),
                  helper.make_node("Mul", ["slow", "tiny"], ["st"]), helper.make_node("Add", ["linear", "st"], ["out"])]
        out = "out"
    nodes.append(helper.make_node("Identity", [out], ["logits"]))
    graph = helper.make_graph(nodes, "digits", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], initializer=init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fleet-simulator")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


BAD_SLOW_STEPS = 10_000  # ~20 ms per answer on this machine (2 us a step): twice the `small` class's 10 ms budget,
                         # and cheap enough that a first stage of 10 devices does not take the host's two cores


def digits_models() -> tuple[dict[str, bytes], np.ndarray, np.ndarray]:
    """Two good releases (logistic regressions on disjoint halves of the training split: they agree on ~96% of
    test images), a bad one (the second's answers inside a slow model: only its latency is wrong) and a silent
    failure (the second with its classes rotated, as fast as it: the same class mix and confidences, nearly every
    answer different), plus the test split."""
    from sklearn.linear_model import LogisticRegression

    x, y = digits()
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1200], order[1200:]
    flat = x.reshape(len(x), -1)
    one = LogisticRegression(max_iter=500).fit(flat[train[:600]], y[train[:600]])
    two = LogisticRegression(max_iter=500, C=0.5).fit(flat[train[600:]], y[train[600:]])
    silent = np.roll(two.coef_, 1, axis=0), np.roll(two.intercept_, 1)
    return ({"good-1": classifier_onnx(one.coef_, one.intercept_), "good-2": classifier_onnx(two.coef_, two.intercept_),
             "bad": classifier_onnx(two.coef_, two.intercept_, slow_steps=BAD_SLOW_STEPS),
             "silent": classifier_onnx(*silent)}, x[test], y[test])


@dataclass
class DeviceLog:
    """What the application on one device saw."""

    answers: int = 0
    failures: int = 0                 # requests that got no answer after the device first answered
    served: dict[str, int] = field(default_factory=dict)   # active version -> answers
    first_served: dict[str, datetime] = field(default_factory=dict)  # active version -> its first answer here
    latencies_ms: list[float] = field(default_factory=list)


@dataclass
class Scenario:
    version: str
    outcome: str                      # completed | aborted | timeout
    started_at: datetime
    ended_at: datetime | None
    stages: list[float]
    decisions: list[dict]

    @property
    def duration_s(self) -> float | None:
        return (self.ended_at - self.started_at).total_seconds() if self.ended_at else None


class FleetSimulator:
    """A broker, a collector, a signed repository, the controller and `devices` real device processes."""

    def __init__(self, tmp_path: Path, devices: int = 40, window_s: float = 1.0, update_s: float = 1.0,
                 rate_hz: float = 5.0, device_classes: tuple[str, ...] = ("fast", "small"),
                 policy: dict | None = None, stratify_for: str | None = "3", publish_options: dict | None = None,
                 compare_sample_rate: float = 0.5):
        self.tmp_path, self.count, self.window_s, self.update_s, self.rate_hz = tmp_path, devices, window_s, update_s, rate_hz
        self.compare_sample_rate = compare_sample_rate
        self.device_classes = device_classes
        # Classes alternate along the cohort order of release `stratify_for`, so every stage of its rollout
        # holds devices of each class (stratified, as a canary group should be), whatever the hash gives.
        names = [f"dev-{i:03d}" for i in range(devices)]
        order = sorted(names, key=lambda d: cohort_position(d, MODEL, stratify_for)) if stratify_for else names
        self.class_of = {d: device_classes[i % len(device_classes)] for i, d in enumerate(order)}
        self.policy = ChannelPolicy.model_validate(policy or {})
        self.fleet = f"sim{uuid.uuid4().hex[:6]}"
        self.models, self.images, self.labels = digits_models()
        self.logs: dict[str, DeviceLog] = {}
        self.publish_options = publish_options or {}   # e.g. field_sampling, drift_reference: every publish carries them
        self.shift = None              # images -> images: what the field does to the inputs (lighting, sensor noise)
        self.feedback_share = 0.0      # share of answers whose true label the application reports, a few answers late
        self.processes: dict[str, subprocess.Popen] = {}
        self._stop = threading.Event()
        self._feeders: list[threading.Thread] = []

    # --- the world ------------------------------------------------------------------------

    def __enter__(self) -> FleetSimulator:
        self.broker = LocalBroker().start()
        self.store = FleetStore(f"sqlite:///{self.tmp_path}/fleet.db")
        self.collector = Collector(MqttSettings(port=self.broker.port, fleet=self.fleet), self.store,
                                   client_id=f"collector-{self.fleet}").start()
        self.collector.connected.wait(10)
        self.world = OtaWorld(self.tmp_path)
        self.world.publish("1", content=self.models["good-1"], **self.publish_options)
        time.sleep(1.1)  # the broker's autosave has the collector's persistent session before any restart
        for device, device_class in sorted(self.class_of.items()):
            self._start_device(device, device_class)
        self.wait_for(lambda: all(self.health(d).get("versions", {}).get("active") == "1" for d in self.processes),
                      timeout_s=60 + 3 * self.count, what="every device on v1")
        for device in self.processes:
            thread = threading.Thread(target=self._feed, args=(device,), daemon=True)
            thread.start()
            self._feeders.append(thread)
        # v1 confirmed everywhere: what a release installs over is then its devices' rollback model, compared with it
        self.wait_for(lambda: all(self.health(d).get("versions", {}).get("on_probation") is False
                                  for d in self.processes), timeout_s=30 + self.count, what="v1 confirmed")
        return self

    def stop_feeding(self) -> None:
        """The applications stop sending requests (the devices keep running)."""
        self._stop.set()
        for thread in self._feeders:
            thread.join()

    def stop_devices(self) -> None:
        """Stop every device process (SIGTERM: each flushes its last window), killing any that hangs."""
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __exit__(self, *exc_info) -> None:
        self.stop_feeding()
        self.stop_devices()
        self.wait_for(lambda: self.records_lost() == 0, timeout_s=20, what="the last records", fail=False)
        self.final_records_lost = self.records_lost()
        self.final_records = self.store.count_records()
        self.final_unsent = self.unsent()
        self.final_missing = self.missing()
        c = self.collector
        self.collector_state = {"connected": c.own.connected.is_set(), "generation": c.own.generation,
                                "received": c.own.received, "settled": c.own.settled, "stored": c.writer.stored,
                                "duplicates": c.writer.duplicates, "batches": c.writer.batches,
                                "failures": c.writer.failures, "adopted": c.adopted, "members": c.members,
                                "taken_over": c.taken_over.is_set()}
        self.collector.stop()
        self.broker.__exit__(None, None, None)
        self.world.close()
        self.store.close()

    def _socket(self, device: str) -> str:
        return str(self.tmp_path / f"{device}.sock")

    def _start_device(self, device: str, device_class: str) -> None:
        state_dir = self.tmp_path / device
        provision(state_dir, device, "stable", TARGET, self.world.url, self.world.root)
        command = [sys.executable, "-m", "edgeship.device.cli", "serve", "--state-dir", str(state_dir),
                   "--uds", self._socket(device), "--broker", f"127.0.0.1:{self.broker.port}", "--fleet", self.fleet,
                   "--device-class", device_class, "--window-s", str(self.window_s),
                   "--update-every", str(self.update_s), "--confirm-after", "5",
                   "--compare-sample-rate", str(self.compare_sample_rate)]
        self.processes[device] = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                  cwd=ROOT_DIR, env={**os.environ, "PYTHONPATH": str(ROOT_DIR),
                                                                     "OMP_NUM_THREADS": "1"})
        self.logs[device] = DeviceLog()

    def health(self, device: str) -> dict:
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=self._socket(device)), timeout=5) as client:
                return client.get("http://device/health").json()
        except (httpx.HTTPError, OSError, ValueError):
            return {}

    def _feed(self, device: str) -> None:
        """The application: real test images at `rate_hz`, one request at a time."""
        rng = np.random.default_rng(abs(hash(device)) % 2**32)
        log = self.logs[device]
        labels: list[tuple[str, int]] = []   # (request id, true label) the application reports later
        with httpx.Client(transport=httpx.HTTPTransport(uds=self._socket(device)), timeout=10) as client:
            while not self._stop.wait(rng.uniform(0.5, 1.5) / self.rate_hz):
                index = rng.integers(len(self.images))
                image = self.images[index][None] if self.shift is None else self.shift(self.images[index][None])
                buffer = __import__("io").BytesIO()
                np.save(buffer, image)
                try:
                    answer = client.post("http://device/predict", content=buffer.getvalue(),
                                         headers={"content-type": "application/x-npy", "accept": "application/x-npy"})
                    answer.raise_for_status()
                except (httpx.HTTPError, OSError):
                    log.failures += 1
                    continue
                log.answers += 1
                version = answer.headers["x-version"] if answer.headers["x-slot"] == "active" else "fallback"
                log.served[version] = log.served.get(version, 0) + 1
                log.first_served.setdefault(version, datetime.now(timezone.utc))
                log.latencies_ms.append(float(answer.headers["x-latency-ms"]))
                if rng.random() < self.feedback_share:
                    labels.append((answer.headers["x-request-id"], int(self.labels[index])))
                if len(labels) >= 3:                 # late and out of order: the newest first
                    for request_id, label in reversed(labels):
                        try:
                            client.post("http://device/feedback", json={"request_id": request_id, "label": label})
                        except (httpx.HTTPError, OSError):
                            log.failures += 1
                    labels.clear()

    # --- rollouts -------------------------------------------------------------------------

    def roll_out(self, version: str, content: bytes, shadow_fraction: float | None = None,
                 restart_broker_after_s: float | None = None, timeout_s: float = 300) -> Scenario:
        """Publish `version` (as a shadow first when `shadow_fraction`), then run the controller until it completes or aborts."""
        started = datetime.now(timezone.utc)
        if shadow_fraction:
            self.world.publish(version, content=content, rollout_fraction=0.0, **self.publish_options)
            offer_shadow(self.world.repository, "stable", TARGET, shadow_fraction=shadow_fraction, sample_rate=0.5)
        else:
            self.world.publish(version, content=content, rollout_fraction=self.policy.first_stage,
                               **self.publish_options)
        restart_at = time.monotonic() + restart_broker_after_s if restart_broker_after_s is not None else None
        deadline = time.monotonic() + timeout_s
        outcome, ended, stages = "timeout", None, []
        while time.monotonic() < deadline:
            if restart_at is not None and time.monotonic() >= restart_at:
                self.broker.restart(down_s=2.0)
                restart_at = None
            for result in control_channel(self.world.repository, self.store, "stable", self.policy):
                decision = result.decision
                if decision.version != version:
                    continue
                if decision.action == "advance":
                    stages.append(decision.fraction_after)
                if decision.action == "abort" or (decision.action == "advance" and decision.fraction_after >= 1.0):
                    outcome = "aborted" if decision.action == "abort" else "completed"
                    ended = decision.at
            if ended is not None:
                break
            time.sleep(self.window_s / 2)
        decisions = [d for d in self.store.decisions("stable", TARGET) if d["version"] == version]
        return Scenario(version, outcome, started, ended, stages, decisions)

    def wait_for(self, condition, timeout_s: float, what: str, fail: bool = True) -> bool:
        timeout_s = scaled(timeout_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.2)
        if fail:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        return False

    def wait_all_on(self, version: str, timeout_s: float = 60) -> bool:
        """Every device's application is answered by `version` again (after an abort: the base)."""
        marks = {d: dict(log.served) for d, log in self.logs.items()}

        def answered_since() -> bool:
            return all(log.served.get(version, 0) > marks[d].get(version, 0) and
                       self.health(d).get("versions", {}).get("active") == version for d, log in self.logs.items())

        return self.wait_for(answered_since, timeout_s, f"every device on v{version}", fail=False)

    # --- measurements ---------------------------------------------------------------------

    def blast_radius(self, version: str) -> float:
        """Share of devices whose application was ever answered by `version` as the active model."""
        return sum(1 for log in self.logs.values() if log.served.get(version)) / len(self.logs)

    def nth_first_answer(self, version: str, n: int) -> datetime | None:
        """When the n-th device's application first got an answer from `version` (None: fewer did)."""
        firsts = sorted(log.first_served[version] for log in self.logs.values() if version in log.first_served)
        return firsts[n - 1] if len(firsts) >= n else None

    def devices_without_working_model(self) -> int:
        return sum(1 for log in self.logs.values() if log.failures)

    def records_lost(self) -> int:
        """Records the devices made (their window sequence) that the collector never stored."""
        stored: dict[str, int] = {}
        for record_id in self.store.record_ids():
            device = record_id.rpartition("/")[0]
            stored[device] = stored.get(device, 0) + 1
        lost = 0
        for device in self.processes:
            progress = self.tmp_path / device / "telemetry" / "aggregator.json"
            made = json.loads(progress.read_text())["sequence"] if progress.is_file() else 0
            lost += max(0, made - stored.get(device, 0) - self.unsent(device))
        return lost

    def missing(self) -> dict[str, list[int]]:
        """Per device, the window sequences made but neither stored nor still spooled."""
        ids = self.store.record_ids()
        out = {}
        for device in self.processes:
            progress = self.tmp_path / device / "telemetry" / "aggregator.json"
            made = json.loads(progress.read_text())["sequence"] if progress.is_file() else 0
            spooled = {json.loads(p.read_bytes())["sequence"]
                       for p in (self.tmp_path / device / "telemetry" / "spool").glob("*.json")}
            gone = sorted(set(range(1, made + 1)) - {int(i.rpartition("/")[2]) for i in ids
                                                      if i.startswith(device + "/")} - spooled)
            if gone:
                out[device] = gone
        return out

    def unsent(self, device: str | None = None) -> int:
        """Records still in a device's spool (not lost: sent when it next runs)."""
        devices = [device] if device else list(self.processes)
        return sum(len(list((self.tmp_path / d / "telemetry" / "spool").glob("*.json"))) for d in devices)
