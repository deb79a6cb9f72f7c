"""The OTA writer flows: publish (registry -> signed channel), rollout, rollback and resign.

A reviewer promotes a version (`edgeship promote 7 --alias production`, refused for
a version whose required gates failed); this flow (started by `edgeship publish`,
the webhook receiver with the event's version, or the Prefect UI) resolves the
version once, refuses it when a required gate failed (unless `allow_failed_gate`
gives the reason, recorded on the version and in the channel), downloads only the
targets that passed, checks them against the hashes recorded at registration,
takes the golden vectors the release's host check logged (or computes them the
same way for an older version), and stages them in the channel per target.

Every writer takes the Prefect global concurrency limit `edgeship-ota-writer`
(create it once: `prefect gcl create edgeship-ota-writer --limit 1`) and, inside
the repository, the storage's own writer lock (edgeship.ota.lock).

    >>> descriptor = publish(alias="production", workdir=".")
    >>> descriptor = publish(version="7", rollout_fraction=0.1)
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from edgeship.config import Params, load_params
from edgeship.flows.retries import DOWNLOAD_TIMEOUT_S, SERVICE_CALL
from edgeship.ota.channel import ChannelDescriptor
from edgeship.ota.repository import open_repository
from edgeship.ota.rollout import describe
from edgeship.registry.model_registry import ResolvedRelease, record_publish, resolve_release
from edgeship.registry.tracking import tracking_uri_for

CONCURRENCY_LIMIT = "edgeship-ota-writer"
logger = logging.getLogger(__name__)


@contextlib.contextmanager
def one_writer():
    """Prefect's global concurrency limit for OTA writers (a no-op when no such limit exists)."""
    from prefect.concurrency.sync import concurrency

    with concurrency(CONCURRENCY_LIMIT, occupy=1, strict=False):
        yield


def describe_channel(descriptor: ChannelDescriptor, action: str) -> str:
    lines = [f"## {action}: channel `{descriptor.channel}` of `{descriptor.model_name}`", "",
             f"source: {descriptor.source}", "", "| target | rollout |", "| --- | --- |"]
    lines += [f"| {target} | {describe(entry)} |" for target, entry in sorted(descriptor.targets.items())]
    return "\n".join(lines)


def _artifact(descriptor: ChannelDescriptor, action: str) -> None:
    create_markdown_artifact(describe_channel(descriptor, action), key="ota-channel",
                             description="The signed channel descriptor devices will read")


@task(name="resolve-release", cache_policy=NO_CACHE, timeout_seconds=DOWNLOAD_TIMEOUT_S, **SERVICE_CALL)
def resolve(tracking_uri: str, model_name: str, dst: Path, version: str | None, alias: str | None,
            targets: list[str] | None, allow_failed_gate: str | None) -> ResolvedRelease:
    return resolve_release(tracking_uri, model_name, dst, version=version, alias=alias, targets=targets,
                           allow_failed_gate=allow_failed_gate)


@task(name="record-publish", cache_policy=NO_CACHE, timeout_seconds=120, **SERVICE_CALL)
def note_publish(tracking_uri: str, model_name: str, version: str, channel: str, text: str) -> None:
    """The published version says where and how it went out (a version tag per channel)."""
    record_publish(tracking_uri, model_name, version, channel, text)


def golden_vectors(params: Params, root: Path, release: ResolvedRelease, dst: Path) -> dict[str, Path]:
    """Per target the golden .npz: the one the release's host check logged, else (a version registered
    before host checks kept them) the first `ota.golden_count` test images and the artifact's outputs here."""
    from edgeship.ota.golden import write_golden

    if all(a.target in release.golden for a in release.artifacts):
        return dict(release.golden)

    test_split = root / params.data.prepared_dir / "test.npz"
    if params.ota.golden_count == 0 or not test_split.is_file():
        logger.warning("no golden vectors: %s is missing (run `edgeship data prepare`)", test_split)
        return {}
    from edgeship.tasks.data import images_of

    with np.load(test_split) as arrays:
        inputs = images_of(arrays, params.ota.golden_count)
    found = dict(release.golden)
    for artifact in (a for a in release.artifacts if a.target not in found):
        path = write_golden(artifact, inputs, dst / f"golden-{artifact.target}.npz")
        if path is not None:
            found[artifact.target] = path
    return found


def _fallbacks(params: Params, tracking_uri: str, dst: Path, targets: list[str]) -> dict:
    fallback = params.ota.fallback
    if fallback is None:
        return {}
    resolved = resolve_release(tracking_uri, fallback.model_name, dst / "fallback", version=fallback.version,
                               alias=None if fallback.version else fallback.alias)
    return {a.target: (resolved.model_name, resolved.version, a) for a in resolved.artifacts if a.target in targets}


