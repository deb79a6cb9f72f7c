"""Staged rollout per target: the state machine of one channel entry, and the commands that drive it.

Each target of a channel rolls out on its own. An entry holds a `base` (the
version the whole fleet of that target runs: the last one that reached 100%),
a `candidate` and the candidate's `fraction`. The machine, per entry:

    (no candidate) --stage(v, f<1)--> in_progress(v, f) --set_fraction(f')--> in_progress(v, f')
    in_progress --pause--> paused --resume--> in_progress
    in_progress | paused --abort--> aborted (candidate removed; everyone on base)
    in_progress --set_fraction(1.0) or stage(v, 1.0)--> completed (candidate becomes base, old base -> previous)
    in_progress(v) --stage(w)--> in_progress(w, f)   a newer candidate replaces v; the base stays
    in_progress(v) --stage(base)--> aborted          publishing the base again withdraws the candidate
    completed --rollback--> completed(previous)      (an unfinished rollout's rollback is abort)

Every command takes the repository's writer lock, reads the channel after taking
it, and commits one new signed descriptor. `expected_version` makes a command
act only on the version it was meant for (the rollout controller's guard
against acting on a candidate that changed under it).

    >>> set_fraction(repository, "stable", "onnx-int8", 0.5, expected_version="7")
    >>> abort(repository, "stable", "onnx-int8", "error rate 4% > 2%")
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone

from edgeship.errors import ReleaseError
from edgeship.ota.channel import ChannelDescriptor, ChannelEntry, ReleasedModel

logger = logging.getLogger(__name__)


# --- transitions of one entry (pure) -----------------------------------------------------

def stage(entry: ChannelEntry | None, release: ReleasedModel, fraction: float,
          allow_failed_gate: str | None = None) -> ChannelEntry:
    """Offer `release` on a target at `fraction`; the base stays unless the fraction is 1.0."""
    _check_fraction(fraction)
    entry = entry or ChannelEntry()
    update = {"allow_failed_gate": allow_failed_gate}
    if entry.base is not None and entry.base.sha256 == release.sha256:
        if entry.candidate is None:
            return entry.model_copy(update=update)  # already everyone's: nothing to roll out
        return abort_entry(entry.model_copy(update=update), f"the base v{release.version} was published again")
    entry = entry.model_copy(update={**update, "candidate": release, "fraction": fraction,
                                     "rollout_state": "in_progress", "state_reason": ""})
    return complete(entry) if fraction >= 1.0 else entry


def widen(entry: ChannelEntry, fraction: float, expected_version: str | None) -> ChannelEntry:
    """Change the candidate's fraction (wider or narrower); 1.0 completes the rollout."""
    _check_fraction(fraction)
    candidate = _candidate(entry, expected_version)
    if entry.rollout_state == "paused":
        raise ReleaseError(f"the rollout of v{candidate.version} is paused ({entry.state_reason}); resume it first")
    entry = entry.model_copy(update={"fraction": fraction, "rollout_state": "in_progress"})
    return complete(entry) if fraction >= 1.0 else entry


def complete(entry: ChannelEntry) -> ChannelEntry:
    """The candidate reached everyone: it becomes the base, the old base becomes `previous`."""
    candidate = _candidate(entry, None)
    previous = entry.base if entry.base is not None and entry.base.sha256 != candidate.sha256 else entry.previous
    return entry.model_copy(update={"base": candidate, "candidate": None, "previous": previous, "fraction": 1.0,
                                    "rollout_state": "completed", "state_reason": ""})


def pause_entry(entry: ChannelEntry, reason: str, expected_version: str | None = None) -> ChannelEntry:
    _candidate(entry, expected_version)
    return entry.model_copy(update={"rollout_state": "paused", "state_reason": reason})


def resume_entry(entry: ChannelEntry, expected_version: str | None = None) -> ChannelEntry:
    _candidate(entry, expected_version)
    return entry.model_copy(update={"rollout_state": "in_progress", "state_reason": ""})


def abort_entry(entry: ChannelEntry, reason: str, expected_version: str | None = None) -> ChannelEntry:
    """Remove the candidate: every device of the target goes back to the base."""
    _candidate(entry, expected_version)
    return entry.model_copy(update={"candidate": None, "fraction": 0.0, "rollout_state": "aborted",
                                    "state_reason": reason})


