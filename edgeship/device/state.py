"""What a device holds: its identity, its installed models by slot, and its update events.

The state directory (one per device; `--state-dir`):

    device.json          DeviceIdentity: device_id, channel, target, repository_url, root
    state.json           DeviceState: active, last_known_good, fallback, shadow, probation, bad
    events.jsonl         UpdateEvent per line, append-only, `sequence` monotonic
    versions/<version>/<file>                the active and last-known-good model files
    fallback/<model>-<version>/<file>        the fallback model
    current -> versions/<version>/<file>     convenience link to the active model
    metadata/  downloads/                    the updater's TUF cache and files being verified

state.json is the truth and is replaced atomically; the `current` link follows
it. Applications and the runtime find files through `active_model()`,
`fallback_model()` and `shadow_model()`, never by guessing paths. Changes to
state.json go through `changing_state()`, which holds a short file lock, so
the updater, the runtime and `edgeship-device confirm` never lose each other's writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgeship.errors import ConfigError
from edgeship.files import sha256_of, write_atomic
from edgeship.ota.channel import ReleasedModel
from edgeship.records import UpdateReport  # noqa: F401  (re-exported: what the updater prints)

Slot = Literal["active", "fallback", "shadow"]
EventKind = Literal["installed", "refused", "confirmed", "rolled_back", "shadow_installed", "fallback_installed",
                    "stale_repository"]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class DeviceIdentity(_Wire):
    """device.json: who this device is and what it follows (written by `edgeship-device provision`)."""

    device_id: str
    channel: str = "stable"
    target: str | None = None
    repository_url: str | None = None
    root: str | None = None  # path of the trusted root.json
    provisioned: bool = True  # False: an id generated on first use, without `provision`


class Holder(_Wire):
    """The process running a probation: when it dies unconfirmed, the next start resumes it (device.probation)."""

    pid: int
    boot_id: str = ""
    start_ticks: int = 0


class Probation(_Wire):
    """The new active model must earn its place: `required` good inferences within `deadline_s` of time served.

    Time served runs on the device's monotonic clock (`served_s` up to `clock_at` on boot `clock_boot`), so a
    wall clock stepped forward cannot end a probation; `deadline` is the wall-clock estimate, for people.
    """

    version: str
    sha256: str
    started_at: datetime
    deadline: datetime
    deadline_s: float | None = None  # None: a record from before time served (the wall-clock deadline holds)
    served_s: float = 0.0
    clock_at: float | None = None  # CLOCK_MONOTONIC when served_s was brought up to date
    clock_boot: str = ""
    restarts: int = 0  # times the process running it died before deciding (each one resumes it)
    required: int = Field(ge=1)
    max_failures: int = Field(ge=0)
    latency_budget_ms: float | None = None
    successes: int = 0
    failures: int = 0
    slow: int = 0  # failures that were over the latency budget
    holder: Holder | None = None


class BadRelease(_Wire):
    sha256: str
    version: str
    reason: str
    at: datetime


class DeviceState(_Wire):
    """state.json."""

    active: ReleasedModel | None = None
    last_known_good: ReleasedModel | None = None
    fallback: ReleasedModel | None = None
    shadow: ReleasedModel | None = None
    probation: Probation | None = None
    bad: list[BadRelease] = Field(default_factory=list)
    stale: str | None = None  # why the repository is considered stale (expired metadata), if it is
    # sha256 of the model the active one replaced when it was installed (the last known good then): the runtime
    # compares the active model's answers with it. None after a return to the base or a rollback: nothing to compare.
    replaced: str | None = None
    generation: int = 0
    updated_at: datetime | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_old_layout(cls, data):
        # state.json of the updater before probation: current / previous / rejected
        if isinstance(data, dict) and "current" in data and "active" not in data:
            data = {**data, "active": data.get("current"), "last_known_good": data.get("previous")}
        return data

    def is_bad(self, sha256: str) -> bool:
        return any(b.sha256 == sha256 for b in self.bad)

    @classmethod
    def load(cls, state_dir: Path) -> "DeviceState":
        """The state in state_dir, or an empty state when nothing was installed yet."""
        path = Path(state_dir) / "state.json"
        return cls.model_validate_json(path.read_bytes()) if path.exists() else cls()

    def save(self, state_dir: Path) -> None:
        """Write state.json atomically (with a new generation, so readers notice) and fix the `current` link."""
        state_dir = Path(state_dir)
        self.generation += 1
        self.updated_at = datetime.now(timezone.utc)
        write_atomic(state_dir / "state.json", self.model_dump_json(indent=2).encode())
        sync_links(state_dir, self)


class UpdateEvent(_Wire):
    """One line of events.jsonl: what the updater (or probation) did, with a typed short reason."""

    at: datetime
    kind: EventKind
    version: str | None = None
    target: str | None = None
    slot: Slot = "active"
    reason: str = ""
    sequence: int = 0


@dataclass(frozen=True)
class InstalledModel:
    """A model file on the device, by slot."""

    path: Path
    model: ReleasedModel
    slot: Slot
    on_probation: bool = False

    @property
    def version(self) -> str:
        return self.model.version


# --- where files live -------------------------------------------------------------------

def slot_path(state_dir: Path, model: ReleasedModel, slot: Slot = "active") -> Path:
    """Where a model file of a slot is kept."""
    if slot == "active":
        return Path(state_dir) / "versions" / model.version / model.filename
    return Path(state_dir) / slot / f"{model.model_name or 'model'}-{model.version}" / model.filename


def _installed(state_dir: Path, model: ReleasedModel | None, slot: Slot, on_probation: bool = False):
    if model is None:
        return None
    path = slot_path(state_dir, model, slot)
    return InstalledModel(path, model, slot, on_probation) if path.is_file() else None


def active_model(state_dir: str | Path) -> InstalledModel | None:
    """The model the device should run now, and whether it is still on probation."""
    state = DeviceState.load(Path(state_dir))
    return _installed(Path(state_dir), state.active, "active", state.probation is not None)


def fallback_model(state_dir: str | Path) -> InstalledModel | None:
    state = DeviceState.load(Path(state_dir))
    return _installed(Path(state_dir), state.fallback, "fallback")


def shadow_model(state_dir: str | Path) -> InstalledModel | None:
    state = DeviceState.load(Path(state_dir))
    return _installed(Path(state_dir), state.shadow, "shadow")


def compared_model(state_dir: str | Path) -> InstalledModel | None:
    """The model the active one replaced (the last known good: what a rollback returns to), while it is installed
    and differs from the active model; the runtime compares answers with it (edgeship.device.shadow)."""
    state = DeviceState.load(Path(state_dir))
    good = state.last_known_good
    if good is None or state.active is None or good.sha256 == state.active.sha256 or state.replaced != good.sha256:
        return None
    return _installed(Path(state_dir), state.last_known_good, "active")


def installed_model(state_dir: str | Path) -> Path | None:
    """The file of the active model, or None."""
    found = active_model(state_dir)
    return found.path if found else None


def is_intact(state_dir: Path, model: ReleasedModel | None, slot: Slot = "active") -> bool:
    """Whether a model's file is in its slot with the right sha256."""
    if model is None:
        return False
    path = slot_path(state_dir, model, slot)
    return path.is_file() and sha256_of(path) == model.sha256