def _field_sampling(params, channel: str) -> dict | None:
    """The channel's field sampling settings as its entries carry them (None: the channel does not sample)."""
    sampling = params.rollout.policy_for(channel).field_samples
    return sampling.model_dump(mode="json") if sampling is not None else None


@flow(name="publish", log_prints=True)
def publish(alias: str | None = "production", params_path: str = "params.yaml", workdir: str = ".",
            channel: str | None = None, rollout_fraction: float = 1.0, targets: list[str] | None = None,
            version: str | None = None, allow_failed_gate: str | None = None,
            drift_reference: dict | None = None) -> ChannelDescriptor:
    """Publish a version (given, or the one `alias` points to now) into the signed OTA repository's channel.

    `drift_reference` (the fleet's drift baseline) is carried into every entry; by default it is the release's
    own class and confidence distributions on the prepared test split."""
    from edgeship.fleet.drift import release_drift_reference
    from edgeship.ota.publish import publish_release

    root = Path(workdir).resolve()
    params = load_params(root / params_path)
    tracking_uri = tracking_uri_for(params.registry, root)
    channel = channel or params.ota.channel
    with tempfile.TemporaryDirectory(prefix="edgeship-publish-") as tmp:
        # resolved once: a later move of the alias does not change what this run publishes
        release = resolve(tracking_uri, params.project.name, Path(tmp), version, None if version else alias,
                          targets, allow_failed_gate)
        budgets = {t: policy.p99_latency_ms for t, policy in params.gate.items()}
        golden = golden_vectors(params, root, release, Path(tmp) / "golden")
        fallbacks = _fallbacks(params, tracking_uri, Path(tmp), [a.target for a in release.artifacts])
        reference = None if drift_reference else release_drift_reference(
            root / params.data.prepared_dir / "test.npz", release.artifacts, release.version)
        with one_writer():
            descriptor = publish_release(
                open_repository(params.ota, root), release.model_name, release.version, release.artifacts,
                channel=channel, rollout_fraction=rollout_fraction, latency_budgets=budgets, golden=golden,
                fallbacks=fallbacks, allow_failed_gate=release.allow_failed_gate, source=release.source,
                golden_tolerance=(params.ota.golden_atol, params.ota.golden_rtol),
                drift_reference=drift_reference or reference, field_sampling=_field_sampling(params, channel))
    note_publish(tracking_uri, release.model_name, release.version, channel,
                 f"{release.source} at {rollout_fraction:g}" + (f"; skipped {release.skipped}" if release.skipped
                                                                 else ""))
    _artifact(descriptor, f"Published v{release.version} ({release.source})")
    for target, why in release.skipped.items():
        get_run_logger().warning("not publishing %s of v%s: %s", target, release.version, why)
    get_run_logger().info("published %s v%s to channel %s", release.model_name, release.version, channel)
    return descriptor


@flow(name="rollback", log_prints=True)
def rollback(params_path: str = "params.yaml", workdir: str = ".", channel: str | None = None,
             targets: list[str] | None = None) -> ChannelDescriptor:
    """Roll targets back (an unfinished rollout is aborted; a finished one returns to the base before it)."""
    from edgeship.ota.publish import rollback_release

    root = Path(workdir).resolve()
    params = load_params(root / params_path)
    with one_writer():
        descriptor = rollback_release(open_repository(params.ota, root), channel or params.ota.channel, targets)
    _artifact(descriptor, "Rolled back")
    return descriptor


@flow(name="rollout", log_prints=True)
def rollout(target: str, fraction: float, params_path: str = "params.yaml", workdir: str = ".",
            channel: str | None = None, expected_version: str | None = None) -> ChannelDescriptor:
    """Widen or narrow the rollout of the candidate already in the channel, for one target."""
    from edgeship.ota.rollout import set_fraction

    root = Path(workdir).resolve()
    params = load_params(root / params_path)
    with one_writer():
        descriptor = set_fraction(open_repository(params.ota, root), channel or params.ota.channel, target,
                                  fraction, expected_version=expected_version)
    _artifact(descriptor, f"Rollout of {target} set to {fraction:g}")
    return descriptor


@flow(name="resign", log_prints=True)
def resign(params_path: str = "params.yaml", workdir: str = ".", force: bool = False) -> list[str]:
    """Renew timestamp (always), snapshot and targets (past half their lifetime) before devices see them expire."""
    root = Path(workdir).resolve()
    params = load_params(root / params_path)
    with one_writer():
        repository = open_repository(params.ota, root)
        with repository.writing("resign"):
            renewed = repository.resign(force=force)
    get_run_logger().info("re-signed %s", ", ".join(renewed))
    return renewed