def rollback_entry(entry: ChannelEntry, target: str) -> ChannelEntry:
    """An unfinished rollout is aborted; a finished one returns to the base before it."""
    if entry.candidate is not None:
        return abort_entry(entry, "rolled back")
    if entry.previous is None:
        version = entry.base.version if entry.base else "none"
        raise ReleaseError(f"target '{target}' (version {version}) has no previous version to roll back to; "
                           f"publish the version you want instead")
    return entry.model_copy(update={"base": entry.previous, "previous": None, "rollout_state": "completed",
                                    "state_reason": f"rolled back from v{entry.base.version}" if entry.base else ""})


def _candidate(entry: ChannelEntry, expected_version: str | None) -> ReleasedModel:
    if entry.candidate is None:
        raise ReleaseError(f"there is no rollout in progress here (state {entry.rollout_state}); "
                           f"publish a version with --rollout F to start one")
    if expected_version is not None and entry.candidate.version != str(expected_version):
        raise ReleaseError(f"the candidate is v{entry.candidate.version}, not v{expected_version}; "
                           f"a newer release replaced it: act on v{entry.candidate.version} or leave it")
    return entry.candidate


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise ReleaseError(f"a rollout fraction lies in [0, 1]; got {fraction}")


# --- commands on a repository (each takes the writer lock) --------------------------------

def read_channel(repository, channel: str) -> ChannelDescriptor | None:
    """The channel's current descriptor, or None when the channel was never published."""
    data = repository.get_target(ChannelDescriptor.target_path(channel))
    return None if data is None else ChannelDescriptor.from_bytes(data)


def change_channel(repository, channel: str, purpose: str,
                   change: Callable[[ChannelDescriptor | None], ChannelDescriptor]) -> ChannelDescriptor:
    """Read the channel under the writer lock, apply `change`, sign and commit the new descriptor."""
    with repository.writing(f"{purpose} ({channel})"):
        descriptor = change(read_channel(repository, channel))
        descriptor = descriptor.model_copy(update={"released_at": datetime.now(timezone.utc), "source": purpose})
        repository.add_target(ChannelDescriptor.target_path(channel), descriptor.to_bytes())
        repository.commit()
    return descriptor


def change_entry(repository, channel: str, target: str, purpose: str,
                 change: Callable[[ChannelEntry], ChannelEntry]) -> ChannelDescriptor:
    """Change one target's entry; every other target's entry is written back as it was."""
    def apply(current: ChannelDescriptor | None) -> ChannelDescriptor:
        if current is None:
            raise ReleaseError(f"channel '{channel}' was never published; publish a release to it first")
        if target not in current.targets:
            raise ReleaseError(f"channel '{channel}' has no target '{target}'; it has {sorted(current.targets)}")
        entries = {**current.targets, target: change(current.targets[target])}
        return current.model_copy(update={"targets": entries})

    descriptor = change_channel(repository, channel, purpose, apply)
    logger.info("%s: channel %s target %s is now %s", purpose, channel, target, describe(descriptor.targets[target]))
    return descriptor


def set_fraction(repository, channel: str, target: str, fraction: float, *,
                 expected_version: str | None) -> ChannelDescriptor:
    """Widen or narrow the rollout of the candidate already in the channel (1.0 completes it)."""
    return change_entry(repository, channel, target, f"rollout {target} to {fraction:g}",
                        lambda entry: widen(entry, fraction, expected_version))


def pause(repository, channel: str, target: str, reason: str, *, expected_version: str | None = None):
    return change_entry(repository, channel, target, f"pause {target}: {reason}",
                        lambda entry: pause_entry(entry, reason, expected_version))


def resume(repository, channel: str, target: str, *, expected_version: str | None = None):
    return change_entry(repository, channel, target, f"resume {target}",
                        lambda entry: resume_entry(entry, expected_version))


def abort(repository, channel: str, target: str, reason: str, *, expected_version: str | None = None):
    """Remove the candidate of one target; its devices go back to the base."""
    return change_entry(repository, channel, target, f"abort {target}: {reason}",
                        lambda entry: abort_entry(entry, reason, expected_version))


def describe(entry: ChannelEntry) -> str:
    """One line: "base v6, candidate v7 at 10% (in_progress), fallback digits-tiny v2"."""
    parts = [f"base v{entry.base.version}" if entry.base else "no base"]
    if entry.candidate:
        parts.append(f"candidate v{entry.candidate.version} at {entry.fraction:.0%} ({entry.rollout_state})")
    elif entry.rollout_state == "aborted":
        parts.append(f"aborted: {entry.state_reason}")
    if entry.fallback:
        parts.append(f"fallback {entry.fallback.label}")
    if entry.allow_failed_gate:
        parts.append(f"published over a failed gate: {entry.allow_failed_gate}")
    return ", ".join(parts)
