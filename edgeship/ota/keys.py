"""Signing keys of the OTA repository: one Ed25519 key per TUF role.

The four top-level roles each sign their own metadata: root (which keys are
trusted for what), targets (which files exist, with hashes), snapshot (which
targets metadata version is current) and timestamp (which snapshot is fresh).
A `Keystore` keeps their private keys as PEM files in one directory and creates
any that are missing the first time they are asked for:

    .edgeship/keys/            (0700)
        root.pem               (0600, PKCS#8, unencrypted)
        targets.pem
        snapshot.pem
        timestamp.pem

The key id is computed from the public key, so it needs no separate file.
Whoever holds this directory can publish releases that every device accepts:
keep it out of git (the project's .gitignore ignores .edgeship/), and in
production keep at least root.pem offline.

    >>> keystore = Keystore(".edgeship/keys")
    >>> keystore.public_key("targets").keyid
    >>> metadata.sign(keystore.signer("targets"))
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, SSlibKey

from edgeship.errors import ConfigError

logger = logging.getLogger(__name__)

ROLES = ("root", "targets", "snapshot", "timestamp")


class Keystore:
    """Ed25519 signing keys for the top-level TUF roles, kept as PEM files.

    Args:
        directory: Where the keys live; created with mode 0700 when missing.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._signers: dict[str, CryptoSigner] = {}

    def signer(self, role: str) -> CryptoSigner:
        """The signer of a role, loading its key or creating it on first use.

        Raises:
            ValueError: ``role`` is not one of the top-level roles.
            ConfigError: The key file exists but is not an Ed25519 PEM key.
        """
        if role not in ROLES:
            raise ValueError(f"unknown role '{role}'; the keystore holds {list(ROLES)}")
        if role not in self._signers:
            path = self.path(role)
            private_key = _load(path) if path.exists() else _create(path)
            public_key = SSlibKey.from_crypto(private_key.public_key(), scheme="ed25519")
            self._signers[role] = CryptoSigner(private_key, public_key)
        return self._signers[role]

    def public_key(self, role: str) -> SSlibKey:
        """The public key of a role (what root metadata lists as trusted)."""
        return self.signer(role).public_key

    def has(self, role: str) -> bool:
        """Whether the keystore already holds a key for a role (without creating one)."""
        return role in self._signers or self.path(role).exists()

    def path(self, role: str) -> Path:
        """The PEM file that holds a role's private key."""
        return self.directory / f"{role}.pem"

    def __repr__(self) -> str:
        return f"Keystore({str(self.directory)!r})"


def _create(path: Path) -> Ed25519PrivateKey:
    """Generate a key and write it so that only this user can read it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    private_key = Ed25519PrivateKey.generate()
    pem = CryptoSigner(private_key).private_bytes
    # O_EXCL: never overwrite a key another process created in the meantime.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    logger.info("created a new %s signing key in %s", path.stem, path)
    return private_key


def _load(path: Path) -> Ed25519PrivateKey:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning("%s is readable by other users (mode %o); run: chmod 600 %s", path, mode, path)
    try:
        private_key = load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{path} is not an unencrypted PEM private key ({error}); "
                          f"restore it from your backup or point ota.keystore at the right directory") from None
    if not isinstance(private_key, Ed25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(private_key).__name__}, not an Ed25519 key; "
                          f"restore the right key or point ota.keystore at the right directory")
    return private_key
