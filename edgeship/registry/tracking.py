"""MLflow tracking for one release: one run that every stage logs into.

Prefect runs tasks in worker threads and MLflow's fluent API keeps its active
run per thread, so stages log through `ReleaseRun` (an `MlflowClient` bound to a
run id) instead of `mlflow.log_*`; the run id is a small string that travels
between tasks.

    >>> run = ReleaseRun.start(params.registry, workdir, run_name="release")
    >>> run.log_metrics({"train/val_accuracy": 0.97}, step=3)
    >>> run.finish()
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeship.config import RegistryParams


def resolve_tracking_uri(uri: str, workdir: Path) -> str:
    """Make a relative SQLite or file store path absolute against the project directory."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(workdir / uri.removeprefix('sqlite:///')).resolve()}"
    if "://" not in uri:
        return (workdir / uri).resolve().as_uri()
    return uri


def resolve_artifact_location(location: str | None, workdir: Path, tracking_uri: str = "") -> str | None:
    """A new experiment's artifact root: a local path against the project, a URI as given.

    Against a tracking server, a local path would put artifacts on this machine's disk, where nobody
    else can read them, so the server's own artifact store (e.g. proxied S3) is used instead.
    """
    if location is None or "://" in location:
        return location
    if tracking_uri.startswith(("http://", "https://")):
        return None
    return (workdir / location).resolve().as_uri()


def tracking_uri_for(settings: RegistryParams, workdir: Path) -> str:
    """EDGESHIP_TRACKING_URI when set, else registry.tracking_uri from params.yaml.

    Not MLFLOW_TRACKING_URI: `mlflow.set_tracking_uri` writes that variable into the process
    environment, so a second release in the same process (or a child) would follow the first one's store.
    """
    return os.environ.get("EDGESHIP_TRACKING_URI") or resolve_tracking_uri(settings.tracking_uri, workdir)


def use_tracking(settings: RegistryParams, workdir: Path) -> str:
    """Point this process's MLflow at the configured tracking store; return the resolved URI."""
    import mlflow

    uri = tracking_uri_for(settings, workdir)
    mlflow.set_tracking_uri(uri)  # the registry follows the tracking URI unless MLFLOW_REGISTRY_URI says otherwise
    return uri


def git_commit(workdir: Path) -> str | None:
    """The commit of the project directory, if it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workdir, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def flatten(mapping: dict, prefix: str = "") -> dict[str, str]:
    """{'train': {'lr': 0.1}} -> {'train.lr': '0.1'} (MLflow params are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)
    return flat


class ReleaseRun:
    """An MLflow run bound by id, safe to use from any thread; pickles as its id and tracking URI."""

    def __init__(self, run_id: str, tracking_uri: str):
        from mlflow import MlflowClient

        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def __reduce__(self):
        # A task in another process (a Dask worker) gets the run by id and opens its own client there.
        return ReleaseRun, (self.run_id, self.tracking_uri)

    @classmethod
    def start(cls, settings: RegistryParams, workdir: Path, run_name: str, tags: dict[str, str] | None = None
              ) -> "ReleaseRun":
        """Create the experiment if needed and start a run in it."""
        from mlflow import MlflowClient

        uri = use_tracking(settings, workdir)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment = client.get_experiment_by_name(settings.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            settings.experiment, artifact_location=resolve_artifact_location(settings.artifact_location, workdir, uri))
        all_tags = {"mlflow.runName": run_name, **(tags or {})}
        commit = git_commit(workdir)
        if commit:
            all_tags["mlflow.source.git.commit"] = commit
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        return cls(run.info.run_id, uri)

    def nested(self, name: str, tags: dict[str, str] | None = None) -> "ReleaseRun":
        """A child run of this one (tag mlflow.parentRunId), in the same experiment: one stage's own metrics."""
        parent = self.client.get_run(self.run_id)
        child = self.client.create_run(parent.info.experiment_id, run_name=name,
                                       tags={"mlflow.parentRunId": self.run_id, "mlflow.runName": name,
                                             **(tags or {})})
        return ReleaseRun(child.info.run_id, self.tracking_uri)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float | None], step: int | None = None) -> None:
        """Log numeric metrics; None values (not measured) are skipped, never logged as zero."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_metric_key(k), float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        """A file's content (e.g. a rendered PNG) as the run artifact `artifact_file` ("reports/plot.png")."""
        directory, _, name = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="edgeship-") as scratch:
            path = Path(scratch) / name
            path.write_bytes(data)
            self.client.log_artifact(self.run_id, str(path), directory or None)

    def log_json(self, data: Any, artifact_file: str) -> None:
        self.client.log_text(self.run_id, json.dumps(data, indent=2, default=str), artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def download(self, artifact_path: str, dst: Path | None = None) -> Path:
        """Download a run artifact (file or directory) and return its local path."""
        import mlflow.artifacts

        dst = dst or Path(tempfile.mkdtemp(prefix="edgeship-"))
        return Path(mlflow.artifacts.download_artifacts(run_id=self.run_id, artifact_path=artifact_path,
                                                        dst_path=str(dst), tracking_uri=self.tracking_uri))


def _metric_key(key: str) -> str:
    # MLflow allows alphanumerics, _ - . space : / in metric names.
    return "".join(ch if ch.isalnum() or ch in "_-. :/" else "_" for ch in key)
