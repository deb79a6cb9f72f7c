"""Field samples: the device keeps a preferred share of its inputs within a byte budget per day, uploads them to
the bucket's field prefix through an outage (moto's S3 server over HTTP, stopped and started again), and
`edgeship data field` pulls them into a field split with the labels that came late."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import numpy as np
import pytest

from edgeship.device.feedback import AnsweredRequests
from edgeship.device.field_samples import FieldSampler, keep_field_sampling, read_field_sampling
from edgeship.device.field_upload import FieldUploader
from edgeship.records.field import FieldSampling
from edgeship.records.telemetry import DeviceIdentity
from edgeship.tasks.field_data import pull

from doc_blocks import doc_block, link_venv, run_shell
from moto_s3 import MotoS3

IDENTITY = DeviceIdentity(device_id="dev-1", channel="stable", target="onnx-int8", model_name="digits",
                          device_class="pi4")


@dataclass(frozen=True)
class Answer:                     # what FieldRuntime hands the sampler: edgeship.device.runtime.Prediction's fields
    outputs: np.ndarray
    version: str = "7"
    task: str = "classification"


def confident(cls: int) -> np.ndarray:
    out = np.zeros((1, 10), np.float32)
    out[0, cls] = 20.0
    return out


def unsure(cls: int) -> np.ndarray:
    out = np.zeros((1, 10), np.float32)
    out[0, cls] = 0.5
    return out


@pytest.fixture
def s3(monkeypatch):
    server = MotoS3(monkeypatch).start()
    yield server
    server.stop()


def sampling(url: str, endpoint: str, **overrides) -> FieldSampling:
    return FieldSampling(upload_url=url, endpoint_url=endpoint, **{
        "budget_bytes_per_day": 60_000, "sample_rate": 0.2, "upload_every_s": 0.2, **overrides})


def test_the_channel_settings_are_kept_beside_the_state_and_nothing_is_sampled_without_them(tmp_path):
    sampler = FieldSampler(tmp_path, IDENTITY)
    sampler.offer(np.zeros((1, 1, 16, 16), np.float32), Answer(unsure(1)), "r1")
    assert sampler.queue.empty() and sampler.window_fields() == {}
    keep_field_sampling(tmp_path, sampling("s3://ota/field", "http://127.0.0.1:9").model_dump())
    assert read_field_sampling(tmp_path).budget_bytes_per_day == 60_000
    keep_field_sampling(tmp_path, None)
    assert read_field_sampling(tmp_path) is None


def test_preferred_inputs_kept_budget_respected_and_upload_survives_a_bucket_outage(tmp_path, s3):
    settings = sampling(s3.url, s3.endpoint)
    sampler = FieldSampler(tmp_path, IDENTITY, settings=lambda: settings, rng=random.Random(0))
    answers = AnsweredRequests()
    answers.listeners.append(sampler.on_feedback)
    uploader = FieldUploader(sampler)
    rng = np.random.default_rng(0)
    image = lambda: rng.random((1, 1, 16, 16), dtype=np.float32)  # noqa: E731

    def answer(outputs) -> str:
        request_id = answers.remember("7", outputs)
        sampler.offer(image(), Answer(outputs), request_id)
        return request_id

    low = answer(unsure(3))                           # low confidence: kept at once
    labelled_later = answer(confident(4))             # confident; its label comes later: kept then, with it
    assert uploader.run_once() == 1                   # the low-confidence one
    answers.label(labelled_later, 4)
    answers.label(low, 2)                             # already uploaded: its label follows as .label.json
    assert uploader.run_once() == 2
    keys = s3.keys()
    assert any(k.endswith(".label.json") for k in keys)
    assert all(k.startswith("field/stable/onnx-int8/dev-1/") for k in keys)

    s3.stop()                                         # the bucket goes away; answers keep coming
    for i in range(400):
        answer(unsure(i % 10) if i % 4 == 0 else confident(i % 10))
        if i % 50 == 0:
            uploader.run_once()                       # each round fails and keeps what it has
            assert sampler.pending_bytes() <= settings.budget_bytes_per_day
    stats = sampler.totals
    assert stats["upload_failures"] >= 1 and stats["dropped"] > 0 and sampler.pending()
    assert sampler.pending_bytes() <= settings.budget_bytes_per_day
    s3.start()
    sampler.write_queued()
    waiting = len(sampler.pending())
    assert uploader.run_once() == waiting and not sampler.pending()
    assert sampler.totals["uploaded_bytes"] <= settings.budget_bytes_per_day   # one day's budget, all told
    ledger = json.loads((sampler.spool / "ledger.json").read_text())
    assert ledger["bytes"] <= settings.budget_bytes_per_day
    assert ledger["random_bytes"] <= settings.random_share * settings.budget_bytes_per_day
    window = sampler.window_fields()["field_samples"]
    assert window.kept == sampler.totals["kept"] and window.pending == 0


def test_edgeship_data_field_pulls_samples_into_a_split_with_late_labels(tmp_path, s3):
    settings = sampling(s3.url, s3.endpoint, sample_rate=1.0, budget_bytes_per_day=10_000_000, random_share=1.0)
    sampler = FieldSampler(tmp_path / "device", IDENTITY, settings=lambda: settings)
    answers = AnsweredRequests()
    answers.listeners.append(sampler.on_feedback)
    uploader = FieldUploader(sampler)
    ids = []
    for i in range(40):
        request_id = answers.remember("7", confident(i % 10))
        sampler.offer(np.full((1, 1, 16, 16), i / 40, np.float32), Answer(confident(i % 10)), request_id)
        ids.append(request_id)
    uploader.run_once()
    for i, request_id in enumerate(ids[:30]):         # 30 labels arrive after the upload; 10 never
        answers.label(request_id, (i + 1) % 10 if i < 5 else i % 10)
    uploader.run_once()
    import boto3                                      # a device key may put any name under the prefix

    boto3.client("s3", endpoint_url=s3.endpoint).put_object(Bucket=s3.bucket, Key="field/../../../evil.npz", Body=b"x")
    report = pull(s3.url, tmp_path / "field", s3.endpoint, input_shape=(1, 16, 16), classes=10,
                  test_fraction=0.3)
    assert report.skipped == {"other objects": 1} and not list(tmp_path.rglob("evil.npz"))
    assert report.downloaded == 70 and report.counts["unlabelled"] == 10
    assert report.counts["train"] + report.counts["test"] == 30 and report.counts["test"] > 0
    with np.load(tmp_path / "field" / "train.npz") as train, np.load(tmp_path / "field" / "test.npz") as test:
        x, y = np.concatenate([train["x"], test["x"]]), np.concatenate([train["y"], test["y"]])
    truth = {round(float(v) * 40): (i + 1) % 10 if i < 5 else i % 10 for i, v in enumerate(np.arange(30) / 40)}
    assert all(truth[round(float(img.flat[0]) * 40)] == label for img, label in zip(x, y))
    lineage = json.loads((tmp_path / "field" / "field.json").read_text())
    assert lineage["devices"] == 1 and lineage["versions"] == {"7": 40} and lineage["sha256"]["train"]
    again = pull(s3.url, tmp_path / "field", s3.endpoint, input_shape=(1, 16, 16), classes=10)
    assert again.downloaded == 0 and again.counts == report.counts   # incremental; a sample keeps its side

    project = tmp_path / "project"                    # `edgeship data field` as the docs type it, into a DVC repo
    project.mkdir()
    link_venv(project)
    (project / "params.yaml").write_text(f"field_data: {{dir: data/field, endpoint_url: '{s3.endpoint}'}}\n")
    run_shell(".venv/bin/dvc init --no-scm -q", cwd=project, env=dict(os.environ))
    done = run_shell(doc_block("docs/fleet-loop.md", "data-field", replace={"s3://ota-bucket/field": s3.url}),
                     cwd=project, env=dict(os.environ))
    said = " ".join(done.stderr.split())              # progress and results go to stderr (docs/cli.md)
    assert "pulled 70 new objects" in said and "dvc add data/field" in said, said
    assert (project / "data" / "field.dvc").is_file()
    assert json.loads((project / "data" / "field" / "field.json").read_text())["counts"]["unlabelled"] == 10
