"""The MLflow model registry side of a release: register a version, set aliases, resolve them.

A registered version holds the fp32 PyTorch model (`mlflow.pytorch`, with
signature and input example) and names, per target, the compiled model that will
ship: a logged model of the same run with its own metrics and gate verdict
(edgeship.registry.target_models). Version tags record each artifact's sha256
and each gate verdict, so a reviewer sees in the MLflow UI what they promote,
and the publisher refuses a file whose hash differs from what was gated.

    >>> version = register_release(run, "digits", model_uri, summaries, alias="candidate")
    >>> release = resolve_release(tracking_uri, "digits", dst, alias="production")   # or version="7"
    >>> promote(tracking_uri, "digits", "7", "production")

Only what passed ships: `resolve_release` refuses a version whose required gates
failed (GateFailed) unless given `allow_failed_gate="reason"`, which it records
as the version tag `edgeship.allow_failed_gate`; and it returns only the targets
whose own gate passed. An alias is resolved once, here, and the version it
resolved to is what the rest of the publish uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeship.errors import GateFailed, RegistryError, SignatureError
from edgeship.files import sha256_of
from edgeship.records import CompiledArtifact, TargetSummary
from edgeship.registry.target_models import MODEL_TAG, download_target, log_target_models, version_models
from edgeship.registry.tracking import ReleaseRun
from edgeship.tasks.gate import release_passes

ARTIFACT_TAG = "edgeship.artifact.{target}.sha256"
GATE_TAG = "edgeship.gate.{target}"
REQUIRED_TAG = "edgeship.gate.required"  # comma-separated targets whose gate is required
OVERRIDE_TAG = "edgeship.allow_failed_gate"


def compiled_artifact_dir(target: str) -> str:
    """Where versions registered before targets became logged models kept a target's files among the run's
    artifacts (still read, so those versions publish as they did)."""
    return f"compiled/{target}"


def log_torch_model(run: ReleaseRun, model, example: np.ndarray) -> str:
    """Log the fp32 PyTorch model with its signature and input example; return its model URI."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        output = model(torch.from_numpy(example))
    if isinstance(output, (tuple, list)):  # a detector with separate heads: one output each
        output = {f"output_{i}": o.numpy() for i, o in enumerate(output)}
    else:
        output = output.numpy()
    signature = infer_signature(example, output)
    mlflow.set_tracking_uri(run.tracking_uri)
    with mlflow.start_run(run_id=run.run_id):
        info = mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=example,
                                        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    return info.model_uri


def register_release(run: ReleaseRun, model_name: str, model_uri: str, targets: list[TargetSummary],
                     alias: str, metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None) -> str:
    """Register a model version for this run (with `tags`, e.g. its lineage), log each compiled target as a
    model of the run linked to it, and set `alias` only when every required gate passed (last, so whoever
    the alias wakes finds the models).

    Returns the new version number (as a string, as MLflow does).
    """
    client = run.client
    try:
        client.get_registered_model(model_name)
    except Exception:  # MlflowException RESOURCE_DOES_NOT_EXIST
        client.create_registered_model(model_name, description="Released by edgeship: per target, the compiled "
                                                              "model that ships is a logged model named by the "
                                                              "version's edgeship.model.<target> tag.")
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    # One version per release run: a retried registration (a server blip after the version was created) takes
    # that version up again instead of registering a second one.
    earlier = client.search_model_versions(f"name='{model_name}' and run_id='{run.run_id}'")
    version = earlier[0] if earlier else client.create_model_version(model_name, source=model_uri, run_id=run.run_id,
                                                                     model_id=model_id)
    gates = [t.gate for t in targets]
    tags = dict(tags or {})
    for target in targets:
        if target.artifact:
            tags[ARTIFACT_TAG.format(target=target.target)] = target.artifact.sha256
    for gate in gates:
        tags[GATE_TAG.format(target=gate.target)] = "pass" if gate.passed else "fail"
    passed = release_passes(gates)
    tags["edgeship.gate"] = "pass" if passed else "fail"
    tags[REQUIRED_TAG] = ",".join(g.target for g in gates if g.required)
    tags["edgeship.targets"] = ",".join(t.target for t in targets if t.artifact)
    for target, logged in log_target_models(run, model_name, str(version.version), targets).items():
        tags[MODEL_TAG.format(target=target)] = logged
    for key, value in {**tags, **{f"metric.{k}": f"{v:.6g}" for k, v in (metrics or {}).items()}}.items():
        client.set_model_version_tag(model_name, version.version, key, value)
    if passed:
        client.set_registered_model_alias(model_name, alias, version.version)
    return str(version.version)


