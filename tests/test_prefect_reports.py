"""What people look at in Prefect (real Prefect, ephemeral API; real MLflow, SQLite): figures as image artifacts
beside the tables (the same PNG as in MLflow), long stages as progress artifacts when no terminal watches, and
the retry rule of the tasks that talk to services (a service's failure is retried, an edgeship error is not).
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from prefect import flow, task

from edgeship.config import RegistryParams
from edgeship.errors import RegistryError
from edgeship.flows.figures import artifact_key, figure_url, show_figure
from edgeship.flows.retries import SERVICE_CALL
from edgeship.progress import PrefectProgress, listening, progress, reporting
from edgeship.registry.tracking import ReleaseRun


def _artifacts(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def _figure():
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2, 2), dpi=50)
    figure.add_subplot().plot([0, 1], [1, 0])
    return figure


@flow(name="reports-under-test")
def draw_and_train(tracking_uri: str, run_id: str) -> bool:
    show_figure(_figure(), ReleaseRun(run_id, tracking_uri), "reports/line.png", key="line-under-test",
                description="a line")
    was_listening = listening()
    with reporting(PrefectProgress(prefix="test", interval_s=0)):
        progress().start("train", total=4)
        for epoch in range(3):
            progress().advance("train", note=f"epoch {epoch} [green]ok[/]")
        progress().start("compile onnx-int8", total=1)  # one step: its task state says enough
        progress().finish("compile onnx-int8")
    return was_listening


def test_a_figure_is_in_mlflow_and_in_prefect_and_long_stages_show_progress(tmp_path):
    run = ReleaseRun.start(RegistryParams(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), tmp_path, "reports")
    assert draw_and_train(run.tracking_uri, run.run_id) is False  # nobody listened: the flow would install Prefect's

    logged = Path(run.download("reports/line.png", tmp_path / "dl")).read_bytes()
    [image] = _artifacts("line-under-test")
    assert image.type == "image" and image.data.startswith("data:image/png;base64,")
    assert base64.b64decode(image.data.split(",", 1)[1]) == logged  # the PNG MLflow keeps, shown inline

    [train] = _artifacts("test-train")
    assert train.type == "progress" and train.data == pytest.approx(75.0)  # 3 of 4 epochs
    assert "3 of 4" in train.description and "epoch 2 ok" in train.description
    assert _artifacts("test-compile-onnx-int8") == []


def test_against_an_mlflow_server_the_image_is_the_servers_copy():
    url = figure_url("http://mlflow.lab:5000/", "abc123", "benchmarks/onnx-int8/pi 4/latency_histogram.png", b"")
    assert url == ("http://mlflow.lab:5000/get-artifact?path=benchmarks%2Fonnx-int8%2Fpi+4%2Flatency_histogram.png"
                   "&run_uuid=abc123")
    assert artifact_key("latency_histogram", "onnx-int8", "Pi 4 @ lab") == "latency-histogram-onnx-int8-pi-4-lab"


ATTEMPTS: list[str] = []


@task(name="service-call-under-test", **SERVICE_CALL)
def call_service(failures: int, error: str) -> int:
    ATTEMPTS.append(error)
    if len(ATTEMPTS) <= failures:
        raise {"network": ConnectionError("connection refused"), "registry": RegistryError("no alias 'production'"),
               "bug": TypeError("unsupported operand")}[error]
    return len(ATTEMPTS)


@flow(name="retries-under-test")
def call_thrice() -> list[str]:
    quick = call_service.with_options(retry_delay_seconds=0)
    outcomes = []
    for error in ("network", "registry", "bug"):
        ATTEMPTS.clear()
        state = quick(2, error, return_state=True)
        outcomes.append(f"{error}: {state.type.value} after {len(ATTEMPTS)}")
    return outcomes


def test_a_service_blip_is_retried_and_bad_input_or_a_bug_is_not():
    assert call_thrice() == ["network: COMPLETED after 3", "registry: FAILED after 1", "bug: FAILED after 1"]
