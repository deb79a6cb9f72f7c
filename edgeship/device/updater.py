"""OTA updater: keeps one model on an edge device current, verified, and proven on the device.

Each check (`DeviceUpdater.update()`) is a sequence of typed steps; any failure
leaves the active model in place and is reported with a typed reason:

  * recover: a probation whose deadline passed or whose process died is rolled back;
  * refresh the TUF metadata, anchored in the provisioned root (python-tuf's ngclient:
    signatures, versions, expiry). Expired metadata: keep the model, report `stale`;
  * fetch the channel descriptor and this target's entry; make sure the entry's
    fallback model is installed (always kept, for the runtime to switch to), and its
    shadow model on devices in the shadow's cohort (run beside the active one, never answering);
  * choose: the candidate when this device is in its cohort, else the base;
    a version marked bad on this device is refused until a newer one appears;
  * download and verify the file (length and sha256 from signed metadata, and the descriptor's);
  * smoke-test against the release's golden vectors (edgeship.device.install);
  * swap: one atomic write of state.json, the new model active and on probation,
    the one it replaced kept as last-known-good;
  * probation (edgeship.device.probation): the updater runs the golden inputs N times
    within the latency budget and confirms, or rolls back by itself. With
    `self_check=False` the application confirms through the runtime or `edgeship-device confirm`.

    >>> config = UpdaterConfig(repository_url="http://ota.example/repo", trusted_root=Path("root.json"),
    ...                        state_dir=Path("/var/lib/edgeship"), channel="stable", target="onnx-int8")
    >>> report = DeviceUpdater(config).update()
    >>> active_model(config.state_dir).path

This module imports no torch, TensorFlow, MLflow, Prefect or boto3.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import ValidationError
from tuf.api.exceptions import DownloadHTTPError, DownloadLengthMismatchError, ExpiredMetadataError, RepositoryError
from tuf.ngclient import Updater as TufUpdater, UpdaterConfig as TufUpdaterConfig

from edgeship.device import probation
from edgeship.device.install import Golden, clear_downloads, pause_point, place, prune, random_batch, smoke_test
from edgeship.device.probation import ProbationPolicy
from edgeship.device.detections import open_model
from edgeship.device.download import BoundedFetcher
from edgeship.device.state import (BadRelease, DeviceState, UpdateReport, changing_state, device_identity,
                                   installed_model, is_intact, log_event, slot_path)
from edgeship.device.field_samples import keep_field_sampling
from edgeship.device.telemetry import keep_drift_reference
from edgeship.errors import NothingToRollBack, SignatureError, SmokeTestFailed
from edgeship.files import sha256_of
from edgeship.ota.channel import ChannelDescriptor, ChannelEntry, ReleasedModel

logger = logging.getLogger(__name__)

SUCCESS = ("updated", "up_to_date", "not_in_cohort")
# Failures that mean "the repository served something we must not trust or run".
_REFUSALS = (RepositoryError, DownloadLengthMismatchError, SignatureError, SmokeTestFailed, ValidationError)


@dataclass(frozen=True)
class UpdaterConfig:
    """Settings of a device's updater.

    Args:
        repository_url: HTTP base of the OTA repository: metadata at <url>/metadata/, targets at <url>/targets/.
        trusted_root: The root.json the device was provisioned with (its trust anchor).
        state_dir: Where the updater keeps metadata, installed models and state.json.
        channel: The release channel to follow.
        target: The compile target this device runs, e.g. "onnx-int8".
        device_id: Identity for rollout cohorts; None: the provisioned one in device.json (or one generated
            once and kept there). Never the hostname: devices cloned from one image share it.
        threads: Threads for the smoke test's runtime session (0: the runtime's default).
        probation: How many good inferences confirm a new model, how many bad ones roll it back, by when.
        self_check: The updater runs the probation itself on the golden inputs right after the swap.
        check_timeout_s: A check ends (and frees the device's update lock) by this time, whatever the network does.
        min_download_bytes_per_s, download_grace_s: A download slower than this over `download_grace_s`, or past
            `download_grace_s` plus its signed length at this rate, fails (edgeship.device.download).
    """

    repository_url: str
    trusted_root: Path
    state_dir: Path
    channel: str = "stable"
    target: str = "onnx-int8"
    device_id: str | None = None
    threads: int = 1
    probation: ProbationPolicy = field(default_factory=ProbationPolicy)
    self_check: bool = True
    check_timeout_s: float = 900.0
    min_download_bytes_per_s: float = 4096.0
    download_grace_s: float = 30.0


class _Outcome(Exception):
    """Ends a check early with a report status (and the event to log, if any)."""

    def __init__(self, status: str, reason: str, event: str | None = None):
        super().__init__(reason)
        self.status, self.reason, self.event = status, reason, event


class DeviceUpdater:
    """Checks the OTA repository and installs the model its channel names for this device."""

    def __init__(self, config: UpdaterConfig):
        self.config = config
        self.state_dir = Path(config.state_dir)
        self.device_id = config.device_id or device_identity(self.state_dir).device_id

    def update(self) -> UpdateReport:
        """Run one check. Never raises for repository, network or model problems: the report says what happened."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        offered = None
        self._check_deadline = time.monotonic() + self.config.check_timeout_s
        try:
            with _locked(self.state_dir):
                clear_downloads(self.state_dir)
                recovered = probation.expire(self.state_dir)
                tuf = self._refresh()
                entry = self._entry(tuf)
                self._ensure_side_models(tuf, entry)
                keep_drift_reference(self.state_dir, entry.drift_reference)  # the device's own drift score
                keep_field_sampling(self.state_dir, entry.field_sampling)    # what the channel asks to sample
                wanted, in_cohort = entry.choose(self.device_id, self._model_name)
                if wanted is None:
                    raise _Outcome("not_in_cohort", "outside the candidate's cohort and the channel names no base; "
                                                    "keeping what is installed")
                offered = wanted.version
                # "not in cohort": a rollout is under way and this device stays on the base
                try:
                    status = self._install(tuf, wanted, in_cohort or entry.candidate is None)
                finally:
                    clear_downloads(self.state_dir)
                if recovered is not None and status != "rolled_back":
                    return self._report("rolled_back", recovered.reason, offered)
                return self._report(status, self._why, offered)
        except _Outcome as outcome:
            if outcome.event:
                log_event(self.state_dir, outcome.event, offered, self.config.target, outcome.reason)
            return self._report(outcome.status, outcome.reason, offered)
        except _REFUSALS as error:
            logger.warning("refused the update: %s", error)
            log_event(self.state_dir, "refused", offered, self.config.target, _reason(error))
            return self._report("refused", _describe(error), offered)
        except Exception as error:  # network down, disk full: report, keep polling
            logger.warning("update check failed: %s", error)
            return self._report("error", _describe(error), offered)

    # --- one step each --------------------------------------------------------------

    def _refresh(self) -> TufUpdater:
        tuf = self._tuf_updater()
        try:
            tuf.refresh()
        except ExpiredMetadataError as error:
            with changing_state(self.state_dir) as state:
                first = state.stale is None
                state.stale = str(error)
                state.save(self.state_dir)
            raise _Outcome("stale", f"the repository's metadata expired ({error}); keeping the installed model. "
                                    f"The publisher must re-sign it: edgeship resign",
                           "stale_repository" if first else None) from None
        with changing_state(self.state_dir) as state:
            if state.stale is not None:
                state.stale = None
                state.save(self.state_dir)
        return tuf

    def _tuf_updater(self) -> TufUpdater:
        """An ngclient Updater anchored in the provisioned root (its cache walks to newer roots)."""
        try:
            root = Path(self.config.trusted_root).read_bytes()
        except OSError as error:
            raise _Outcome("error", f"cannot read the trusted root {self.config.trusted_root} ({error.strerror}); "
                                    f"provision the device with the repository's metadata/root.json "
                                    f"(edgeship-device provision --root ...)") from None
        base = self.config.repository_url.rstrip("/")
        metadata_dir = self.state_dir / "metadata"
        metadata_dir.mkdir(parents=True, exist_ok=True)
        return TufUpdater(metadata_dir=str(metadata_dir), metadata_base_url=f"{base}/metadata/",
                          target_dir=str(self.state_dir / "downloads"), target_base_url=f"{base}/targets/",
                          config=TufUpdaterConfig(app_user_agent="edgeship-updater"), bootstrap=root,
                          fetcher=BoundedFetcher(self.config.min_download_bytes_per_s, self.config.download_grace_s,
                                                 self._check_deadline, app_user_agent="edgeship-updater"))

    def _entry(self, tuf: TufUpdater) -> ChannelEntry:
        """Download and verify the channel descriptor; this target's entry."""
        path = ChannelDescriptor.target_path(self.config.channel)
        info = tuf.get_targetinfo(path)
        if info is None:
            raise _Outcome("error", f"channel '{self.config.channel}' is not published in "
                                    f"{self.config.repository_url}; publish a release to it, or fix --channel")
        with self._download_dir() as directory:
            descriptor = ChannelDescriptor.from_bytes(Path(tuf.download_target(info, str(directory / "c"))).read_bytes())
        if descriptor.channel != self.config.channel:
            raise SignatureError(f"{path} holds the descriptor of channel '{descriptor.channel}'")
        entry = descriptor.targets.get(self.config.target)
        if entry is None:
            raise _Outcome("error", f"channel '{descriptor.channel}' ships no model for target '{self.config.target}' "
                                    f"(it has {sorted(descriptor.targets)}); fix --target")
        self._model_name = descriptor.model_name
        return entry

    def _install(self, tuf: TufUpdater, wanted: ReleasedModel, in_cohort: bool) -> str:
        state = DeviceState.load(self.state_dir)
        self._why = "" if in_cohort else f"on the base version {wanted.version}"
        bad = next((b for b in state.bad if b.sha256 == wanted.sha256), None)
        if bad is not None:
            raise _Outcome("refused", f"version {wanted.version} was marked bad on this device ({bad.reason}); "
                                      f"waiting for a newer release")
        if state.active is not None and state.active.sha256 == wanted.sha256 and is_intact(self.state_dir, wanted):
            if state.probation is not None and state.probation.holder is None and self.config.self_check \
                    and probation.hold(self.state_dir):  # its check was cut short (power, SIGKILL): run it again
                event = self._self_check(wanted, self._golden(tuf, wanted))
                rolled_back = event is not None and event.kind == "rolled_back"
                self._why = event.reason if rolled_back else f"resumed the probation of version {wanted.version}" + (
                    "; confirmed" if event is not None else "")
                return "rolled_back" if rolled_back else "updated"
            return "up_to_date" if in_cohort else "not_in_cohort"
        good = state.last_known_good
        if good is not None and good.sha256 == wanted.sha256 and is_intact(self.state_dir, good):
            with changing_state(self.state_dir) as state:  # back to the base (the candidate was withdrawn)
                left = state.active
                if state.probation is None and is_intact(self.state_dir, left):
                    state.last_known_good = left  # confirmed here, only withdrawn: keep it as the other version
                state.active, state.probation, state.replaced = good, None, None
                state.save(self.state_dir)
            log_event(self.state_dir, "installed", good.version, self.config.target,
                      f"back to the base from v{left.version if left else '?'}")
            self._why = f"back to version {good.version}"
            return "updated"

        pause_point(self.state_dir, "download")
        downloaded = self._download(tuf, wanted, wanted.target_path, wanted.sha256, wanted.bytes)
        pause_point(self.state_dir, "verify")
        golden = self._golden(tuf, wanted)
        pause_point(self.state_dir, "smoke_test")
        try:
            smoke_test(wanted, downloaded, golden, threads=self.config.threads)
        except SmokeTestFailed as error:
            downloaded.unlink(missing_ok=True)
            if golden is not None or str(error).startswith("model spec"):  # verified and wrong: never again
                self._mark_bad(wanted, "golden vectors" if golden is not None else "model spec")
            raise error
        place(self.state_dir, wanted, downloaded)
        pause_point(self.state_dir, "swap")
        holder = probation.this_process() if self.config.self_check else None
        with changing_state(self.state_dir) as state:
            if state.probation is None and is_intact(self.state_dir, state.active):
                state.last_known_good = state.active  # a confirmed model: what a failed probation returns to
            state.active, state.replaced = wanted, state.last_known_good.sha256 if state.last_known_good else None
            state.probation = probation.begin(wanted, self.config.probation, holder)
            state.save(self.state_dir)
            prune(self.state_dir, state)
        log_event(self.state_dir, "installed", wanted.version, self.config.target,
                  "in the candidate's cohort" if in_cohort else "base")
        logger.info("installed %s version %s, on probation", self.config.target, wanted.version)
        self._why = f"installed version {wanted.version}" + ("" if in_cohort else " (the base)")
        if not self.config.self_check:
            return "updated"
        pause_point(self.state_dir, "probation")
        event = self._self_check(wanted, golden)
        if event is not None and event.kind == "rolled_back":
            self._why = event.reason
            return "rolled_back"
        self._why += "; confirmed" if event is not None else "; on probation until the application confirms"
        return "updated"

    def _self_check(self, model: ReleasedModel, golden: Golden | None):
        """Probation run by the updater: the golden inputs, one at a time, timed against the budget."""
        kept = DeviceState.load(self.state_dir).probation  # a resumed one needs what it still lacks
        rounds = (kept.required - kept.successes + kept.max_failures - kept.failures + 1) if kept else 1
        path = slot_path(self.state_dir, model)
        try:
            session = open_model(model.runtime, path, threads=self.config.threads, postprocess=model.postprocess)
            inputs = [golden.input(i) for i in range(len(golden))] if golden else [random_batch(model, session)]
            session.run(inputs[0])  # warm-up: the first run pays for allocation, not the model
        except Exception as error:
            return probation.fail(self.state_dir, "probation: errors", f"does not load after the swap: {error}")
        for i in range(rounds):
            index = i % len(inputs)
            ok = True
            start = time.perf_counter()
            try:
                output = session.run(inputs[index])
            except Exception:
                ok = False
            latency_ms = (time.perf_counter() - start) * 1000
            if ok and golden is not None:
                ok = golden.mismatch(np.asarray(output), index) is None
            event = probation.record_inference(self.state_dir, latency_ms, ok)
            if event is not None:
                return event
        probation.release_hold(self.state_dir)  # undecided: the application's answers go on counting
        return None

    def _ensure_side_models(self, tuf: TufUpdater, entry: ChannelEntry) -> None:
        """The fallback (every device) and the shadow (devices in its cohort) are installed beside the active model.

        Neither goes on probation: the fallback is the safety net, the shadow never answers.
        A shadow the channel no longer names for this device is dropped.
        """
        shadow = entry.shadow if entry.runs_shadow(self.device_id, self._model_name) else None
        for slot, model, event in (("fallback", entry.fallback, "fallback_installed"),
                                   ("shadow", shadow, "shadow_installed")):
            installed = getattr(DeviceState.load(self.state_dir), slot)
            if model is None:
                if slot == "shadow" and installed is not None:
                    with changing_state(self.state_dir) as state:
                        state.shadow = None
                        state.save(self.state_dir)
                        prune(self.state_dir, state)
                continue
            if installed is not None and installed.sha256 == model.sha256 and is_intact(self.state_dir, model, slot):
                continue
            try:
                downloaded = self._download(tuf, model, model.target_path, model.sha256, model.bytes)
                smoke_test(model, downloaded, self._golden(tuf, model), threads=self.config.threads)
            except _REFUSALS as error:
                log_event(self.state_dir, "refused", model.version, self.config.target, _reason(error), slot)
                logger.warning("refused the %s model: %s", slot, error)
                continue
            place(self.state_dir, model, downloaded, slot)
            with changing_state(self.state_dir) as state:
                setattr(state, slot, model)
                state.save(self.state_dir)
                prune(self.state_dir, state)
            log_event(self.state_dir, event, model.version, self.config.target, model.label, slot)

    def _golden(self, tuf: TufUpdater, model: ReleasedModel) -> Golden | None:
        if model.golden is None:
            return None
        spec = model.golden
        path = self._download(tuf, model, spec.target_path, spec.sha256, spec.bytes)
        try:
            return Golden.load(path, spec)
        except (OSError, ValueError, KeyError) as error:
            raise SmokeTestFailed(f"golden vectors of version {model.version} cannot be read: {error}") from None

    def _download(self, tuf: TufUpdater, model: ReleasedModel, target_path: str, sha256: str, length: int) -> Path:
        """Download a file; ngclient checks length and hashes, then the descriptor's sha256 is checked."""
        info = tuf.get_targetinfo(target_path)
        if info is None:
            raise SignatureError(f"the channel names {target_path}, which the signed targets metadata does not list")
        if info.length != length or info.hashes.get("sha256") != sha256:
            raise SignatureError(f"the channel and the signed targets metadata disagree on {target_path}")
        directory = self.state_dir / "downloads"
        directory.mkdir(parents=True, exist_ok=True)
        local = directory / f"{sha256}.{target_path.rpartition('/')[2]}"
        tuf.download_target(info, str(local))
        if sha256_of(local) != sha256:
            local.unlink(missing_ok=True)
            raise SignatureError(f"{target_path} does not have the sha256 the channel names")
        return local

    def _mark_bad(self, model: ReleasedModel, reason: str) -> None:
        from datetime import datetime, timezone

        with changing_state(self.state_dir) as state:
            if not state.is_bad(model.sha256):
                state.bad.append(BadRelease(sha256=model.sha256, version=model.version, reason=reason,
                                            at=datetime.now(timezone.utc)))
                state.save(self.state_dir)

    @contextlib.contextmanager
    def _download_dir(self) -> Iterator[Path]:
        directory = self.state_dir / "downloads"
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as temporary:
            yield Path(temporary)

    def _report(self, status: str, reason: str, offered: str | None) -> UpdateReport:
        state = _safe_state(self.state_dir)
        return UpdateReport(
            status=status, reason=reason, channel=self.config.channel, target=self.config.target,
            offered_version=offered, device_id=self.device_id,
            installed_version=state.active.version if state.active else None,
            previous_version=state.last_known_good.version if state.last_known_good else None,
            fallback_version=state.fallback.version if state.fallback else None,
            on_probation=state.probation is not None, model_path=installed_model(self.state_dir))

    _why = ""
    _model_name = ""


def rollback_local(state_dir: str | Path, reason: str = "rolled back by the operator") -> UpdateReport:
    """Make the last-known-good active again and mark the active model bad until a newer release.

    Raises:
        NothingToRollBack: No last-known-good model is kept.
    """
    state_dir = Path(state_dir)
    event = probation.roll_back(state_dir, reason)
    if event is None:
        raise NothingToRollBack(f"{state_dir} keeps no last-known-good model to roll back to; "
                                f"roll the channel back instead (edgeship rollback)")
    state = DeviceState.load(state_dir)
    return UpdateReport(status="rolled_back", installed_version=state.active.version if state.active else None,
                        model_path=installed_model(state_dir),
                        reason=f"rolled back locally from version {event.version}; it will not be installed again")


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """One updater at a time per state directory (ngclient's cache is single-instance too)."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        yield
        return
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


def _reason(error: BaseException) -> str:
    """The typed short reason of a refusal ("signature", "golden vectors", "smoke test", ...)."""
    text = str(error)
    if isinstance(error, SmokeTestFailed):
        return "golden vectors" if text.startswith("golden vectors") else "smoke test"
    if isinstance(error, (SignatureError, DownloadLengthMismatchError)) or "Mismatch" in type(error).__name__:
        return "signature"
    if isinstance(error, RepositoryError):
        return f"metadata: {type(error).__name__}"
    return type(error).__name__


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {str(error) or repr(error)}"
    if isinstance(error, DownloadHTTPError) and error.status_code == 403:
        text += ("; the repository refuses anonymous reads: give its S3 prefix a public-read bucket policy "
                 "(edgeship.ota.storage.public_read_policy) or serve it through a CDN")
    elif isinstance(error, DownloadHTTPError) and error.status_code == 404:
        text += "; check --repo-url: metadata must be at <url>/metadata/"
    return text
