"""Publishing a model version to a release channel, and rolling a channel back.

A release is the compiled artifacts of one registered model version. Publishing
it checks each file against the hash its record carries (the one measured at
compile time and logged to MLflow), uploads the files (and their golden
vectors) as TUF targets, and stages each target's entry in the channel: the
version becomes that target's candidate at `rollout_fraction` (at 1.0 it
becomes the base at once). Targets the release does not carry are untouched.
All under the repository's writer lock, in one commit: one new signed
targets/snapshot/timestamp version, which devices pick up on their next check.

    >>> repository = OtaRepository(open_storage(params.ota.repository), Keystore(params.ota.keystore))
    >>> publish_release(repository, "digits", "7", artifacts, channel="stable", rollout_fraction=0.1)
    >>> set_fraction(repository, "stable", "onnx-int8", 0.5, expected_version="7")   # edgeship.ota.rollout
    >>> rollback_release(repository, "stable")                                       # back to each previous base

Model files land at `models/<model_name>/<version>/<target>/<filename>`.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timezone

from pathlib import Path

import numpy as np

from edgeship.errors import SignatureError
from edgeship.files import sha256_of
from edgeship.ota.channel import SAFE_NAME, ChannelDescriptor, GoldenVectors, ReleasedModel
from edgeship.ota.repository import OtaRepository
from edgeship.ota.rollout import (ReleaseError, change_channel, change_entry, describe, read_channel,
                                  rollback_entry, stage)
from edgeship.records import CompiledArtifact

__all__ = ["ReleaseError", "publish_release", "publish_shadow", "read_channel", "remove_shadow", "rollback_release",
           "upload_model"]

logger = logging.getLogger(__name__)


def upload_model(repository: OtaRepository, model_name: str, version: str | int, artifact: CompiledArtifact,
                 latency_budget_ms: float | None = None, golden: Path | None = None,
                 golden_tolerance: tuple[float, float] = (0.05, 0.05)) -> ReleasedModel:
    """Verify one compiled artifact, upload it (and its golden vectors) as targets; return its channel record."""
    version = str(version)
    _check_name("model name", model_name)
    _check_name("version", version)
    _verify(artifact)
    prefix = f"models/{model_name}/{version}/{artifact.target}"
    target_path = f"{prefix}/{artifact.path.name}"
    repository.add_target(target_path, artifact.path)
    vectors = None
    if golden is not None:
        data = Path(golden).read_bytes()
        info = repository.add_target(f"{prefix}/golden.npz", data)
        with np.load(Path(golden)) as arrays:
            count = int(arrays["inputs"].shape[0])
        vectors = GoldenVectors(target_path=info.path, sha256=info.hashes["sha256"], bytes=info.length,
                                atol=golden_tolerance[0], rtol=golden_tolerance[1], count=count,
                                kind="detections" if artifact.postprocess else "logits")
    return ReleasedModel(version=version, target_path=target_path, sha256=artifact.sha256, bytes=artifact.bytes,
                         runtime=artifact.runtime, inputs=artifact.inputs, outputs=artifact.outputs,
                         model_name=model_name,
                         latency_budget_ms=latency_budget_ms, golden=vectors, postprocess=artifact.postprocess)


def publish_release(
    repository: OtaRepository,
    model_name: str,
    version: str | int,
    artifacts: list[CompiledArtifact],
    channel: str = "stable",
    rollout_fraction: float = 1.0,
    *,
    latency_budgets: dict[str, float | None] | None = None,
    golden: dict[str, Path] | None = None,
    fallbacks: dict[str, tuple[str, str, CompiledArtifact]] | None = None,
    allow_failed_gate: str | None = None,
    drift_reference: dict | None = None,
    field_sampling: dict | None = None,
    source: str = "",
    golden_tolerance: tuple[float, float] = (0.05, 0.05),
) -> ChannelDescriptor:
    """Publish a model version's compiled artifacts to a channel and commit, under the writer lock.

    Per target the version becomes the candidate at `rollout_fraction` (1.0: the base at
    once); an unfinished candidate it replaces is dropped, the base stays. Targets
    of the channel that this release does not carry keep their entry.

    Args:
        repository: The OTA repository to publish into.
        model_name: The registered model's name.
        version: The registered model version (MLflow's version number).
        artifacts: One compiled artifact per target; each file must still match its sha256.
        channel: The release channel, e.g. "stable" or "canary".
        rollout_fraction: The share of each target's devices (0..1) that take this version.
        latency_budgets: Per target the gate's p99 budget (ms): devices hold probation to it.
        golden: Per target an .npz of `inputs` and reference `outputs` (signed with the release).
        golden_tolerance: (atol, rtol) a device's outputs may differ by (int8 kernels differ a little across CPUs);
            the top-1 class must match exactly.
        fallbacks: Per target (model name, version, artifact) of the small fallback model.
        allow_failed_gate: The reason this version is published although a required gate failed.
        drift_reference: Carried into every entry for the fleet's drift check.
        field_sampling: The channel's field sampling settings (edgeship.records.field.FieldSampling), carried into
            every entry it publishes; None leaves devices sampling nothing.
        source: How the version was chosen ("alias production -> v7"), recorded in the descriptor.

    Returns:
        The descriptor now published.

    Raises:
        SignatureError: An artifact file differs from its record's sha256 or size.
        ReleaseError: No artifacts, a target given twice, or the channel carries another model.
    """
    version = str(version)
    _check_name("channel", channel)
    if not 0.0 <= rollout_fraction <= 1.0:
        raise ReleaseError(f"rollout_fraction must lie in [0, 1]; got {rollout_fraction}")
    if not artifacts:
        raise ReleaseError(f"no artifacts to publish for {model_name} version {version}; "
                           f"check that at least one target passed its gate")
    targets = [a.target for a in artifacts]
    if len(set(targets)) != len(targets):
        raise ReleaseError(f"each target may appear once in a release; got {targets}")
    budgets, vectors = latency_budgets or {}, golden or {}
    with repository.writing(f"publish {model_name} v{version} to {channel}"):
        current = read_channel(repository, channel)
        if current is not None and current.model_name != model_name:
            raise ReleaseError(f"channel '{channel}' ships model '{current.model_name}', not '{model_name}'; "
                               f"publish '{model_name}' to a channel of its own")
        entries = dict(current.targets) if current else {}
        for artifact in artifacts:
            release = upload_model(repository, model_name, version, artifact, budgets.get(artifact.target),
                                   vectors.get(artifact.target), golden_tolerance)
            entry = stage(entries.get(artifact.target), release, rollout_fraction, allow_failed_gate)
            extra = {"drift_reference": drift_reference} if drift_reference is not None else {}
            extra["field_sampling"] = field_sampling
            if fallbacks and artifact.target in fallbacks:
                name, fallback_version, fallback = fallbacks[artifact.target]
                extra["fallback"] = upload_model(repository, name, fallback_version, fallback,
                                                 budgets.get(artifact.target))
            entries[artifact.target] = entry.model_copy(update=extra)
        descriptor = ChannelDescriptor(channel=channel, model_name=model_name, released_at=datetime.now(timezone.utc),
                                       targets=entries, source=source or f"publish v{version}")
        repository.add_target(ChannelDescriptor.target_path(channel), descriptor.to_bytes())
        repository.commit()
    logger.info("published %s version %s to channel %s (%s) at %.0f%% rollout%s", model_name, version, channel,
                ", ".join(targets), rollout_fraction * 100,
                f" OVER A FAILED GATE: {allow_failed_gate}" if allow_failed_gate else "")
    return descriptor


def publish_shadow(repository: OtaRepository, model_name: str, version: str | int, artifact: CompiledArtifact,
                   channel: str = "stable", shadow_fraction: float = 0.1, sample_rate: float = 0.1,
                   latency_budget_ms: float | None = None) -> ChannelDescriptor:
    """Offer a model as one target's shadow: devices in `shadow_fraction` install it beside the active model
    and run it on `sample_rate` of their inputs, off the answer path. `remove_shadow` takes it away."""
    if not (0.0 <= shadow_fraction <= 1.0 and 0.0 <= sample_rate <= 1.0):
        raise ReleaseError(f"shadow_fraction and sample_rate lie in [0, 1]; got {shadow_fraction}, {sample_rate}")

    def apply(current: ChannelDescriptor | None) -> ChannelDescriptor:
        if current is None or artifact.target not in current.targets:
            raise ReleaseError(f"channel '{channel}' has no target '{artifact.target}'; publish a release first")
        shadow = upload_model(repository, model_name, version, artifact, latency_budget_ms)
        entry = current.targets[artifact.target].model_copy(
            update={"shadow": shadow, "shadow_fraction": shadow_fraction, "shadow_sample_rate": sample_rate})
        return current.model_copy(update={"targets": {**current.targets, artifact.target: entry}})

    return change_channel(repository, channel, f"shadow {model_name} v{version} on {artifact.target}", apply)


def remove_shadow(repository: OtaRepository, channel: str, target: str) -> ChannelDescriptor:
    """Stop shadowing on a target; devices drop the shadow model on their next check."""
    return change_entry(repository, channel, target, f"remove the shadow on {target}",
                        lambda entry: entry.model_copy(update={"shadow": None, "shadow_fraction": 0.0}))


def rollback_release(repository: OtaRepository, channel: str, targets: list[str] | None = None) -> ChannelDescriptor:
    """Roll a channel's targets back, each on its own: an unfinished rollout is aborted, a finished one
    returns to the base before it. Other targets are untouched.

    Args:
        repository: The OTA repository.
        channel: The channel to roll back.
        targets: The targets to roll back; None for every target of the channel.

    Raises:
        ReleaseError: The channel was never published, names no such target, or a target has nothing to go back to.
    """
    _check_name("channel", channel)

    def apply(current: ChannelDescriptor | None) -> ChannelDescriptor:
        if current is None:
            raise ReleaseError(f"channel '{channel}' was never published; there is nothing to roll back")
        names = list(current.targets) if targets is None else targets
        entries = dict(current.targets)
        for name in names:
            if name not in entries:
                raise ReleaseError(f"channel '{channel}' has no target '{name}'; it has {sorted(current.targets)}")
            entries[name] = rollback_entry(entries[name], name)
        return current.model_copy(update={"targets": entries})

    descriptor = change_channel(repository, channel, f"rollback {', '.join(targets or ['all targets'])}", apply)
    logger.info("rolled back channel %s: %s", channel,
                "; ".join(f"{n}: {describe(e)}" for n, e in descriptor.targets.items()))
    return descriptor


def _check_name(what: str, name: str) -> None:
    """Names become path components in the repository and on devices."""
    if not re.match(SAFE_NAME, name):
        raise ReleaseError(f"{what} '{name}' may hold only letters, digits, '_', '.', '+' and '-', "
                           f"and must start with a letter or digit")


def _verify(artifact: CompiledArtifact) -> None:
    """The file must be the one the record describes: the hash devices will be told to expect."""
    if not artifact.path.is_file():
        raise ReleaseError(f"{artifact.target} artifact {artifact.path} does not exist; "
                           f"download the model version's artifacts again")
    actual = sha256_of(artifact.path)
    size = artifact.path.stat().st_size
    if actual != artifact.sha256 or size != artifact.bytes:
        raise SignatureError(f"{artifact.target} artifact {artifact.path} has sha256 {actual} ({size} bytes), "
                             f"but its record says {artifact.sha256} ({artifact.bytes} bytes); the file changed "
                             f"after it was compiled and gated: publish the registered files, not a rebuilt one")
