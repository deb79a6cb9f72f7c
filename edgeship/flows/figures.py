"""Figures where people look: the run's MLflow artifacts, and Prefect image artifacts beside the tables.

A figure is rendered once (PNG), logged to the release's MLflow run, and shown in the Prefect UI as an
image artifact. Against an MLflow server the image is the server's own copy (its `get-artifact` route,
what MLflow's UI shows); with the embedded SQLite store no server hands the file out over HTTP, so the
PNG travels inside the artifact as a data: URL. A figure larger than MAX_INLINE_BYTES is linked instead.

    >>> show_figure(accuracy_latency_figure(summaries, fp32), run, "reports/accuracy_vs_latency.png",
    ...             key="accuracy-vs-latency", description="Accuracy vs p99 latency per target")
"""

from __future__ import annotations

import base64
import logging
import re
from urllib.parse import urlencode

from edgeship.registry.tracking import ReleaseRun

logger = logging.getLogger(__name__)
MAX_INLINE_BYTES = 1_000_000


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) from names like "onnx-int8", "pi4 @ lab"."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower())).strip("-")


def figure_url(tracking_uri: str, run_id: str, artifact_file: str, png: bytes) -> str | None:
    """Where a browser finds the figure: the MLflow server's copy, else the PNG itself as a data: URL (None when
    too large to inline)."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/get-artifact?{urlencode({'path': artifact_file, 'run_uuid': run_id})}"
    if len(png) > MAX_INLINE_BYTES:
        return None
    return "data:image/png;base64," + base64.b64encode(png).decode()


def show_png(png: bytes, tracking_uri: str, run_id: str, artifact_file: str, key: str, description: str) -> None:
    """A PNG already logged to MLflow as `artifact_file` of `run_id`, as a Prefect image artifact (or a link).

    Outside a flow or task run (a stage called as a plain function) there is no run page to show it on, so
    only the MLflow copy exists.
    """
    from prefect.artifacts import create_image_artifact, create_link_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return

    url = figure_url(tracking_uri, run_id, artifact_file, png)
    try:
        if url is not None:
            create_image_artifact(url, key=key, description=description)
        else:
            from mlflow import MlflowClient

            where = MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.artifact_uri
            create_link_artifact(f"{where}/{artifact_file}", link_text=artifact_file, key=key,
                                 description=f"{description} (too large to show inline: the file in MLflow)")
    except Exception as error:  # noqa: BLE001 - a figure missing from the UI never fails the stage that drew it
        logger.warning("could not show %s in Prefect: %s", artifact_file, error)


def show_figure(figure, run: ReleaseRun, artifact_file: str, key: str, description: str) -> None:
    """Render `figure`, log it to `run` as `artifact_file`, and show it in Prefect under `key`."""
    from edgeship.reports import png_bytes

    png = png_bytes(figure)
    run.log_bytes(png, artifact_file)
    show_png(png, run.tracking_uri, run.run_id, artifact_file, key, description)
