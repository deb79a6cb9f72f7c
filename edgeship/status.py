"""`edgeship status`: what is registered and what ships, in one look.

Registered versions of the project's model with their gate verdicts (overall and per
target) and the aliases pointing at them, read from the MLflow registry; and each
channel of the OTA repository with the version it ships per target (and the one before).

    >>> report = project_status(load_params("params.yaml"), Path("."))
    >>> report.versions[0].gate, report.channels[0].targets
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, Field

from edgeship.config import Params
from edgeship.errors import RegistryError

GATE_PREFIX = "edgeship.gate."
REQUIRED_TAG = "edgeship.gate.required"  # edgeship.registry.model_registry's: which targets' gates are required


class VersionStatus(BaseModel):
    """One registered model version as a reviewer sees it."""

    version: str
    created: datetime
    gate: str = "unknown"  # pass / fail, from the version's edgeship.gate tag
    target_gates: dict[str, str] = Field(default_factory=dict)  # target -> pass / fail
    aliases: list[str] = Field(default_factory=list)
    run_id: str | None = None


class ChannelTarget(BaseModel):
    """What a channel ships for one target: the base everyone runs, a candidate rolling out to a fraction."""

    target: str
    version: str | None  # the base
    candidate: str | None = None
    fraction: float = 0.0  # of devices on the candidate
    rollout_state: str = "completed"
    previous: str | None = None


class ChannelStatus(BaseModel):
    channel: str
    model_name: str
    released_at: datetime
    targets: list[ChannelTarget]


class ProjectStatus(BaseModel):
    model_name: str
    tracking_uri: str
    versions: list[VersionStatus]
    repository: str
    channels: list[ChannelStatus]
    repository_note: str | None = None  # why no channel is shown, when none is


def registered_versions(tracking_uri: str, model_name: str) -> list[VersionStatus]:
    """Every version of `model_name`, newest first; [] when the model was never registered."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        aliases = client.get_registered_model(model_name).aliases
        versions = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise RegistryError(f"cannot read the registry at {tracking_uri}: {error.message}; start the tracking "
                            f"server or fix registry.tracking_uri / EDGESHIP_TRACKING_URI") from None
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    rows = [VersionStatus(
        version=str(v.version), created=datetime.fromtimestamp(v.creation_timestamp / 1000, tz=timezone.utc),
        gate=v.tags.get("edgeship.gate", "unknown"), run_id=v.run_id, aliases=sorted(by_version.get(str(v.version), [])),
        target_gates={k.removeprefix(GATE_PREFIX): value for k, value in sorted(v.tags.items())
                      if k.startswith(GATE_PREFIX) and k != REQUIRED_TAG}) for v in versions]
    return sorted(rows, key=lambda row: int(row.version) if row.version.isdigit() else 0, reverse=True)


def published_channels(params: Params, root: Path) -> tuple[str, list[ChannelStatus], str | None]:
    """The OTA repository's location, its channels (with what they ship per target), and a note when there are none."""
    from edgeship.ota.repository import open_repository
    from edgeship.ota.publish import read_channel
    from edgeship.ota.storage import open_storage

    location = params.ota.repository
    if "://" not in location:
        location = str((root / location).resolve())
    if not open_storage(location, params.ota.s3_endpoint_url).exists("metadata/timestamp.json"):
        return location, [], "nothing published yet (`edgeship publish --alias production`)"
    repository = open_repository(params.ota, root)
    names = sorted(path.removeprefix("channels/").removesuffix(".json") for path in repository.target_paths
                   if path.startswith("channels/") and path.endswith(".json"))
    channels = []
    for name in names:
        descriptor = read_channel(repository, name)
        if descriptor is None:
            continue
        channels.append(ChannelStatus(
            channel=descriptor.channel, model_name=descriptor.model_name, released_at=descriptor.released_at,
            targets=[ChannelTarget(target=target, version=entry.base.version if entry.base else None,
                                   candidate=entry.candidate.version if entry.candidate else None,
                                   fraction=entry.fraction, rollout_state=entry.rollout_state,
                                   previous=entry.previous.version if entry.previous else None)
                     for target, entry in sorted(descriptor.targets.items())]))
    return location, channels, None if channels else "the repository holds no channel yet"


def project_status(params: Params, root: Path) -> ProjectStatus:
    from edgeship.registry.tracking import tracking_uri_for

    tracking_uri = tracking_uri_for(params.registry, root)
    versions = registered_versions(tracking_uri, params.project.name)
    repository, channels, note = published_channels(params, root)
    return ProjectStatus(model_name=params.project.name, tracking_uri=tracking_uri, versions=versions,
                         repository=repository, channels=channels, repository_note=note)


def render(status: ProjectStatus, console) -> None:
    """Two tables on a rich console: registered versions, then channels (readable at 80 columns)."""
    from edgeship.console import print_table

    versions = []
    for row in status.versions:
        verdict = {"pass": "[green]pass", "fail": "[red]fail"}.get(row.gate, row.gate)
        targets = ", ".join(f"{t} {'ok' if g == 'pass' else 'FAIL'}" for t, g in row.target_gates.items())
        versions.append([row.version, row.created.strftime("%Y-%m-%d %H:%M"), verdict, targets,
                         ", ".join(row.aliases) or "—"])
    print_table(console, ["version", "created (UTC)", "gate", "per target", "aliases"], versions,
                f"{status.model_name}: registered versions ({status.tracking_uri})",
                caption=None if status.versions else "no version registered yet (`edgeship run`)")
    channels = []
    for channel in status.channels:
        for target in channel.targets:
            rollout = f"{100 * target.fraction:.0f}% {target.rollout_state}" if target.candidate else "—"
            channels.append([channel.channel, target.target, target.version or "—", target.candidate or "—", rollout,
                             target.previous or "—", channel.released_at.strftime("%Y-%m-%d %H:%M")])
    print_table(console, ["channel", "target", "version", "candidate", "rollout", "previous", "released (UTC)"],
                channels, f"OTA channels ({status.repository})", caption=status.repository_note, key_columns=2)
