"""Field truth end to end: a real `edgeship-device serve` process, a real broker and collector, moto's S3 server.

The channel asks for field samples (signed into its entry); the application asks, then reports true labels
late and out of order over `POST /feedback` (an unknown id and a second label are refused, the service keeps
answering); the bucket goes away meanwhile and comes back. The fleet store's rollups hold the labelled accuracy
of the version that answered, and the bucket holds the kept samples, within the device's budget."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid

import httpx
import numpy as np

from edgeship.device.state import provision
from edgeship.fleet.broker import LocalBroker
from edgeship.fleet.collector import Collector
from edgeship.fleet.field_accuracy import field_accuracy
from edgeship.fleet.store import FleetStore
from edgeship.records.field import FieldSampling

from doc_blocks import doc_block, run_shell
from moto_s3 import MotoS3
from ota_world import ROOT_DIR, TARGET, OtaWorld
from timing import scaled, wait_until

BUDGET = 40_000


def test_late_out_of_order_feedback_and_samples_through_a_bucket_outage(tmp_path, monkeypatch):
    from edgeship.device.telemetry_mqtt import MqttSettings

    s3 = MotoS3(monkeypatch).start()
    fleet = f"t{uuid.uuid4().hex[:8]}"
    world = OtaWorld(tmp_path)
    state_dir = tmp_path / "device"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sampling = FieldSampling(upload_url=s3.url, endpoint_url=s3.endpoint, budget_bytes_per_day=BUDGET,
                             sample_rate=0.3, upload_every_s=0.3)
    process = None
    with LocalBroker() as broker:
        store = FleetStore(f"sqlite:///{tmp_path}/fleet.db")
        collector = Collector(MqttSettings(port=broker.port, fleet=fleet), store, client_id=f"c-{fleet}").start()
        try:
            world.publish("1", field_sampling=sampling.model_dump(mode="json"))
            provision(state_dir, "dev-truth", "stable", TARGET, world.url, world.root)
            process = subprocess.Popen(
                [sys.executable, "-m", "edgeship.device.cli", "serve", "--state-dir", str(state_dir), "--port",
                 str(port), "--broker", f"127.0.0.1:{broker.port}", "--fleet", fleet, "--device-class", "pi4",
                 "--window-s", "0.5", "--update-every", "0.3", "--confirm-after", "5"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT_DIR,
                env={**os.environ, "PYTHONPATH": str(ROOT_DIR)})
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
            wait_until(lambda: _active(client) == "1", what="v1 installed")
            wait_until(lambda: (state_dir / "field_sampling.json").is_file(), what="the channel's sampling settings")
            told = run_shell(doc_block("docs/fleet-loop.md", "fleet-loop-feedback", replace={   # as the docs type it
                "8766": str(port), "[[[[0.5] * 16] * 16]]": "[[[[0.5] * 8] * 8]]"}), cwd=tmp_path, env=dict(os.environ))
            told = json.loads(told.stdout)
            assert told["version"] == "1" and len(told["correct"]) == 1, told

            rng = np.random.default_rng(5)
            asked = []
            for _ in range(60):
                answer = client.post("/predict", json={"inputs": rng.standard_normal((1, 1, 8, 8)).tolist()}).json()
                asked.append((answer["request_id"], int(np.argmax(answer["outputs"][0]))))
            assert len({r for r, _ in asked}) == 60
            wait_until(lambda: client.get("/health").json()["field_samples"]["uploaded"] > 0, what="first uploads")

            s3.stop()                                         # the bucket goes away; labels arrive meanwhile
            truth = {r: p if i < 30 else (p + 1) % 10 for i, (r, p) in enumerate(asked[:40])}   # 30 right, 10 wrong
            for request_id in reversed(list(truth)):          # late (after every answer) and out of order
                said = client.post("/feedback", json={"request_id": request_id, "label": truth[request_id]})
                assert said.status_code == 200 and said.json()["version"] == "1", said.text
            again = client.post("/feedback", json={"request_id": asked[0][0], "label": 1})
            unknown = client.post("/feedback", json={"request_id": "no-such-request", "label": 1})
            garbled = client.post("/feedback", content=b"label=3")
            assert (again.status_code, unknown.status_code, garbled.status_code) == (409, 404, 400)
            assert "never given" in unknown.json()["detail"] and "request_id" in garbled.json()["detail"]
            for _ in range(60):                              # answers go on through the outage
                assert client.post("/predict", json={"inputs": rng.standard_normal((1, 1, 8, 8)).tolist()}
                                   ).status_code == 200
            wait_until(lambda: client.get("/health").json()["field_samples"]["upload_failures"] > 0,
                       what="an upload failing while the bucket is away")
            s3.start()
            wait_until(lambda: _settled(client.get("/health").json()["field_samples"], state_dir), scaled(30),
                       "the spool drained into the bucket again")
            wait_until(lambda: _labelled(store) == 41, what="the labels in the rollups")
            health = client.get("/health").json()
            client.close()
        finally:
            if process is not None:
                process.terminate()
                process.communicate(timeout=30)
            collector.stop()
            s3_keys = s3.keys() if s3.server else []
            s3.stop()
    world.close()
    accuracy = field_accuracy(store.snapshot("stable", TARGET, versions=["1"]).version("1").sums)
    right = 30 + told["correct"][0]                            # and the docs' example
    assert (accuracy.labelled, accuracy.correct) == (41, right)
    per_class = store.snapshot("stable", TARGET, versions=["1"]).version("1").classes["pi4"]
    assert field_accuracy(per_class.sums).accuracy == right / 41
    samples = health["field_samples"]
    assert samples["kept"] > 0 and samples["uploaded_bytes"] <= BUDGET
    assert health["feedback"]["refused"] == 2                  # the second label and the unknown id
    assert s3_keys and all(k.startswith("field/stable/onnx-int8/dev-truth/") for k in s3_keys)
    store.close()


def _active(client: httpx.Client) -> str | None:
    try:
        return client.get("/health").json()["versions"]["active"]
    except httpx.HTTPError:
        return None


def _settled(samples: dict, state_dir) -> bool:
    return samples["uploaded"] > 0 and not list((state_dir / "field-samples").glob("*.npz")) \
        and not list((state_dir / "field-samples").glob("*.label.json"))


def _labelled(store: FleetStore) -> int:
    stats = store.snapshot("stable", TARGET, versions=["1"]).version("1")
    return field_accuracy(stats.sums).labelled if stats is not None else 0