@dataclass(frozen=True)
class ResolvedRelease:
    """A registered version, found by version or alias, with its compiled files downloaded and verified."""

    model_name: str
    version: str
    run_id: str
    artifacts: list[CompiledArtifact]
    alias: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # target -> why it does not ship
    allow_failed_gate: str | None = None
    golden: dict[str, Path] = field(default_factory=dict)  # target -> golden.npz the host check logged

    @property
    def source(self) -> str:
        """How the version was chosen, as recorded in the channel descriptor."""
        chosen = f"alias {self.alias} -> v{self.version}" if self.alias else f"version {self.version}"
        return chosen + (f" (over a failed gate: {self.allow_failed_gate})" if self.allow_failed_gate else "")


@dataclass(frozen=True)
class GateVerdict:
    """What a version's tags say about its gates."""

    passed: bool  # every required gate passed
    per_target: dict[str, str]  # target -> "pass" | "fail"
    required: list[str]

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> "GateVerdict":
        per_target = {key.split(".", 2)[2]: value for key, value in tags.items()
                      if key.startswith(GATE_TAG.removesuffix("{target}")) and key != REQUIRED_TAG}
        required = [t for t in tags.get(REQUIRED_TAG, "").split(",") if t]
        return cls(tags.get("edgeship.gate") == "pass", per_target, required)

    def failed_required(self) -> list[str]:
        return [t for t in self.required if self.per_target.get(t) != "pass"] or \
            ([] if self.passed else [t for t, v in self.per_target.items() if v != "pass"])


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _find_version(client, model_name: str, version: str | None, alias: str | None):
    if (version is None) == (alias is None):
        raise RegistryError("name exactly one of a version (--version 7) or an alias (--alias production)")
    try:
        if alias is not None:
            return client.get_model_version_by_alias(model_name, alias)
        return client.get_model_version(model_name, str(version))
    except Exception as error:
        what = f"alias '{alias}'" if alias is not None else f"version {version}"
        raise RegistryError(f"model '{model_name}' has no {what} ({error}); list them in the MLflow UI, or set the "
                            f"alias with: edgeship promote VERSION --alias {alias or 'production'}") from None


def _refuse_failed(model_name: str, version: str, verdict: GateVerdict, action: str) -> None:
    failed = verdict.failed_required() or ["(no gate verdict recorded)"]
    raise GateFailed(f"{model_name} v{version} failed its required gate for {', '.join(failed)}; refusing to "
                     f"{action}. Release a version that passes, or override on purpose with "
                     f"--allow-failed-gate \"REASON\" (recorded on the version and in the channel)")


def promote(tracking_uri: str, model_name: str, version: str, alias: str = "production",
            allow_failed_gate: str | None = None) -> GateVerdict:
    """Point `alias` at a version, refusing one whose required gates failed unless overridden (and recorded).

    Raises:
        RegistryError: No such version.
        GateFailed: A required gate failed and no override reason was given.
    """
    client = _client(tracking_uri)
    found = _find_version(client, model_name, version, None)
    verdict = GateVerdict.from_tags(found.tags)
    if not verdict.passed:
        if not allow_failed_gate:
            _refuse_failed(model_name, found.version, verdict, f"set alias '{alias}'")
        client.set_model_version_tag(model_name, found.version, OVERRIDE_TAG, allow_failed_gate)
    client.set_registered_model_alias(model_name, alias, found.version)
    return verdict


