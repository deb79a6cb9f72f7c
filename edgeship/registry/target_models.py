"""Each compiled target as an MLflow model of the release's run: what will ship, loadable and measured.

At registration every compiled artifact becomes a logged model (MLflow 3's LoggedModel) of the
release's run: an ONNX Runtime file through `mlflow.onnx` (`mlflow.onnx.load_model` gives it back),
a LiteRT, Core ML or TensorRT file as a pyfunc model whose loader is edgeship's runtime adapter
(edgeship.registry.compiled_pyfunc). Each holds its signature, its record (artifact.json) and the
golden vectors devices check, carries its own metrics (accuracy on its runtime here and on each
device, p50/p99 per device, size) and its gate verdict as tags, and names the registered version it
belongs to; the version names each model back (`edgeship.model.<target>` = model id). So the MLflow
UI shows, per target, what will ship and how it measured, and publishing downloads exactly these
models, checked against the sha256 recorded when they were gated.

    >>> ids = log_target_models(run, "digits", "7", summaries)   # at registration
    >>> models = version_models(tracking_uri, "digits", "7")     # target -> model id
    >>> local = download_target(tracking_uri, models["onnx-int8"], sha256, dst)
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import tempfile
import time
from pathlib import Path

from edgeship.errors import RegistryError, SignatureError
from edgeship.files import sha256_of
from edgeship.records import CompiledArtifact, TargetSummary
from edgeship.registry.compiled_pyfunc import RECORD_FILE
from edgeship.registry.tracking import ReleaseRun

MODEL_TAG = "edgeship.model.{target}"  # on the registered version: the target's logged model id
GOLDEN_FILE = "golden.npz"
_FLAVORED = {"onnxruntime"}  # runtimes MLflow has a flavor for; the others are pyfunc models around the file


def target_metrics(summary: TargetSummary) -> dict[str, float]:
    """A target's own measurements, under the names the release's run logs them (`<target>/...`)."""
    target, metrics = summary.target, {}
    if summary.artifact:
        metrics[f"{target}/bytes"] = float(summary.artifact.bytes)
    check = summary.host_check
    if check is not None:  # the task's metric on its runtime here ("accuracy": top-1, or a detector's mAP)
        metrics.update({f"{target}/host_accuracy": check.accuracy, f"{target}/top1_agreement": check.top1_agreement,
                        **{f"{target}/host_{k}": v for k, v in check.metrics.items()}})
    for result in summary.benchmarks:
        if result.status == "ok" and result.latency_ms:
            prefix = f"{target}/{result.device}"
            metrics.update({f"{prefix}/p50_ms": result.latency_ms.p50, f"{prefix}/p99_ms": result.latency_ms.p99,
                            f"{prefix}/accuracy": result.accuracy,
                            **{f"{prefix}/{k}": v for k, v in result.metrics.items()}})
    return {key: float(value) for key, value in metrics.items() if value is not None}


def log_target_models(run: ReleaseRun, model_name: str, version: str, summaries: list[TargetSummary]
                      ) -> dict[str, str]:
    """Log every compiled artifact of `summaries` as a model of `run`, linked to `model_name` v`version`.

    Returns target -> logged model id (the version's `edgeship.model.<target>` tags).
    """
    return {s.target: log_target_model(run, model_name, version, s) for s in summaries if s.artifact}


def log_target_model(run: ReleaseRun, model_name: str, version: str, summary: TargetSummary) -> str:
    """One target's logged model: file, record, golden vectors, signature, metrics, gate verdict."""
    import mlflow
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric

    artifact = summary.artifact
    assert artifact is not None
    failed = [c.name for c in summary.gate.checks if not c.passed]
    tags = {"edgeship.target": artifact.target, "edgeship.runtime": artifact.runtime,
            "edgeship.precision": artifact.precision, "edgeship.sha256": artifact.sha256,
            "edgeship.gate": "pass" if summary.gate.passed else "fail",
            "edgeship.gate.required": str(summary.gate.required).lower(),
            "edgeship.gate.failed_checks": ",".join(failed) or "none",
            "edgeship.registered_model": model_name, "edgeship.model_version": str(version)}
    params = {"file": artifact.path.name, "bytes": str(artifact.bytes),
              **{f"converter.{tool}": str(v) for tool, v in artifact.converter.items()}}
    experiment_id = run.client.get_run(run.run_id).info.experiment_id
    logged = run.client.create_logged_model(experiment_id, name=artifact.target, source_run_id=run.run_id,
                                            tags=tags, params=params, model_type=f"edgeship/{artifact.runtime}")
    mlflow.set_tracking_uri(run.tracking_uri)  # Model.log resolves the store from the process's tracking URI
    with tempfile.TemporaryDirectory(prefix="edgeship-model-") as scratch:
        staged = _stage(artifact, Path(scratch) / "data")
        if artifact.runtime in _FLAVORED:
            _log_onnx(artifact, staged, logged.model_id)
        else:
            _log_pyfunc(artifact, staged, logged.model_id)
    run.client.log_outputs(run.run_id, [LoggedModelOutput(logged.model_id, step=0)])
    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, 0, model_id=logged.model_id) for key, value in target_metrics(summary).items()]
    if metrics:
        run.client.log_batch(run.run_id, metrics=metrics)
    run.client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return logged.model_id


