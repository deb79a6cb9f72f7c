"""The signed OTA repository (TUF), as the pipeline writes it.

Devices trust a model file only when TUF metadata signed by the keystore's keys
vouches for its length and hash. `OtaRepository` keeps the four top-level roles
in a `Storage` (local directory or S3) in the layout python-tuf's ngclient
fetches with consistent snapshots on:

    metadata/1.root.json, 2.root.json, ...   every root version (devices walk the chain)
    metadata/root.json                       the newest root (what a device is provisioned with)
    metadata/<V>.targets.json                every targets version: target paths -> length, sha256
    metadata/<V>.snapshot.json               every snapshot version: the current targets version
    metadata/timestamp.json                  the one mutable file: the current snapshot version
    targets/<dir>/<sha256>.<name>            each target file under a hash-prefixed name

Every file but timestamp.json (and the root.json copy) is written once under a
new name, and timestamp.json is written last, so a device that reads the
repository mid-publish sees the old release or the new one, never a mix.

Workflow: opening a repository creates and signs version 1 of every role when
the storage holds no metadata at all, otherwise loads the current metadata and
checks that the keystore holds the targets, snapshot and timestamp keys its root
trusts (root's own keys are not needed: only `edgeship keys` changes root, see
edgeship.ota.root). Metadata that is partly missing is an error naming the file,
never a fresh start. Every write happens inside `writing()`, which takes the
storage's writer lock (edgeship.ota.lock) and re-reads the metadata under it;
`add_target` uploads files and stages them; `commit` signs a new targets,
snapshot and timestamp version.

    >>> repository = OtaRepository(open_storage("ota-repo"), Keystore(".edgeship/keys"))
    >>> with repository.writing("publish v7"):
    ...     repository.add_target("models/digits/7/onnx-int8/model.onnx", Path("model.onnx"))
    ...     repository.commit()
    >>> Path("root.json").write_bytes(repository.trusted_root())   # provision devices with this

Expiry: timestamp after `timestamp_expiry_hours` (a day: a freeze attack lasts at
most that long), snapshot after a week, targets after `expiry_days`. `resign()`
(the Prefect deployment `publish/resign`, `edgeship resign`) renews whatever is
past half its lifetime, and always the timestamp.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import posixpath
from datetime import datetime, timedelta, timezone
from collections.abc import Iterator
from os import PathLike
from pathlib import Path

from tuf.api.exceptions import LengthOrHashMismatchError, RepositoryError
from tuf.api.metadata import Metadata, MetaFile, Root, Signed, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer
from tuf.repository import Repository

from edgeship.config.shipping import OtaParams
from edgeship.errors import ConfigError, SignatureError
from edgeship.ota.keys import ROLES, Keystore
from edgeship.ota.lock import writer_lock
from edgeship.ota.storage import Storage, StorageError, open_storage

logger = logging.getLogger(__name__)

ROOT_EXPIRY = timedelta(days=365)
_NEW_SIGNED: dict[str, type[Signed]] = {
    Root.type: Root, Targets.type: Targets, Snapshot.type: Snapshot, Timestamp.type: Timestamp,
}


class KeystoreMismatch(ConfigError):
    """The keystore does not hold the keys that the repository's root metadata trusts."""


