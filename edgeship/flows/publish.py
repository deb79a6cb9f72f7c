"""The publish flow: registry alias -> signed OTA channel. And its inverse, rollback.

A reviewer promotes a version by pointing an alias (`production`) at it in the
MLflow UI; this flow (started by `edgeship publish`, the webhook receiver, or the
Prefect UI) downloads that version's compiled artifacts, checks them against the
hashes recorded at registration, and publishes them to the channel.

    >>> descriptor = publish(alias="production", workdir=".")
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from edgeship.config import OtaParams, load_params
from edgeship.ota.channel import ChannelDescriptor
from edgeship.registry.model_registry import resolve_alias
from edgeship.registry.tracking import tracking_uri_for


def open_repository(settings: OtaParams, root: Path):
    """The OTA repository and keystore named in params.yaml, relative paths against the project."""
    from edgeship.ota.keys import Keystore
    from edgeship.ota.repository import OtaRepository
    from edgeship.ota.storage import open_storage

    location = settings.repository
    if "://" not in location:
        location = str((root / location).resolve())
    return OtaRepository(open_storage(location, settings.s3_endpoint_url), Keystore(root / settings.keystore),
                         expiry_days=settings.metadata_expiry_days)


def _describe(descriptor: ChannelDescriptor, action: str) -> str:
    lines = [f"## {action}: channel `{descriptor.channel}` of `{descriptor.model_name}`", "",
             f"rollout fraction: {descriptor.rollout_fraction}", "",
             "| target | version | sha256 | bytes | previous |", "| --- | --- | --- | --- | --- |"]
    for target, entry in sorted(descriptor.targets.items()):
        previous = entry.previous.version if entry.previous else "—"
        lines.append(f"| {target} | {entry.version} | `{entry.sha256[:16]}` | {entry.bytes} | {previous} |")
    return "\n".join(lines)


@task(name="resolve-alias", cache_policy=NO_CACHE)
def resolve_release(tracking_uri: str, model_name: str, alias: str, dst: Path, targets: list[str] | None):
    return resolve_alias(tracking_uri, model_name, alias, dst, targets)


@flow(name="publish", log_prints=True)
def publish(alias: str = "production", params_path: str = "params.yaml", workdir: str = ".",
            channel: str | None = None, rollout_fraction: float = 1.0, targets: list[str] | None = None
            ) -> ChannelDescriptor:
    """Publish the version `alias` points to into the signed OTA repository's channel."""
    from edgeship.ota.publish import publish_release

    root = Path(workdir).resolve()
    params = load_params(root / params_path)
    tracking_uri = tracking_uri_for(params.registry, root)
    with tempfile.TemporaryDirectory(prefix="edgeship-publish-") as tmp:
        release = resolve_release(tracking_uri, params.project.name, alias, Path(tmp), targets)
        repository = open_repository(params.ota, root)
        descriptor = publish_release(repository, release.model_name, release.version, release.artifacts,
                                     channel=channel or params.ota.channel, rollout_fraction=rollout_fraction)
    create_markdown_artifact(_describe(descriptor, f"Published v{release.version} (alias {alias})"),
                             key="ota-channel", description="The signed channel descriptor devices will read")
    get_run_logger().info("published %s v%s to channel %s", release.model_name, release.version,
                          descriptor.channel)
    return descriptor


@flow(name="rollback", log_prints=True)
def rollback(params_path: str = "params.yaml", workdir: str = ".", channel: str | None = None,
             targets: list[str] | None = None) -> ChannelDescriptor:
    """Point a channel back at each target's previous version (newly signed; devices follow on next check)."""
    from edgeship.ota.publish import rollback_release

    root = Path(workdir).resolve()
    params = load_params(root / params_path)
    descriptor = rollback_release(open_repository(params.ota, root), channel or params.ota.channel, targets)
    create_markdown_artifact(_describe(descriptor, "Rolled back"), key="ota-channel",
                             description="The signed channel descriptor devices will read")
    return descriptor
