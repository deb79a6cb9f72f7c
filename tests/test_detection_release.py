"""A detection release end to end on real parts: the shapes set (COCO) -> DVC prepare -> train a YOLO-style detector
-> onnx-fp32 (NMS in the graph) and tflite-fp16 (NMS in numpy on the device) -> host check -> benchmark and evaluate
on a loopback device agent (it returns detections; the pipeline computes mAP) -> gate on mAP -> MLflow -> publish ->
a device installs it (golden vectors compared IoU-matched) and its runtime answers detections, with telemetry.

Small on purpose (160 images of 64 px, 4 epochs): what is asserted is the path and that every number is measured
and consistent, not the detector's quality (benchmarks/ measures that at a realistic size).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from edgeship.records import ReleaseSummary

from doc_blocks import doc_block, link_venv, run_shell

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """docs/detection.md's block (`edgeship data shapes`, `edgeship run --summary`) in a fresh project made from
    examples/detection."""
    project = tmp_path_factory.mktemp("detection-project")
    params = yaml.safe_load((REPO / "examples" / "detection" / "params.yaml").read_text())
    params["data"]["input_size"] = 64
    params["model"]["kwargs"] = {"width_mult": 0.25, "neck_channels": 16}
    params["train"].update(epochs=4, batch_size=16)
    params["benchmark"].update(warmup=5, iterations=30, warmup_until_stable=False)
    for gate in params["gate"].values():
        gate.update(max_map_drop=2.0, p99_latency_ms=2000)  # a loaded 2-core CI machine; verdicts are checked below
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=project, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=project, check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    script = doc_block("docs/detection.md", "detection-release",
                       replace={"edgeship data shapes": "edgeship data shapes --count 160 --size 64"})
    link_venv(project)
    run_shell(script, cwd=project, env=env, timeout_s=1500)  # the gates are loose: exit 0 (3 would fail it)
    summary = ReleaseSummary.model_validate_json((project / "release.json").read_text())
    return project, summary


def _client(project: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_a_detection_release_is_registered_with_map_metrics_and_map_gates(released):
    project, summary = released
    assert summary.task == "detection" and 0 <= summary.fp32_test_accuracy <= 1 and "map50" in summary.fp32_metrics
    client = _client(project)
    run = client.get_run(summary.run_id)
    assert {"fp32/test_map", "fp32/test_map50", "fp32/val_map"} <= set(run.data.metrics)
    assert run.data.tags["edgeship.task"] == "detection"
    assert len(run.data.tags["edgeship.data_annotations_sha256"]) == 64  # the annotations, hashed into the lineage
    assert [m.step for m in client.get_metric_history(summary.run_id, "train/val_map")] == [1, 2, 3, 4]
    version = client.get_model_version(summary.model_name, summary.model_version)
    for target in summary.targets:
        assert target.artifact is not None and target.artifact.postprocess is not None, target.error
        host = target.host_check
        assert host.error is None and host.accuracy is not None and {"map50", "matched_fraction"} <= set(host.metrics)
        assert host.metrics["matched_fraction"] >= 0.9  # a float target agrees with fp32 torch, IoU-matched
        bench = target.benchmarks[0]
        assert bench.status == "ok" and bench.accuracy is not None and "map50" in bench.metrics  # mAP of the
        assert bench.accuracy_samples == summary.targets[0].benchmarks[0].accuracy_samples       # device's answers
        check = next(c for c in target.gate.checks if c.name == "map_drop")
        assert check.measured == pytest.approx((summary.fp32_test_accuracy - bench.accuracy) * 100, abs=1e-3)
        assert check.passed == (check.measured <= check.limit)
        assert not any(c.name == "accuracy_drop" for c in target.gate.checks)
        assert version.tags[f"edgeship.gate.{target.target}"] == ("pass" if target.gate.passed else "fail")
    formats = {t.target: t.artifact.postprocess.format for t in summary.targets}
    assert formats == {"onnx-fp32": "nms_flat", "tflite-fp16": "decoded"}


def test_the_detection_release_is_published_installed_and_answers_detections(released, tmp_path, static_server):
    from fastapi.testclient import TestClient

    from edgeship.device.serve import FieldRuntime
    from edgeship.device.serve_http import create_app
    from edgeship.device.state import provision
    from edgeship.device.updater import DeviceUpdater, UpdaterConfig
    from edgeship.flows.publish import publish

    project, summary = released
    descriptor = publish(version=summary.model_version, workdir=str(project),
                         allow_failed_gate=None if summary.passed else "e2e: tiny detector on a loaded machine")
    entry = descriptor.targets["tflite-fp16"]
    assert entry.base.postprocess.format == "decoded" and entry.base.golden.kind == "detections"
    assert entry.drift_reference["task"] == "detection" and entry.drift_reference["per_frame_histogram"]

    repo = project / "ota-repo"
    state = tmp_path / "device"
    provision(state, "cam-0001", "stable", "tflite-fp16", static_server(repo), repo / "metadata" / "1.root.json")
    config = UpdaterConfig(repository_url=static_server(repo), trusted_root=repo / "metadata" / "1.root.json",
                           state_dir=state, channel="stable", target="tflite-fp16", device_id="cam-0001")
    report = DeviceUpdater(config).update()  # smoke test: the golden detections, IoU-matched on LiteRT here
    assert report.status == "updated", report

    with np.load(project / "data" / "prepared" / "test.npz") as arrays:
        images = arrays["x"][:6].astype(np.float32) / 255.0
    with FieldRuntime(state, window_s=3600) as field:
        answers = [field.predict(images[i:i + 1]) for i in range(len(images))]
        record = field.aggregator.close_window()
        with TestClient(create_app(field)) as http:  # what `edgeship-device serve` answers an app in any language
            served = http.post("/predict", json={"inputs": images[:1].tolist()}).json()
    assert served["detections"] == answers[0].detections and served["version"] == summary.model_version
    assert all(a.task == "detection" and len(a.detections) == 1 for a in answers)
    found = [obj for a in answers for obj in a.detections[0]]
    for obj in found:
        assert len(obj["box"]) == 4 and 0 < obj["score"] <= 1 and 0 <= obj["class"] < 4
    assert record.sums["detection.frames"] == 6 and record.sums["detection.detections"] == len(found)
    assert sum(record.classes) == len(found) and sum(record.confidence) == len(found)
    assert record.drift is not None and record.drift.per_frame_psi is not None