class OtaRepository(Repository):
    """A TUF repository of model files and channel descriptors, kept in a `Storage`.

    Args:
        storage: Where the metadata and target files live.
        keystore: The signing keys; on a new repository they become the trusted keys.
        expiry_days: Lifetime of targets metadata.
        timestamp_expiry_hours: Lifetime of timestamp metadata (the freeze window).
        snapshot_expiry_days: Lifetime of snapshot metadata.
        root_keys, root_threshold: For a new repository only: how many root keys, and how many must sign.
        lock: Where writers take the writer lease (edgeship.ota.lock): a SQL URL (postgresql://...), or None for
            EDGESHIP_OTA_LOCK, else the storage itself.

    Raises:
        KeystoreMismatch: The repository exists and was signed with other keys.
        SignatureError: The stored metadata does not verify against its own root.
        StorageError: The storage cannot be read or written, or holds an incomplete repository.
    """

    def __init__(self, storage: Storage, keystore: Keystore, expiry_days: int = 30,
                 timestamp_expiry_hours: float = 24, snapshot_expiry_days: float = 7,
                 root_keys: int = 1, root_threshold: int = 1, lock: str | None = None):
        self.storage = storage
        self.lock = lock
        self.keystore = keystore
        self.expiry = {Root.type: ROOT_EXPIRY, Targets.type: timedelta(days=expiry_days),
                       Snapshot.type: timedelta(days=min(snapshot_expiry_days, expiry_days)),
                       Timestamp.type: timedelta(hours=timestamp_expiry_hours)}
        self._metadata: dict[str, Metadata] = {}
        self._staged: dict[str, TargetFile] = {}
        self._writing = False
        self._lease = None
        if self._is_empty():
            with writer_lock(storage, "create the repository", lock_url=lock):
                if self._is_empty():
                    self._initialise(root_keys, root_threshold)
                    return
        self._load()

    @contextlib.contextmanager
    def writing(self, purpose: str, wait_s: float = 60.0, on_busy=None) -> Iterator[None]:
        """Hold the repository's writer lease and work on the metadata as it is under it.

        Nested calls (a publish that rolls out) share the outer lease. `on_busy(holder)` is called once when
        another writer holds it (see edgeship.ota.lock.writer_lock).
        """
        if self._writing:
            yield
            return
        with writer_lock(self.storage, purpose, wait_s=wait_s, lock_url=self.lock, on_busy=on_busy) as lease:
            self._load()
            self._writing, self._lease = True, lease
            try:
                yield
            finally:
                self._writing, self._lease = False, None
                self._staged.clear()

    def refresh(self) -> None:
        """Reload the committed metadata without the writer lock: what a reader (the rollout controller deciding)
        sees between two commits. A change is still made under `writing()`, which reloads again."""
        if not self._writing:
            self._load()

    # --- the steps a publisher takes -------------------------------------------------

    def add_target(self, target_path: str, content: bytes | PathLike) -> TargetFile:
        """Upload a file as a target and stage it for the next `commit`.

        Args:
            target_path: Its path in the repository, e.g. "models/digits/7/onnx-int8/model.onnx".
            content: The file's bytes, or the path of a local file.

        Returns:
            The staged ``TargetFile`` (length and sha256).
        """
        _check_target_path(target_path)
        data = Path(content).read_bytes() if isinstance(content, PathLike) else bytes(content)
        info = TargetFile.from_data(target_path, data, ["sha256"])
        # Hash-prefixed names never collide, so uploading before signing is safe:
        # no device looks for this file until committed metadata names it.
        self.storage.put(_stored_path(info), data)
        self._staged[target_path] = info
        return info

    def get_target(self, target_path: str) -> bytes | None:
        """The content of a target (staged or committed), checked against its metadata; None if unknown.

        Raises:
            SignatureError: The stored file does not match the length and hash the metadata records.
            StorageError: The metadata names the file but storage no longer holds it.
        """
        info = self._staged.get(target_path) or self._targets.targets.get(target_path)
        if info is None:
            return None
        data = self.storage.get(_stored_path(info))
        if data is None:
            raise StorageError(f"{self.storage} lists target '{target_path}' but holds no {_stored_path(info)}; "
                               f"publish that release again")
        try:
            info.verify_length_and_hashes(data)
        except LengthOrHashMismatchError as error:
            raise SignatureError(f"{_stored_path(info)} in {self.storage} does not match its signed metadata "
                                 f"({error}); the file was changed after publishing: publish that release again") from None
        return data

    def commit(self) -> int:
        """Sign and store a new targets, snapshot and timestamp version holding the staged targets.

        Needs the targets, snapshot and timestamp keys, never root's.

        Returns:
            The new targets metadata version.
        """
        self._require_writing("commit")
        if self._root.expires < _now() + ROOT_EXPIRY / 4:
            logger.warning("root metadata of %s expires on %s; re-sign it with the root keys: edgeship keys "
                           "resign-root", self.storage, self._root.expires.date())
        with self.edit_targets() as targets:
            targets.targets.update(self._staged)
        self._staged.clear()
        self.do_snapshot(force=True)
        self.do_timestamp(force=True)
        logger.info("committed %s: targets v%d, %d target(s)", self.storage, targets.version, len(targets.targets))
        return targets.version

    def resign(self, force: bool = False) -> list[str]:
        """Renew the metadata before it expires: roles past half their lifetime, and always the timestamp.

        Returns:
            The roles re-signed, e.g. ["snapshot", "timestamp"].
        """
        self._require_writing("resign")
        renewed = []
        if force or self._expiring(Targets.type):
            with self.edit_targets():
                pass
            renewed.append(Targets.type)
        if renewed or self._expiring(Snapshot.type):
            self.do_snapshot(force=True)
            renewed.append(Snapshot.type)
        self.do_timestamp(force=True)
        renewed.append(Timestamp.type)
        logger.info("re-signed %s in %s", ", ".join(renewed), self.storage)
        return renewed

    def expires(self) -> dict[str, datetime]:
        """When each role's current metadata expires."""
        return {role: md.signed.expires for role, md in self._metadata.items()}

    def channels(self) -> list[str]:
        """The channels published in this repository."""
        return sorted(p.removeprefix("channels/").removesuffix(".json") for p in self._targets.targets
                      if p.startswith("channels/") and p.endswith(".json"))

    def trusted_root(self) -> bytes:
        """The current root metadata: the file a device is provisioned with as its trust anchor."""
        data = self.storage.get("metadata/root.json")
        if data is None:
            raise StorageError(f"{self.storage} holds no metadata/root.json; open the repository again to repair it")
        return data

    @property
    def target_paths(self) -> list[str]:
        """Every target path the committed and staged metadata lists."""
        return sorted(set(self._targets.targets) | set(self._staged))

    # --- tuf.repository.Repository: where metadata comes from and goes to ------------

    def open(self, role: str) -> Metadata:
        if role not in self._metadata:
            signed = _NEW_SIGNED[role]()
            signed.version = 0  # close() bumps it to 1
            return Metadata(signed)
        return copy.deepcopy(self._metadata[role])

    def close(self, role: str, md: Metadata) -> None:
        md.signed.version += 1
        md.signed.expires = _now() + self.expiry[role]
        md.signatures.clear()
        for signer in self._signers_for(role, md):
            md.sign(signer, append=True)
        data = md.to_bytes(JSONSerializer(compact=False))
        version = md.signed.version
        if role == Timestamp.type:
            names = ["timestamp.json"]
        elif role == Root.type:
            names = [f"{version}.root.json", "root.json"]
        else:
            names = [f"{version}.{role}.json"]
        if self._lease is not None:
            self._lease.check()  # a writer that lost its lease (stalled past it) writes no metadata
        for name in names:
            self.storage.put(f"metadata/{name}", data)
        self._metadata[role] = md

    @property
    def targets_infos(self) -> dict[str, MetaFile]:
        return {"targets.json": MetaFile(self._targets.version)}

    @property
    def snapshot_info(self) -> MetaFile:
        return MetaFile(self._metadata[Snapshot.type].signed.version)

    # --- private helpers ---------------------------------------------------------------

    @property
    def _root(self) -> Root:
        return self._metadata[Root.type].signed  # type: ignore[return-value]

    @property
    def _targets(self) -> Targets:
        return self._metadata[Targets.type].signed  # type: ignore[return-value]

    def _is_empty(self) -> bool:
        return not self.storage.list("metadata/")

    def _require_writing(self, what: str) -> None:
        if not self._writing:
            raise RuntimeError(f"{what} outside `with repository.writing(...)`: take the writer lock first")

    def _expiring(self, role: str) -> bool:
        return self._metadata[role].signed.expires < _now() + self.expiry[role] / 2

    def _signers_for(self, role: str, md: Metadata) -> list:
        """The keystore's signers for a role's new metadata; root's needs its old and its new threshold."""
        held = {key.keyid for key in self.keystore.public_keys(role)}
        if role == Root.type:
            new_role = md.signed.roles[Root.type]
            old_role = self._root.roles[Root.type] if Root.type in self._metadata else new_role
            wanted = set(new_role.keyids) | set(old_role.keyids)
            for name, needed in (("the current", old_role), ("the new", new_role)):
                have = len(set(needed.keyids) & held)
                if have < needed.threshold:
                    raise ConfigError(f"re-signing root needs {needed.threshold} of {name} root keys "
                                      f"({len(needed.keyids)} trusted) but {self.keystore.directory} holds {have}; "
                                      f"bring the offline root keys into {self.keystore.path('root')}")
        else:
            root = md.signed if role == Root.type else self._root
            wanted = set(root.roles[role].keyids)
            if len(wanted & held) < root.roles[role].threshold:
                raise KeystoreMismatch(
                    f"the {role} key in {self.keystore.directory} is not the one {self.storage} trusts; "
                    f"point ota.keystore at the keystore this repository was created with")
        return [self.keystore.signer(role, keyid) for keyid in sorted(wanted & held)]

    def _initialise(self, root_keys: int = 1, root_threshold: int = 1) -> None:
        """Create version 1 of every role, trusting the keystore's keys (created when it holds none)."""
        logger.info("creating a new OTA repository in %s (keys in %s)", self.storage, self.keystore.directory)
        self._writing = True
        try:
            with self.edit_root() as root:
                root.consistent_snapshot = True
                for role in ROLES:
                    keys = self.keystore.public_keys(role)
                    while len(keys) < (root_keys if role == Root.type else 1):
                        keys.append(self.keystore.generate(role))
                    for key in keys:
                        root.add_key(key, role)
                root.roles[Root.type].threshold = root_threshold
            with self.edit_targets():
                pass
            self.do_snapshot(force=True)
            self.do_timestamp(force=True)
        finally:
            self._writing = False

    def _load(self) -> None:
        """Load the current version of each role and check it against root and the keystore."""
        root = self._read("root.json")
        while (newer := self.storage.get(f"metadata/{root.signed.version + 1}.root.json")) is not None:
            root = Metadata.from_bytes(newer)  # a newer root whose root.json copy was not written
        timestamp = self._read("timestamp.json")
        snapshot = self._read(f"{timestamp.signed.snapshot_meta.version}.snapshot.json")
        targets = self._read(f"{snapshot.signed.meta['targets.json'].version}.targets.json")
        metadata = {Root.type: root, Timestamp.type: timestamp, Snapshot.type: snapshot, Targets.type: targets}
        for role, md in metadata.items():
            try:
                root.signed.verify_delegate(role, md.signed_bytes, md.signatures)
            except RepositoryError as error:
                raise SignatureError(f"{role} metadata in {self.storage} does not verify against its root "
                                     f"({error}); someone changed the repository without the keys: restore it "
                                     f"from a backup before publishing") from None
        self._metadata = metadata
        self._check_keystore()

    def _read(self, name: str) -> Metadata:
        data = self.storage.get(f"metadata/{name}")
        if data is None:
            present = ", ".join(p.removeprefix("metadata/") for p in self.storage.list("metadata/")[:8])
            raise StorageError(f"{self.storage} is an incomplete OTA repository: metadata/{name} is missing "
                               f"(it holds {present or 'nothing'}); restore it from a backup. It is never "
                               f"re-created: devices trust the existing root")
        return Metadata.from_bytes(data)

    def _check_keystore(self) -> None:
        for role in (Targets.type, Snapshot.type, Timestamp.type):
            trusted = set(self._root.roles[role].keyids)
            held = {key.keyid for key in self.keystore.public_keys(role)}
            if len(trusted & held) < self._root.roles[role].threshold:
                raise KeystoreMismatch(
                    f"the {role} key in {self.keystore.directory} is not the one {self.storage} trusts; "
                    f"point ota.keystore at the keystore this repository was created with")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _check_target_path(target_path: str) -> None:
    if (not target_path or target_path.startswith("/") or target_path.endswith("/")
            or posixpath.normpath(target_path) != target_path or target_path.startswith("..")):
        raise ValueError(f"target path '{target_path}' must be relative and normalised, like 'models/name/1/file.onnx'")


def _stored_path(info: TargetFile) -> str:
    """Where a target's bytes live: the name ngclient asks for with consistent snapshots."""
    directory, sep, name = info.path.rpartition("/")
    return f"targets/{directory}{sep}{info.hashes['sha256']}.{name}"


def open_repository(settings: OtaParams, root: Path) -> OtaRepository:
    """The OTA repository and keystore named in params.yaml, relative paths against the project."""
    location = settings.repository
    if "://" not in location:
        location = str((root / location).resolve())
    return OtaRepository(open_storage(location, settings.s3_endpoint_url), Keystore(root / settings.keystore),
                         expiry_days=settings.metadata_expiry_days,
                         timestamp_expiry_hours=settings.timestamp_expiry_hours,
                         snapshot_expiry_days=settings.snapshot_expiry_days, lock=settings.lock)
