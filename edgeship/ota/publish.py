"""Publishing a model version to a release channel, and rolling a channel back.

A release is the compiled artifacts of one registered model version. Publishing
it checks each file against the hash its record carries (the one measured at
compile time and logged to MLflow), uploads the files as TUF targets, writes a
new channel descriptor whose `previous` entries name what the channel shipped
before, and commits: one new signed targets/snapshot/timestamp version, which
devices pick up on their next check.

    >>> repository = OtaRepository(open_storage(params.ota.repository), Keystore(params.ota.keystore))
    >>> publish_release(repository, "digits", "7", artifacts, channel="stable", rollout_fraction=0.1)
    >>> publish_release(repository, "digits", "7", artifacts, rollout_fraction=1.0)   # widen the rollout
    >>> rollback_release(repository, "stable")                                      # back to version 6

Model files land at `models/<model_name>/<version>/<target>/<filename>`.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timezone

from edgeship.errors import EdgeshipError, SignatureError
from edgeship.files import sha256_of
from edgeship.ota.channel import SAFE_NAME, ChannelDescriptor, ChannelEntry
from edgeship.ota.repository import OtaRepository
from edgeship.records import CompiledArtifact

logger = logging.getLogger(__name__)


class ReleaseError(EdgeshipError):
    """A release cannot be published or rolled back as asked (nothing to roll back to, wrong channel)."""


def read_channel(repository: OtaRepository, channel: str) -> ChannelDescriptor | None:
    """The channel's current descriptor, or None when the channel was never published."""
    data = repository.get_target(ChannelDescriptor.target_path(channel))
    return None if data is None else ChannelDescriptor.from_bytes(data)


def publish_release(
    repository: OtaRepository,
    model_name: str,
    version: str | int,
    artifacts: list[CompiledArtifact],
    channel: str = "stable",
    rollout_fraction: float = 1.0,
) -> ChannelDescriptor:
    """Publish a model version's compiled artifacts to a channel and commit.

    Targets of the channel that this release does not carry keep their current entry.

    Args:
        repository: The OTA repository to publish into.
        model_name: The registered model's name.
        version: The registered model version (MLflow's version number).
        artifacts: One compiled artifact per target; each file must still match its sha256.
        channel: The release channel, e.g. "stable" or "canary".
        rollout_fraction: The share of devices (0..1) that take this version; the rest stay on `previous`.

    Returns:
        The descriptor now published.

    Raises:
        SignatureError: An artifact file differs from its record's sha256 or size.
        ReleaseError: No artifacts, a target given twice, or the channel carries another model.
    """
    version = str(version)
    _check_name("model name", model_name)
    _check_name("version", version)
    if not 0.0 <= rollout_fraction <= 1.0:
        raise ReleaseError(f"rollout_fraction must lie in [0, 1]; got {rollout_fraction}")
    if not artifacts:
        raise ReleaseError(f"no artifacts to publish for {model_name} version {version}; "
                           f"check that at least one target passed its gate")
    targets = [a.target for a in artifacts]
    if len(set(targets)) != len(targets):
        raise ReleaseError(f"each target may appear once in a release; got {targets}")
    current = _current(repository, channel, model_name)
    for artifact in artifacts:
        _verify(artifact)

    entries = dict(current.targets) if current else {}
    for artifact in artifacts:
        target_path = f"models/{model_name}/{version}/{artifact.target}/{artifact.path.name}"
        repository.add_target(target_path, artifact.path)
        before = entries.get(artifact.target)
        if before is None:
            previous = None
        elif before.version != version:
            previous = before.without_previous()
        else:  # the same version again (e.g. a wider rollout): keep what it replaced
            previous = before.previous
        entries[artifact.target] = ChannelEntry(
            version=version, target_path=target_path, sha256=artifact.sha256, bytes=artifact.bytes,
            runtime=artifact.runtime, inputs=artifact.inputs, previous=previous)

    descriptor = _publish(repository, channel, model_name, entries, rollout_fraction)
    logger.info("published %s version %s to channel %s (%s) at %.0f%% rollout",
                model_name, version, channel, ", ".join(targets), rollout_fraction * 100)
    return descriptor


def rollback_release(repository: OtaRepository, channel: str, targets: list[str] | None = None) -> ChannelDescriptor:
    """Point a channel's targets back at their previous versions, for every device, and commit.

    The rolled-back entries have no `previous` of their own: rolling back twice
    is refused, and going forward again is publishing that version anew.

    Args:
        repository: The OTA repository.
        channel: The channel to roll back.
        targets: The targets to roll back; None for every target of the channel.

    Raises:
        ReleaseError: The channel was never published, names no such target, or a target has no previous version.
    """
    _check_name("channel", channel)
    current = read_channel(repository, channel)
    if current is None:
        raise ReleaseError(f"channel '{channel}' was never published; there is nothing to roll back")
    names = list(current.targets) if targets is None else targets
    entries = dict(current.targets)
    for name in names:
        entry = entries.get(name)
        if entry is None:
            raise ReleaseError(f"channel '{channel}' has no target '{name}'; it has {sorted(current.targets)}")
        if entry.previous is None:
            raise ReleaseError(f"channel '{channel}' target '{name}' (version {entry.version}) has no previous "
                               f"version to roll back to; publish the version you want instead")
        entries[name] = ChannelEntry(**entry.previous.model_dump())
    descriptor = _publish(repository, channel, current.model_name, entries, rollout_fraction=1.0)
    logger.info("rolled back channel %s: %s", channel,
                ", ".join(f"{n} {current.targets[n].version} -> {entries[n].version}" for n in names))
    return descriptor


def _check_name(what: str, name: str) -> None:
    """Names become path components in the repository and on devices."""
    if not re.match(SAFE_NAME, name):
        raise ReleaseError(f"{what} '{name}' may hold only letters, digits, '_', '.', '+' and '-', "
                           f"and must start with a letter or digit")


def _current(repository: OtaRepository, channel: str, model_name: str) -> ChannelDescriptor | None:
    _check_name("channel", channel)
    current = read_channel(repository, channel)
    if current is not None and current.model_name != model_name:
        raise ReleaseError(f"channel '{channel}' ships model '{current.model_name}', not '{model_name}'; "
                           f"publish '{model_name}' to a channel of its own")
    return current


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


def _publish(repository: OtaRepository, channel: str, model_name: str,
             entries: dict[str, ChannelEntry], rollout_fraction: float) -> ChannelDescriptor:
    descriptor = ChannelDescriptor(channel=channel, model_name=model_name, released_at=datetime.now(timezone.utc),
                                   rollout_fraction=rollout_fraction, targets=entries)
    repository.add_target(ChannelDescriptor.target_path(channel), descriptor.to_bytes())
    repository.commit()
    return descriptor
