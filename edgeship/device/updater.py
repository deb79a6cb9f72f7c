"""OTA updater: keeps one model on an edge device current, verified and runnable.

Each check (`DeviceUpdater.update()`) takes these steps:
  * refresh the TUF metadata from the repository, anchored in the root.json the
    device was provisioned with (python-tuf's ngclient: signatures, versions, expiry);
  * download and verify the channel descriptor `channels/<channel>.json` and pick
    its entry for this device's target: the current version when the device is in
    the rollout cohort, else the previous one;
  * download and verify the model file (length and sha256 from signed metadata,
    and the sha256 the descriptor names);
  * smoke-test it on its runtime with a seeded random batch (finite outputs, right batch);
  * install it as versions/<version>/<file> and swap the `current` symlink
    atomically; the model it replaces becomes `previous`, the last-known-good.

Any verification or smoke-test failure leaves the installed model untouched and
reports "refused". The state directory holds:

    metadata/       ngclient's trusted metadata cache
    downloads/      files being verified
    versions/<version>/<file>
    current  -> versions/<version>/<file>     the model to run
    previous -> versions/<version>/<file>     the last-known-good
    state.json      the installed and previous releases (DeviceState)

    >>> config = UpdaterConfig(repository_url="http://ota.example/repo", trusted_root=Path("root.json"),
    ...                        state_dir=Path("/var/lib/edgeship"), channel="stable", target="onnx-int8")
    >>> report = DeviceUpdater(config).update()
    >>> session = open_session("onnxruntime", installed_model(config.state_dir))

When the application finds the running model bad, `rollback_local()` swaps back
to the previous one and remembers the bad file so that later checks skip it.
This module imports no torch, TensorFlow, MLflow, Prefect or boto3.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tuf.api.exceptions import (DownloadHTTPError, DownloadLengthMismatchError, ExpiredMetadataError,
                                RepositoryError)
from tuf.ngclient import Updater as TufUpdater
from tuf.ngclient import UpdaterConfig as TufUpdaterConfig

from edgeship.device.runtimes import open_session
from edgeship.errors import EdgeshipError, SignatureError, SmokeTestFailed
from edgeship.files import sha256_of, write_atomic
from edgeship.ota.channel import ChannelDescriptor, ReleasedModel, cohort_position
from edgeship.records import UpdateReport

logger = logging.getLogger(__name__)

_SUCCESS = ("updated", "up_to_date", "not_in_cohort")
# Failures that mean "the repository served something we must not trust or run".
_REFUSALS = (RepositoryError, DownloadLengthMismatchError, SignatureError, SmokeTestFailed, ValidationError)


class NothingToRollBack(EdgeshipError):
    """A local rollback was asked for, but the device keeps no previous model."""


@dataclass(frozen=True)
class UpdaterConfig:
    """Settings of a device's updater.

    Args:
        repository_url: HTTP base of the OTA repository: metadata at <url>/metadata/, targets at <url>/targets/.
        trusted_root: The root.json the device was provisioned with (its trust anchor).
        state_dir: Where the updater keeps metadata, installed models and state.json.
        channel: The release channel to follow.
        target: The compile target this device runs, e.g. "onnx-int8".
        device_id: Stable identity for the rollout cohort (default: the hostname).
        threads: Threads for the smoke test's runtime session (0: the runtime's default).
    """

    repository_url: str
    trusted_root: Path
    state_dir: Path
    channel: str = "stable"
    target: str = "onnx-int8"
    device_id: str = field(default_factory=socket.gethostname)
    threads: int = 1


class DeviceState(BaseModel):
    """What is installed on the device (state.json)."""

    model_config = ConfigDict(extra="ignore")

    current: ReleasedModel | None = None
    previous: ReleasedModel | None = None
    rejected: list[str] = Field(default_factory=list)  # sha256 of files rolled back on this device
    updated_at: datetime | None = None

    @classmethod
    def load(cls, state_dir: Path) -> "DeviceState":
        """The state in state_dir, or an empty state when nothing was installed yet."""
        path = Path(state_dir) / "state.json"
        return cls.model_validate_json(path.read_bytes()) if path.exists() else cls()

    def save(self, state_dir: Path) -> None:
        """Write state.json atomically."""
        write_atomic(Path(state_dir) / "state.json", self.model_dump_json(indent=2).encode())


class _Outcome(Exception):
    """Ends a check early with a report status that is not a failure of verification."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class DeviceUpdater:
    """Checks the OTA repository and installs the model its channel names for this device."""

    def __init__(self, config: UpdaterConfig):
        self.config = config
        self.state_dir = Path(config.state_dir)

    def update(self) -> UpdateReport:
        """Run one check: refresh, choose, download, verify, smoke-test, install.

        Never raises for repository, network or model problems: the report's
        status and reason say what happened ("refused" for anything that failed
        verification or the smoke test; the installed model is then untouched).
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        offered = None
        try:
            with _locked(self.state_dir):
                state = DeviceState.load(self.state_dir)
                tuf = self._tuf_updater()
                tuf.refresh()
                descriptor = self._fetch_descriptor(tuf)
                wanted, in_cohort, why = self._choose(descriptor, state)
                offered = wanted.version
                if wanted.sha256 in state.rejected:
                    raise _Outcome("refused", f"version {wanted.version} was rolled back on this device; "
                                              f"waiting for a newer release")
                if _is_installed(self.state_dir, state, wanted):
                    status = "up_to_date" if in_cohort else "not_in_cohort"
                    return self._report(status, why, offered, state)
                downloaded = self._download(tuf, wanted)
                try:
                    smoke_test(wanted, downloaded, threads=self.config.threads)
                    state = _install(self.state_dir, state, wanted, downloaded)
                finally:
                    downloaded.unlink(missing_ok=True)
                logger.info("installed %s version %s", self.config.target, wanted.version)
                installed = f"installed version {wanted.version}" + (f"; {why}" if why else "")
                return self._report("updated", installed, offered, state)
        except _Outcome as outcome:
            return self._report(outcome.status, outcome.reason, offered)
        except _REFUSALS as error:
            logger.warning("refused the update: %s", error)
            return self._report("refused", _describe(error), offered)
        except Exception as error:  # network down, disk full: report, keep polling
            logger.warning("update check failed: %s", error)
            return self._report("error", _describe(error), offered)

    # --- one step each --------------------------------------------------------------

    def _tuf_updater(self) -> TufUpdater:
        """An ngclient Updater anchored in the provisioned root (its cache walks to newer roots)."""
        try:
            root = Path(self.config.trusted_root).read_bytes()
        except OSError as error:
            raise _Outcome("error", f"cannot read the trusted root {self.config.trusted_root} ({error.strerror}); "
                                    f"provision the device with the repository's root.json "
                                    f"(OtaRepository.trusted_root())") from None
        base = self.config.repository_url.rstrip("/")
        metadata_dir = self.state_dir / "metadata"
        metadata_dir.mkdir(parents=True, exist_ok=True)
        return TufUpdater(
            metadata_dir=str(metadata_dir),
            metadata_base_url=f"{base}/metadata/",
            target_dir=str(self.state_dir / "downloads"),
            target_base_url=f"{base}/targets/",
            config=TufUpdaterConfig(app_user_agent="edgeship-updater"),
            bootstrap=root,
        )

    def _fetch_descriptor(self, tuf: TufUpdater) -> ChannelDescriptor:
        """Download and verify the channel descriptor."""
        path = ChannelDescriptor.target_path(self.config.channel)
        info = tuf.get_targetinfo(path)
        if info is None:
            raise _Outcome("error", f"channel '{self.config.channel}' is not published in "
                                    f"{self.config.repository_url}; publish a release to it, or fix --channel")
        with self._download_dir() as directory:
            local = Path(tuf.download_target(info, str(directory / "channel.json")))
            descriptor = ChannelDescriptor.from_bytes(local.read_bytes())
        if descriptor.channel != self.config.channel:
            raise SignatureError(f"{path} holds the descriptor of channel '{descriptor.channel}'")
        return descriptor

    def _choose(self, descriptor: ChannelDescriptor, state: DeviceState) -> tuple[ReleasedModel, bool, str]:
        """The release this device should run: the channel's version inside the cohort, else its previous."""
        target = self.config.target
        entry = descriptor.targets.get(target)
        if entry is None:
            raise _Outcome("error", f"channel '{descriptor.channel}' ships no model for target '{target}' "
                                    f"(it has {sorted(descriptor.targets)}); fix --target")
        position = cohort_position(self.config.device_id, descriptor.model_name, entry.version)
        if position < descriptor.rollout_fraction:
            return entry.without_previous(), True, ""
        why = (f"outside the {descriptor.rollout_fraction:.0%} rollout of version {entry.version} "
               f"(cohort position {position:.3f})")
        if entry.previous is None:
            installed = state.current.version if state.current else "nothing"
            raise _Outcome("not_in_cohort", f"{why}, and the channel names no previous version; keeping {installed}")
        return entry.previous, False, f"{why}; following the previous version {entry.previous.version}"

    def _download(self, tuf: TufUpdater, wanted: ReleasedModel) -> Path:
        """Download the model file; ngclient checks length and hashes, then the descriptor's sha256 is checked."""
        info = tuf.get_targetinfo(wanted.target_path)
        if info is None:
            raise SignatureError(f"the channel names {wanted.target_path}, which the signed targets metadata "
                                 f"does not list")
        if info.length != wanted.bytes or info.hashes.get("sha256") != wanted.sha256:
            raise SignatureError(f"the channel and the signed targets metadata disagree on {wanted.target_path}")
        directory = self.state_dir / "downloads"
        directory.mkdir(parents=True, exist_ok=True)
        local = directory / f"{wanted.sha256}.{wanted.filename}"
        tuf.download_target(info, str(local))
        if sha256_of(local) != wanted.sha256:
            local.unlink(missing_ok=True)
            raise SignatureError(f"{wanted.target_path} does not have the sha256 the channel names")
        return local

    @contextlib.contextmanager
    def _download_dir(self) -> Iterator[Path]:
        directory = self.state_dir / "downloads"
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as temporary:
            yield Path(temporary)

    def _report(self, status: str, reason: str, offered: str | None, state: DeviceState | None = None) -> UpdateReport:
        state = state or _safe_state(self.state_dir)
        return UpdateReport(
            status=status, reason=reason, channel=self.config.channel, target=self.config.target,
            offered_version=offered,
            installed_version=state.current.version if state.current else None,
            previous_version=state.previous.version if state.previous else None,
            model_path=installed_model(self.state_dir))


