"""The MLflow model registry side of a release: register a version, set aliases, resolve them.

A registered version holds the fp32 PyTorch model (`mlflow.pytorch`, with
signature and input example) and points at the compiled artifacts logged in the
same run (`compiled/<target>/...`). Version tags record each artifact's sha256
and each gate verdict, so a reviewer sees in the MLflow UI what they promote,
and the publisher refuses a file whose hash differs from what was gated.

    >>> version = register_release(run, "digits", model, example, artifacts, gates, alias="candidate")
    >>> release = resolve_alias(tracking_uri, "digits", "production", dst)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeship.errors import RegistryError, SignatureError
from edgeship.files import sha256_of
from edgeship.records import CompiledArtifact, GateReport
from edgeship.registry.tracking import ReleaseRun
from edgeship.tasks.gate import release_passes

ARTIFACT_TAG = "edgeship.artifact.{target}.sha256"
GATE_TAG = "edgeship.gate.{target}"


def compiled_artifact_dir(target: str) -> str:
    """Where a target's files live among the run's artifacts."""
    return f"compiled/{target}"


def log_compiled(run: ReleaseRun, artifact: CompiledArtifact) -> None:
    """Log a compiled file and its record (artifact.json) under compiled/<target>/."""
    directory = compiled_artifact_dir(artifact.target)
    run.log_artifact(artifact.path, directory)
    record = artifact.model_copy(update={"path": Path(artifact.path.name)})
    run.log_text(record.model_dump_json(indent=2), f"{directory}/artifact.json")


def log_torch_model(run: ReleaseRun, model, example: np.ndarray) -> str:
    """Log the fp32 PyTorch model with its signature and input example; return its model URI."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    mlflow.set_tracking_uri(run.tracking_uri)
    with mlflow.start_run(run_id=run.run_id):
        info = mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=example,
                                        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    return info.model_uri


def register_release(run: ReleaseRun, model_name: str, model_uri: str, artifacts: list[CompiledArtifact],
                     gates: list[GateReport], alias: str, metrics: dict[str, float] | None = None,
                     tags: dict[str, str] | None = None) -> str:
    """Register a model version for this run (with `tags`, e.g. its lineage); set `alias` only when every
    required gate passed.

    Returns the new version number (as a string, as MLflow does).
    """
    client = run.client
    try:
        client.get_registered_model(model_name)
    except Exception:  # MlflowException RESOURCE_DOES_NOT_EXIST
        client.create_registered_model(model_name, description="Released by edgeship: see version tags for "
                                                              "artifact hashes and gate verdicts.")
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = client.create_model_version(model_name, source=model_uri, run_id=run.run_id, model_id=model_id)
    tags = dict(tags or {})
    for artifact in artifacts:
        tags[ARTIFACT_TAG.format(target=artifact.target)] = artifact.sha256
    for gate in gates:
        tags[GATE_TAG.format(target=gate.target)] = "pass" if gate.passed else "fail"
    passed = release_passes(gates)
    tags["edgeship.gate"] = "pass" if passed else "fail"
    tags["edgeship.targets"] = ",".join(a.target for a in artifacts)
    for key, value in {**tags, **{f"metric.{k}": f"{v:.6g}" for k, v in (metrics or {}).items()}}.items():
        client.set_model_version_tag(model_name, version.version, key, value)
    if passed:
        client.set_registered_model_alias(model_name, alias, version.version)
    return str(version.version)


@dataclass(frozen=True)
class ResolvedRelease:
    """A registered version, found by alias, with its compiled files downloaded and verified."""

    model_name: str
    version: str
    run_id: str
    artifacts: list[CompiledArtifact]


def resolve_alias(tracking_uri: str, model_name: str, alias: str, dst: Path, targets: list[str] | None = None
                  ) -> ResolvedRelease:
    """Find the version `alias` points to, download its compiled artifacts, and check their hashes.

    Raises RegistryError when the alias or an artifact is missing, SignatureError
    when a downloaded file's sha256 differs from the one recorded at registration.
    """
    import mlflow.artifacts
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        version = client.get_model_version_by_alias(model_name, alias)
    except Exception as error:
        raise RegistryError(f"model '{model_name}' has no alias '{alias}' ({error}); set it in the MLflow UI or "
                            f"with MlflowClient().set_registered_model_alias('{model_name}', '{alias}', VERSION)"
                            ) from None
    recorded = {key.split(".")[2]: value for key, value in version.tags.items()
                if key.startswith("edgeship.artifact.") and key.endswith(".sha256")}
    wanted = targets or sorted(recorded)
    missing = [t for t in wanted if t not in recorded]
    if missing:
        raise RegistryError(f"version {version.version} of '{model_name}' holds no artifact for {missing}; "
                            f"it holds {sorted(recorded)}")
    artifacts = []
    for target in wanted:
        local = Path(mlflow.artifacts.download_artifacts(
            run_id=version.run_id, artifact_path=compiled_artifact_dir(target), dst_path=str(dst / target),
            tracking_uri=tracking_uri))
        record = CompiledArtifact.model_validate(json.loads((local / "artifact.json").read_text()))
        path = local / record.path.name
        digest = sha256_of(path)
        if digest != recorded[target]:
            raise SignatureError(f"{target} of '{model_name}' v{version.version}: downloaded file has sha256 "
                                 f"{digest}, the registry recorded {recorded[target]}; the artifact store was "
                                 f"changed after gating: do not publish, re-run the release")
        artifacts.append(record.model_copy(update={"path": path}))
    return ResolvedRelease(model_name, str(version.version), version.run_id, artifacts)