def sync_links(state_dir: Path, state: DeviceState) -> None:
    """Point `current` at the active model file (a new link renamed over the old one)."""
    link = state_dir / "current"
    if state.active is None:
        link.unlink(missing_ok=True)
        return
    temporary = link.with_name(f".current.{os.getpid()}")
    temporary.unlink(missing_ok=True)
    os.symlink(Path("versions") / state.active.version / state.active.filename, temporary)
    os.replace(temporary, link)


# --- changing state and logging events ------------------------------------------------------

@contextlib.contextmanager
def changing_state(state_dir: str | Path) -> Iterator[DeviceState]:
    """Load state.json under the state lock; the caller changes it and calls `save` (or not)."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".state.lock", "w") as handle:
        try:
            import fcntl
            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # not POSIX
            pass
        yield DeviceState.load(state_dir)


def log_event(state_dir: str | Path, kind: EventKind, version: str | None, target: str | None,
              reason: str = "", slot: Slot = "active") -> UpdateEvent:
    """Append an event to events.jsonl with the next sequence number."""
    path = Path(state_dir) / "events.jsonl"
    with open(Path(state_dir) / ".events.lock", "w") as lock:
        with contextlib.suppress(ImportError):
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)
        event = UpdateEvent(at=datetime.now(timezone.utc), kind=kind, version=version, target=target, slot=slot,
                            reason=reason, sequence=_last_sequence(path) + 1)
        with open(path, "a") as handle:
            handle.write(event.model_dump_json() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    return event


def read_events(state_dir: str | Path) -> list[UpdateEvent]:
    path = Path(state_dir) / "events.jsonl"
    if not path.exists():
        return []
    return [UpdateEvent.model_validate_json(line) for line in path.read_text().splitlines() if line.strip()]


def _last_sequence(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - 4096))
        lines = [line for line in handle.read().splitlines() if line.strip()]
    for line in reversed(lines):
        try:
            return int(json.loads(line)["sequence"])
        except (ValueError, KeyError):  # a torn last line (a crash mid-write): look one further back
            continue
    return 0


# --- identity -----------------------------------------------------------------------------

def provision(state_dir: str | Path, device_id: str | None = None, channel: str = "stable",
              target: str | None = None, repository_url: str | None = None, root: Path | None = None
              ) -> DeviceIdentity:
    """Write device.json (and copy the trusted root next to it); an id is generated when none is given."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    kept_root = None
    if root is not None:
        try:
            data = Path(root).read_bytes()
        except OSError as error:
            raise ConfigError(f"cannot read the trusted root {root} ({error.strerror}); give the repository's "
                              f"metadata/root.json") from None
        kept_root = state_dir / "root.json"
        write_atomic(kept_root, data)
    identity = DeviceIdentity(device_id=device_id or _new_id(), channel=channel, target=target,
                              repository_url=repository_url, root=str(kept_root) if kept_root else None)
    write_atomic(state_dir / "device.json", identity.model_dump_json(indent=2).encode())
    return identity