def smoke_test(model: ReleasedModel, path: Path, threads: int = 1) -> None:
    """Load a model on its runtime and run one seeded random batch of its input spec.

    Raises:
        SmokeTestFailed: It does not load or run, or its output has the wrong batch or non-finite values.
    """
    try:
        session = open_session(model.runtime, path, threads=threads)
        spec = model.inputs[0] if model.inputs else session.inputs[0]
        shape = tuple(d if d > 0 else 1 for d in spec.shape)
        rng = np.random.default_rng(0)
        dtype = np.dtype(spec.dtype)
        batch = (rng.standard_normal(shape) if dtype.kind == "f" else rng.integers(0, 8, shape)).astype(dtype)
        output = np.asarray(session.run(batch))
    except Exception as error:  # each runtime raises its own types
        raise SmokeTestFailed(f"version {model.version} ({model.filename}) does not run on {model.runtime}: "
                              f"{error}") from None
    if output.ndim == 0 or output.shape[0] != shape[0]:
        raise SmokeTestFailed(f"version {model.version} returned shape {output.shape} for a batch of {shape[0]}")
    if output.dtype.kind == "f" and not np.all(np.isfinite(output)):
        raise SmokeTestFailed(f"version {model.version} returned NaN or infinite values")


def installed_model(state_dir: str | Path) -> Path | None:
    """The model file the device should run now (the resolved `current` link), or None."""
    link = Path(state_dir) / "current"
    if not link.is_symlink():
        return None
    path = link.resolve()
    return path if path.is_file() else None


