"""`edgeship-device serve` as a real process on a Unix socket: it installs (its own updater thread), answers,
hands over to a newly installed model between requests without dropping one, runs a shadow off the answer
path, and reports all of it as telemetry over a real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import httpx
import numpy as np

from edgeship.device.state import provision
from edgeship.fleet.broker import LocalBroker
from edgeship.fleet.collector import Collector
from edgeship.fleet.rollout import offer_shadow
from edgeship.fleet.store import FleetStore

from edgeship.device.runtimes import open_session

from ota_world import ROOT_DIR, TARGET, OtaWorld
from timing import wait_until



def test_serve_hands_over_between_requests_and_shadows_off_the_answer_path(tmp_path):
    from edgeship.device.telemetry_mqtt import MqttSettings

    fleet = f"t{uuid.uuid4().hex[:8]}"
    world = OtaWorld(tmp_path)
    state_dir = tmp_path / "device"
    socket_path = str(tmp_path / "serve.sock")
    with LocalBroker() as broker:
        store = FleetStore(f"sqlite:///{tmp_path}/fleet.db")
        collector = Collector(MqttSettings(port=broker.port, fleet=fleet), store, client_id=f"c-{fleet}").start()
        process, health = None, {"answered": 0}
        try:
            world.publish("1")
            provision(state_dir, "dev-serve", "stable", TARGET, world.url, world.root)
            process = subprocess.Popen(
                [sys.executable, "-m", "edgeship.device.cli", "serve", "--state-dir", str(state_dir), "--uds",
                 socket_path, "--broker", f"127.0.0.1:{broker.port}", "--fleet", fleet, "--device-class", "pi4",
                 "--window-s", "0.5", "--update-every", "0.3", "--confirm-after", "5", "--shadow-sample-rate", "1.0"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT_DIR,
                env={**os.environ, "PYTHONPATH": str(ROOT_DIR)})
            wait_until(lambda: os.path.exists(socket_path), what="the socket")
            client = httpx.Client(transport=httpx.HTTPTransport(uds=socket_path), base_url="http://device",
                                  timeout=10)
            wait_until(lambda: client.get("/health").json()["versions"]["active"] == "1", what="v1 installed")
            batch = np.random.default_rng(3).standard_normal((2, 1, 8, 8)).astype(np.float32)

            answers = []

            def ask():
                answer = client.post("/predict", json={"inputs": batch.tolist()})
                assert answer.status_code == 200, answer.text  # no request is dropped during a hand-over
                answers.append(answer.json())
                return answer.json()

            for _ in range(10):
                ask()
            # a window closes while v1 is active (a record names the version active when its window closed)
            wait_until(lambda: any(r.versions.active == "1" for r in store.records()), what="a v1 telemetry window")
            world.publish("2")  # everyone's: the updater thread installs it while requests keep coming
            wait_until(lambda: ask()["version"] == "2", what="hand-over to v2")
            expected = open_session("onnxruntime", world.artifacts[("2", TARGET)].path, threads=1).run(batch)
            np.testing.assert_allclose(np.asarray(answers[-1]["outputs"]), expected, rtol=1e-5)
            versions = [a["version"] for a in answers]
            assert versions == sorted(versions) and set(versions) == {"1", "2"}  # one switch, between requests

            world.publish("3", rollout_fraction=0.0)
            offer_shadow(world.repository, "stable", TARGET, shadow_fraction=1.0, sample_rate=1.0)
            wait_until(lambda: client.get("/health").json()["versions"]["shadow"] == "3", what="shadow installed")
            for _ in range(30):
                assert ask()["version"] == "2"  # the shadow never answers
            wait_until(lambda: any(r.shadow and r.shadow.version == "3" and r.shadow.samples
                                   for r in store.records()), what="shadow telemetry")
            health = client.get("/health").json()
            client.close()
        finally:
            if process is not None:
                process.terminate()
                stderr = process.communicate(timeout=30)[1]
                # the last windows are flushed on exit: wait until every answer is accounted for
                wait_until(lambda: sum(r.inferences for r in store.records()) >= health["answered"], 20,
                           f"the last records {health} {[(r.sequence, r.inferences) for r in store.records()]} "
                           f"{stderr[-3000:]} {sorted(p.name for p in (state_dir / 'telemetry' / 'spool').glob('*'))}")
            collector.stop()
    world.close()
    records = store.records()
    kinds = [e.kind for r in records for e in r.events]
    assert {"installed", "confirmed", "shadow_installed"} <= set(kinds), (kinds, stderr[-2000:])
    shadowed = [r.shadow for r in records if r.shadow and r.shadow.version == "3"]
    assert sum(s.samples for s in shadowed) > 0 and all(s.latency.total > 0 for s in shadowed if s.samples)
    assert health["answered"] >= 40 and health["slot"] == "active"
    assert {r.device_class for r in records} == {"pi4"} and {r.versions.active for r in records} >= {"1", "2"}
    assert sum(r.inferences for r in records) >= 40, ([(r.sequence, r.inferences) for r in records], stderr[-3000:])
    assert sum(r.latency.total for r in records) >= 40
    store.close()