def resolve_release(tracking_uri: str, model_name: str, dst: Path, *, version: str | None = None,
                    alias: str | None = None, targets: list[str] | None = None,
                    allow_failed_gate: str | None = None) -> ResolvedRelease:
    """Find a version (by number, or the one an alias points to now: resolved once), check its gates,
    download the compiled artifacts of the targets that may ship, and check their hashes.

    Raises:
        RegistryError: No such version or alias, or an artifact is missing.
        GateFailed: A required gate failed (and no override reason), or no asked-for target passed.
        SignatureError: A downloaded file's sha256 differs from the one recorded at registration.
    """
    client = _client(tracking_uri)
    found = _find_version(client, model_name, version, alias)
    verdict = GateVerdict.from_tags(found.tags)
    if not verdict.passed:
        if not allow_failed_gate:
            _refuse_failed(model_name, found.version, verdict, "publish it")
        client.set_model_version_tag(model_name, found.version, OVERRIDE_TAG, allow_failed_gate)
    recorded = {key.split(".")[2]: value for key, value in found.tags.items()
                if key.startswith("edgeship.artifact.") and key.endswith(".sha256")}
    wanted = targets or sorted(recorded)
    missing = [t for t in wanted if t not in recorded]
    if missing:
        raise RegistryError(f"version {found.version} of '{model_name}' holds no artifact for {missing}; "
                            f"it holds {sorted(recorded)}")
    skipped = {t: "its gate failed" for t in wanted if verdict.per_target.get(t) != "pass"}
    if allow_failed_gate:
        skipped = {}
    shipping = [t for t in wanted if t not in skipped]
    if not shipping:
        raise GateFailed(f"no target of {model_name} v{found.version} that was asked for passed its gate "
                         f"({', '.join(wanted)}); nothing to publish")
    models = version_models(found.tags)
    artifacts, golden = [], {}
    for target in shipping:
        if target in models:  # the target's logged model, found by id and checked by the recorded sha256
            record, vectors = download_target(tracking_uri, models[target], recorded[target], dst / target)
        else:  # a version registered before targets were logged as models
            record, vectors = _download_run_artifact(tracking_uri, found, target, recorded[target], dst / target)
        artifacts.append(record)
        if vectors is not None:
            golden[target] = vectors
    return ResolvedRelease(model_name, str(found.version), found.run_id, artifacts, alias=alias, skipped=skipped,
                           allow_failed_gate=allow_failed_gate, golden=golden)


def _download_run_artifact(tracking_uri: str, found, target: str, sha256: str, dst: Path
                           ) -> tuple[CompiledArtifact, Path | None]:
    """A target's files among the run's artifacts (compiled/<target>/), as older versions kept them."""
    import mlflow.artifacts

    local = Path(mlflow.artifacts.download_artifacts(run_id=found.run_id, artifact_path=compiled_artifact_dir(target),
                                                     dst_path=str(dst), tracking_uri=tracking_uri))
    record = CompiledArtifact.model_validate(json.loads((local / "artifact.json").read_text()))
    path = local / record.path.name
    digest = sha256_of(path)
    if digest != sha256:
        raise SignatureError(f"{target} of '{found.name}' v{found.version}: downloaded file has sha256 {digest}, "
                             f"the registry recorded {sha256}; the artifact store was changed after gating: do not "
                             f"publish, re-run the release")
    return record.model_copy(update={"path": path}), (local / "golden.npz" if (local / "golden.npz").is_file() else None)


def resolve_alias(tracking_uri: str, model_name: str, alias: str, dst: Path, targets: list[str] | None = None
                  ) -> ResolvedRelease:
    """The version `alias` points to (see resolve_release: gates checked, failed targets left out)."""
    return resolve_release(tracking_uri, model_name, dst, alias=alias, targets=targets)


def record_publish(tracking_uri: str, model_name: str, version: str, channel: str, text: str) -> None:
    """Note on the version where and how it was published (a version tag per channel)."""
    _client(tracking_uri).set_model_version_tag(model_name, version, f"edgeship.published.{channel}", text)