def rollback_local(state_dir: str | Path) -> UpdateReport:
    """Swap back to the previous model, and skip the bad one in later checks until a newer release.

    Raises:
        NothingToRollBack: No previous model is kept.
    """
    state_dir = Path(state_dir)
    with _locked(state_dir):
        state = DeviceState.load(state_dir)
        previous = state.previous
        if state.current is None or previous is None or not _model_path(state_dir, previous).is_file():
            raise NothingToRollBack(f"{state_dir} keeps no previous model to roll back to; "
                                    f"roll the channel back instead (rollback_release)")
        bad = state.current
        _point(state_dir / "current", previous)
        (state_dir / "previous").unlink(missing_ok=True)
        state = DeviceState(current=previous, previous=None, rejected=[*state.rejected, bad.sha256],
                            updated_at=datetime.now(timezone.utc))
        state.save(state_dir)
    logger.warning("rolled back from version %s to %s", bad.version, previous.version)
    return UpdateReport(status="updated", installed_version=previous.version, model_path=installed_model(state_dir),
                        reason=f"rolled back locally from version {bad.version}; it will not be installed again")


# --- installing ------------------------------------------------------------------------

def _model_path(state_dir: Path, model: ReleasedModel) -> Path:
    return state_dir / "versions" / model.version / model.filename