def _stage(artifact: CompiledArtifact, directory: Path) -> Path:
    """The model's data directory: the file under its own name, its record, and golden vectors when made."""
    directory.mkdir(parents=True)
    shutil.copy2(artifact.path, directory / artifact.path.name)
    record = artifact.model_copy(update={"path": Path(artifact.path.name)})
    (directory / RECORD_FILE).write_text(record.model_dump_json(indent=2))
    golden = artifact.path.parent / GOLDEN_FILE
    if golden.is_file():
        shutil.copy2(golden, directory / GOLDEN_FILE)
    return directory


def _signature(artifact: CompiledArtifact, as_float: bool):
    """The model's input and output tensors; any batch size. A pyfunc model takes float32 (its adapter converts)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def schema(specs):
        return Schema([TensorSpec(np.dtype("float32" if as_float else spec.dtype), (-1, *spec.shape[1:]), spec.name)
                       for spec in specs])

    return ModelSignature(inputs=schema(artifact.inputs), outputs=schema(artifact.outputs))


def _requirement(distribution: str) -> str:
    try:
        return f"{distribution}=={importlib.metadata.version(distribution)}"
    except importlib.metadata.PackageNotFoundError:
        return distribution


def _log_onnx(artifact: CompiledArtifact, staged: Path, model_id: str) -> None:
    """`mlflow.onnx`; the record and golden vectors as extra files, and the original bytes too if MLflow's
    re-serialisation would change them (publishing ships the file that was gated, found by its sha256)."""
    import mlflow.onnx
    import onnx

    proto = onnx.load(str(artifact.path))
    extra = [staged / RECORD_FILE] + ([staged / GOLDEN_FILE] if (staged / GOLDEN_FILE).is_file() else [])
    if hashlib.sha256(proto.SerializeToString()).hexdigest() != artifact.sha256:
        extra.append(staged / artifact.path.name)
    mlflow.onnx.log_model(proto, name=artifact.target, model_id=model_id, signature=_signature(artifact, False),
                          save_as_external_data=False, extra_files=[str(p) for p in extra],
                          pip_requirements=[_requirement("onnxruntime"), _requirement("onnx")])


def _log_pyfunc(artifact: CompiledArtifact, staged: Path, model_id: str) -> None:
    """A pyfunc model whose loader is edgeship's runtime adapter (edgeship.registry.compiled_pyfunc)."""
    import mlflow.pyfunc

    from edgeship.device.runtimes import RUNTIMES

    distribution = RUNTIMES[artifact.runtime][0] if artifact.runtime in RUNTIMES else None
    requirements = [_requirement("edgeship")] + ([_requirement(distribution)] if distribution else [])
    mlflow.pyfunc.log_model(name=artifact.target, model_id=model_id, loader_module="edgeship.registry.compiled_pyfunc",
                            data_path=str(staged), signature=_signature(artifact, True),
                            pip_requirements=requirements)


def version_models(tags: dict[str, str]) -> dict[str, str]:
    """target -> logged model id, from a registered version's tags (empty for a version registered before
    targets were logged as models)."""
    prefix = MODEL_TAG.removesuffix("{target}")
    return {key.removeprefix(prefix): value for key, value in tags.items() if key.startswith(prefix)}


def download_target(tracking_uri: str, model_id: str, sha256: str, dst: Path) -> tuple[CompiledArtifact, Path | None]:
    """Download a target's logged model and return its record (path: the downloaded file whose sha256 is the
    one recorded at registration) and its golden vectors, if it has them.

    Raises:
        RegistryError: The model cannot be downloaded or holds no record.
        SignatureError: No file in the model has the recorded sha256 (the store changed after gating).
    """
    import mlflow.artifacts
    from mlflow import MlflowClient

    try:  # not `models:/<id>`: MLflow resolves that through the process-wide registry URI, not `tracking_uri`
        location = MlflowClient(tracking_uri=tracking_uri).get_logged_model(model_id).artifact_location
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(dst),
                                                         tracking_uri=tracking_uri))
    except Exception as error:  # MlflowException, or the artifact store's own errors
        raise RegistryError(f"cannot download logged model {model_id}: {error}") from None
    records = sorted(local.rglob(RECORD_FILE))
    if not records:
        raise RegistryError(f"logged model {model_id} holds no {RECORD_FILE}; it was not logged by edgeship")
    record = CompiledArtifact.model_validate(json.loads(records[0].read_text()))
    found = [p for p in local.rglob("*") if p.is_file() and p.stat().st_size == record.bytes and sha256_of(p) == sha256]
    if not found:
        raise SignatureError(f"{record.target}: no file of logged model {model_id} has the sha256 recorded at "
                             f"registration ({sha256}); the artifact store was changed after gating: do not "
                             f"publish, re-run the release")
    path = dst / "verified" / record.path.name  # under its compiled name, as the repository names its targets
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(found[0], path)
    golden = next(iter(sorted(local.rglob(GOLDEN_FILE))), None)
    return record.model_copy(update={"path": path}), golden
