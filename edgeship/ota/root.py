"""Changing who is trusted: the only operations that need the root keys (`edgeship keys ...`).

Root metadata lists the keys of every role and how many must sign (thresholds,
e.g. root 2-of-3). Each change here signs a new root version with a threshold
of the current root keys and of the new ones (devices walk 1.root.json ->
2.root.json -> ...), then re-signs targets, snapshot and timestamp so that
they carry the new keys' signatures. Routine publishing never comes here, so
the root keys can stay offline between these operations.

    >>> init_repository(storage, keystore, root_keys=3, root_threshold=2)
    >>> rotate(repository, "timestamp")           # a new key replaces the old one
    >>> revoke(repository, "root", keyid)          # a lost or compromised root key
"""

from __future__ import annotations

import logging

from tuf.api.metadata import Root

from edgeship.errors import ConfigError
from edgeship.ota.keys import ROLES

logger = logging.getLogger(__name__)


def init_repository(storage, keystore, root_keys: int = 1, root_threshold: int = 1, **options):
    """Create a new repository whose root trusts `root_keys` root keys, `root_threshold` of which must sign.

    Raises:
        ConfigError: The storage already holds a repository, or the threshold is impossible.
    """
    from edgeship.ota.repository import OtaRepository

    if not 1 <= root_threshold <= root_keys:
        raise ConfigError(f"a root threshold of {root_threshold} needs 1 <= threshold <= keys ({root_keys})")
    if storage.list("metadata/"):
        raise ConfigError(f"{storage} already holds an OTA repository; change its keys with `edgeship keys "
                          f"rotate/add/revoke` instead of creating a new one")
    return OtaRepository(storage, keystore, root_keys=root_keys, root_threshold=root_threshold, **options)


def add(repository, role: str, signer_uri: str | None = None, public_key=None) -> str:
    """Trust one more key for a role: a new one in the keystore, or one behind a signer URI (KMS/HSM)."""
    _check(role)
    with repository.writing(f"add a {role} key"):
        if signer_uri is not None:
            key = repository.keystore.add_signer_uri(role, signer_uri, public_key)
        else:
            key = repository.keystore.generate(role)
        with repository.edit_root() as root:
            root.add_key(key, role)
        _resign_roles(repository, role)
    logger.info("root now trusts %s key %s", role, key.keyid[:12])
    return key.keyid


def revoke(repository, role: str, keyid: str) -> None:
    """Stop trusting a key (lost or compromised); refuses to go below the role's threshold."""
    _check(role)
    with repository.writing(f"revoke {role} key {keyid[:12]}"):
        current = repository._root.roles[role]
        matches = [k for k in current.keyids if k.startswith(keyid)]
        if len(matches) != 1:
            raise ConfigError(f"root trusts no single {role} key starting with '{keyid}'; it trusts "
                              f"{[k[:12] for k in current.keyids]}")
        if len(current.keyids) - 1 < current.threshold:
            raise ConfigError(f"revoking would leave {role} with {len(current.keyids) - 1} key(s) for a threshold "
                              f"of {current.threshold}; add a key first (edgeship keys add {role})")
        with repository.edit_root() as root:
            root.revoke_key(matches[0], role)
        _resign_roles(repository, role)
        repository.keystore.retire(role, matches[0])


def rotate(repository, role: str) -> str:
    """Replace every key of a role with one new key; return the new key id."""
    _check(role)
    with repository.writing(f"rotate the {role} key"):
        old = list(repository._root.roles[role].keyids)
        key = repository.keystore.generate(role)
        with repository.edit_root() as root:
            root.add_key(key, role)
            for keyid in old:
                root.revoke_key(keyid, role)
            root.roles[role].threshold = 1
        _resign_roles(repository, role)
        for keyid in old:
            repository.keystore.retire(role, keyid)
    logger.info("rotated %s: %s -> %s", role, [k[:12] for k in old], key.keyid[:12])
    return key.keyid


def set_threshold(repository, role: str, threshold: int) -> None:
    """How many of a role's keys must sign its metadata."""
    _check(role)
    with repository.writing(f"set the {role} threshold to {threshold}"):
        keys = len(repository._root.roles[role].keyids)
        if not 1 <= threshold <= keys:
            raise ConfigError(f"{role} has {keys} key(s); a threshold lies in 1..{keys} (add keys first)")
        with repository.edit_root() as root:
            root.roles[role].threshold = threshold
        _resign_roles(repository, role)


def resign_root(repository) -> int:
    """Sign a new root version with the same keys (a fresh expiry); returns the new root version."""
    with repository.writing("re-sign root"):
        with repository.edit_root():
            pass
        return repository._root.version


def _resign_roles(repository, role: str) -> None:
    """After root changed, the other roles' metadata must carry signatures root now trusts."""
    if role != Root.type:
        repository.resign(force=True)


def _check(role: str) -> None:
    if role not in ROLES:
        raise ConfigError(f"unknown role '{role}'; roles are {list(ROLES)}")