def _is_installed(state_dir: Path, state: DeviceState, wanted: ReleasedModel) -> bool:
    """Whether `current` already holds this exact file, intact."""
    path = installed_model(state_dir)
    return (state.current is not None and state.current.sha256 == wanted.sha256
            and path is not None and sha256_of(path) == wanted.sha256)


def _install(state_dir: Path, state: DeviceState, wanted: ReleasedModel, downloaded: Path) -> DeviceState:
    """Move a verified, smoke-tested file into place and swap the links; returns the new state."""
    final = _model_path(state_dir, wanted)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(downloaded, final)
    changed = state.current is not None and state.current.sha256 != wanted.sha256
    previous = state.current if changed else state.previous
    if previous is not None and _model_path(state_dir, previous).is_file():
        _point(state_dir / "previous", previous)
    else:
        previous = None
        (state_dir / "previous").unlink(missing_ok=True)
    _point(state_dir / "current", wanted)
    new_state = DeviceState(current=wanted, previous=previous, rejected=state.rejected,
                            updated_at=datetime.now(timezone.utc))
    new_state.save(state_dir)
    _prune(state_dir, keep={wanted.version} | ({previous.version} if previous else set()))
    return new_state


def _point(link: Path, model: ReleasedModel) -> None:
    """Make `link` point at a model file in one step: a new link renamed over the old one."""
    temporary = link.with_name(f".{link.name}.{os.getpid()}")
    temporary.unlink(missing_ok=True)
    os.symlink(Path("versions") / model.version / model.filename, temporary)
    os.replace(temporary, link)


def _prune(state_dir: Path, keep: set[str]) -> None:
    """Delete installed versions other than current and previous (devices have little storage)."""
    for directory in (state_dir / "versions").iterdir():
        if directory.name not in keep:
            shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """One updater at a time per state directory (ngclient's cache is single-instance too)."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        yield
        return
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _Outcome("error", f"another updater is working in {state_dir}; let it finish") from None
        yield


def _safe_state(state_dir: Path) -> DeviceState:
    try:
        return DeviceState.load(state_dir)
    except (OSError, ValueError):
        return DeviceState()


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {str(error) or repr(error)}"
    if isinstance(error, DownloadHTTPError) and error.status_code == 403:
        text += ("; the repository refuses anonymous reads: give its S3 prefix a public-read bucket policy "
                 "(edgeship.ota.storage.public_read_policy) or serve it through a CDN")
    elif isinstance(error, ExpiredMetadataError):
        text += "; the publisher must re-sign the repository (OtaRepository.commit()) before it expires"
    elif isinstance(error, DownloadHTTPError) and error.status_code == 404:
        text += "; check --repo-url: metadata must be at <url>/metadata/"
    return text


# --- command line (edgeship-device update) ------------------------------------------

def add_update_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `edgeship-device update` to a parser."""
    parser.add_argument("--repo-url", required=True,
                        help="HTTP base of the OTA repository (metadata at <url>/metadata/, targets at <url>/targets/)")
    parser.add_argument("--root", required=True, type=Path,
                        help="the trusted root.json this device was provisioned with")
    parser.add_argument("--state-dir", required=True, type=Path,
                        help="where installed models, metadata and state.json live")
    parser.add_argument("--channel", default="stable", help="release channel to follow (default: stable)")
    parser.add_argument("--target", required=True, help="compile target this device runs, e.g. onnx-int8")
    parser.add_argument("--device-id", default=socket.gethostname(),
                        help="stable device identity for rollout cohorts (default: hostname)")
    parser.add_argument("--threads", type=int, default=1, help="runtime threads for the smoke test (0: default)")
    parser.add_argument("--interval", type=float, default=0, metavar="SECONDS",
                        help="check again every SECONDS (0: check once and exit)")


def run_update(args: argparse.Namespace) -> int:
    """Run checks as the flags say, printing each UpdateReport as one JSON line.

    Returns:
        The exit status of the last check: 0 for updated, up_to_date or not_in_cohort, else 1.
    """
    updater = DeviceUpdater(UpdaterConfig(
        repository_url=args.repo_url, trusted_root=args.root, state_dir=args.state_dir, channel=args.channel,
        target=args.target, device_id=args.device_id, threads=args.threads))
    while True:
        report = updater.update()
        print(report.model_dump_json(), flush=True)
        code = 0 if report.status in _SUCCESS else 1
        if args.interval <= 0:
            return code
        try:
            # jitter, so a fleet started together does not poll together
            time.sleep(args.interval * random.uniform(0.9, 1.1))
        except KeyboardInterrupt:
            return code