def settle_identity(state_dir: str | Path, command: str, *, device_id: str | None = None, channel: str | None = None,
                    target: str | None = None, repository_url: str | None = None, root: Path | None = None
                    ) -> DeviceIdentity:
    """The identity `update` and `serve` run as: device.json, after writing into it the provisioning flags given
    (as `provision` would: so every later command follows them, and a generated id is kept).

    Raises:
        ConfigError: the state directory is not provisioned (no repository, root or target), naming the command
            that provisions it.
    """
    current = load_identity(state_dir)
    given = {"device_id": device_id, "channel": channel, "target": target, "repository_url": repository_url,
             "root": root}
    if any(value is not None for value in given.values()):
        kept = current.model_dump() if current is not None else {}
        merged = {key: value if value is not None else kept.get(key) for key, value in given.items()}
        current = provision(state_dir, merged["device_id"], merged["channel"] or "stable", merged["target"],
                            merged["repository_url"], Path(merged["root"]) if merged["root"] else None)
    if current is None or not current.provisioned or not (current.repository_url and current.root and current.target):
        raise ConfigError(
            f"{state_dir} is not provisioned (no repository, trusted root or target in device.json): run "
            f"`edgeship-device provision --state-dir {state_dir} --repo-url URL --root root.json --target TARGET`, "
            f"or give `edgeship-device {command}` the same --repo-url, --root and --target")
    return current


def load_identity(state_dir: str | Path) -> DeviceIdentity | None:
    path = Path(state_dir) / "device.json"
    return DeviceIdentity.model_validate_json(path.read_bytes()) if path.exists() else None


def device_identity(state_dir: str | Path) -> DeviceIdentity:
    """The provisioned identity, or one generated once and kept (never the hostname: cloned images share it)."""
    state_dir = Path(state_dir)
    found = load_identity(state_dir)
    if found is not None:
        return found
    state_dir.mkdir(parents=True, exist_ok=True)
    identity = DeviceIdentity(device_id=_new_id(), provisioned=False)
    try:  # O_EXCL: two processes starting together agree on one id
        fd = os.open(state_dir / "device.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return load_identity(state_dir)  # type: ignore[return-value]
    with os.fdopen(fd, "w") as handle:
        handle.write(identity.model_dump_json(indent=2))
    return identity


def _new_id() -> str:
    return f"dev-{uuid.uuid4().hex[:16]}"
