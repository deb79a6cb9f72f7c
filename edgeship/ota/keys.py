"""Signing keys of the OTA repository: separate Ed25519 keys per TUF role, encrypted at rest.

The four top-level roles each sign their own metadata: root (which keys are
trusted for what, with thresholds such as root 2-of-3), targets (which files
exist, with hashes), snapshot (which targets version is current) and timestamp
(which snapshot is fresh). A `Keystore` keeps them in one directory, a
subdirectory per role so that root's can live elsewhere (offline):

    .edgeship/keys/                  (0700)
        root/<keyid>.pem             (0600, PKCS#8, encrypted when a passphrase is set)
        root/<keyid>.pub             the public key (TUF JSON), readable without the passphrase
        targets/<keyid>.pem
        snapshot/<keyid>.uri         a key held by a KMS/HSM: {"uri": "gcpkms:...", "public_key": {...}}
        timestamp/<keyid>.pem
        retired/<role>/...           keys removed from root by `edgeship keys rotate/revoke`

Private keys are encrypted with the passphrase in $EDGESHIP_KEY_PASSPHRASE_<ROLE>
(or $EDGESHIP_KEY_PASSPHRASE for all roles); without one they are written in
plain text with a warning. A `.uri` file names any signer securesystemslib's
`Signer.from_priv_key_uri` can open, so a KMS or HSM can hold a role's key.
Routine publishing needs targets, snapshot and timestamp keys only: keep
`root/` offline and bring it back for `edgeship keys`.

    >>> keystore = Keystore(".edgeship/keys")
    >>> keystore.generate("targets")
    >>> [s.public_key.keyid for s in keystore.signers("targets")]
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, Signer, SSlibKey

from edgeship.errors import ConfigError, KeyPassphraseError

logger = logging.getLogger(__name__)

ROLES = ("root", "targets", "snapshot", "timestamp")
PASSPHRASE_ENV = "EDGESHIP_KEY_PASSPHRASE"


def passphrase_for(role: str) -> bytes | None:
    """The passphrase of a role's keys from the environment, or None."""
    value = os.environ.get(f"{PASSPHRASE_ENV}_{role.upper()}") or os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


class Keystore:
    """Ed25519 signing keys (or signer URIs) for the top-level TUF roles.

    Args:
        directory: Where the keys live; created with mode 0700 when missing.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._signers: dict[str, Signer] = {}

    # --- what a repository asks for ------------------------------------------------------

    def public_keys(self, role: str) -> list[SSlibKey]:
        """The public keys the keystore holds for a role (no passphrase needed)."""
        _check_role(role)
        keys = []
        for path in sorted(self._role_dir(role).glob("*.pub")):
            keys.append(SSlibKey.from_dict(path.stem, json.loads(path.read_text())))
        for path in sorted(self._role_dir(role).glob("*.uri")):
            record = json.loads(path.read_text())
            keys.append(SSlibKey.from_dict(path.stem, record["public_key"]))
        legacy = self.directory / f"{role}.pem"
        if legacy.is_file():
            keys.append(self._open_pem(legacy, role).public_key)
        return keys

    def signer(self, role: str, keyid: str) -> Signer:
        """The signer of one key; loads (and decrypts) it on first use.

        Raises:
            KeyPassphraseError: The key is encrypted and the passphrase is missing or wrong.
            ConfigError: The keystore holds no private key with that id.
        """
        _check_role(role)
        if keyid not in self._signers:
            directory = self._role_dir(role)
            if (directory / f"{keyid}.pem").is_file():
                self._signers[keyid] = self._open_pem(directory / f"{keyid}.pem", role)
            elif (directory / f"{keyid}.uri").is_file():
                record = json.loads((directory / f"{keyid}.uri").read_text())
                public_key = SSlibKey.from_dict(keyid, record["public_key"])
                self._signers[keyid] = Signer.from_priv_key_uri(record["uri"], public_key)
            else:
                legacy = self.directory / f"{role}.pem"
                signer = self._open_pem(legacy, role) if legacy.is_file() else None
                if signer is None or signer.public_key.keyid != keyid:
                    raise ConfigError(f"{self.directory} holds no {role} key {keyid[:12]}; bring back the key "
                                      f"(e.g. the offline root keys) or point ota.keystore at the right directory")
                self._signers[keyid] = signer
        return self._signers[keyid]

    def has(self, role: str) -> bool:
        """Whether the keystore holds any key for a role."""
        return bool(self.public_keys(role))

    # --- what `edgeship keys` does ---------------------------------------------------------

    def generate(self, role: str) -> SSlibKey:
        """Create a new Ed25519 key for a role, encrypted when a passphrase is set; return its public key."""
        _check_role(role)
        private_key = Ed25519PrivateKey.generate()
        public_key = SSlibKey.from_crypto(private_key.public_key(), scheme="ed25519")
        passphrase = passphrase_for(role)
        encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                      else serialization.NoEncryption())
        if not passphrase:
            logger.warning("the new %s key is stored unencrypted; set $%s_%s or $%s to encrypt keys at rest",
                           role, PASSPHRASE_ENV, role.upper(), PASSPHRASE_ENV)
        pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        directory = self._role_dir(role)
        _private_dir(self.directory)
        _private_dir(directory)
        _write_private(directory / f"{public_key.keyid}.pem", pem)
        (directory / f"{public_key.keyid}.pub").write_text(json.dumps(public_key.to_dict(), indent=2))
        self._signers[public_key.keyid] = CryptoSigner(private_key, public_key)
        logger.info("created %s key %s in %s", role, public_key.keyid[:12], directory)
        return public_key

    def add_signer_uri(self, role: str, uri: str, public_key: SSlibKey) -> SSlibKey:
        """Hold a role's key behind a signer URI (a KMS, an HSM, `file2:` for a file elsewhere); no private bytes here."""
        _check_role(role)
        _private_dir(self.directory)
        _private_dir(self._role_dir(role))
        record = {"uri": uri, "public_key": public_key.to_dict()}
        (self._role_dir(role) / f"{public_key.keyid}.uri").write_text(json.dumps(record, indent=2))
        return public_key

    def retire(self, role: str, keyid: str) -> None:
        """Move a key out of use (into retired/<role>/) once root no longer trusts it."""
        source = self._role_dir(role)
        target = self.directory / "retired" / role
        target.mkdir(parents=True, exist_ok=True)
        for path in source.glob(f"{keyid}.*"):
            shutil.move(str(path), target / path.name)
        legacy = self.directory / f"{role}.pem"
        if legacy.is_file() and self._open_pem(legacy, role).public_key.keyid == keyid:
            shutil.move(str(legacy), target / f"{keyid}.pem")
        self._signers.pop(keyid, None)

    def path(self, role: str) -> Path:
        """The directory that holds a role's keys."""
        return self._role_dir(role)

    def __repr__(self) -> str:
        return f"Keystore({str(self.directory)!r})"

    # --- private -------------------------------------------------------------------------

    def _role_dir(self, role: str) -> Path:
        return self.directory / role

    def _open_pem(self, path: Path, role: str) -> CryptoSigner:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            logger.warning("%s is readable by other users (mode %o); run: chmod 600 %s", path, mode, path)
        data = path.read_bytes()
        encrypted = b"ENCRYPTED" in data.split(b"\n", 1)[0]
        passphrase = passphrase_for(role) if encrypted else None
        if encrypted and passphrase is None:
            raise KeyPassphraseError(f"{path} is encrypted; set ${PASSPHRASE_ENV}_{role.upper()} or "
                                     f"${PASSPHRASE_ENV} to its passphrase")
        try:
            private_key = load_pem_private_key(data, password=passphrase)
        except (ValueError, TypeError) as error:
            if encrypted:
                raise KeyPassphraseError(f"cannot decrypt {path} ({error}); the passphrase in "
                                         f"${PASSPHRASE_ENV}_{role.upper()} or ${PASSPHRASE_ENV} is wrong") from None
            raise ConfigError(f"{path} is not a PEM private key ({error}); restore it from your backup or "
                              f"point ota.keystore at the right directory") from None
        if not isinstance(private_key, Ed25519PrivateKey):
            raise ConfigError(f"{path} holds a {type(private_key).__name__}, not an Ed25519 key; "
                              f"restore the right key or point ota.keystore at the right directory")
        return CryptoSigner(private_key, SSlibKey.from_crypto(private_key.public_key(), scheme="ed25519"))


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ConfigError(f"unknown role '{role}'; the keystore holds {list(ROLES)}")


def _private_dir(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)


def _write_private(path: Path, data: bytes) -> None:
    # O_EXCL: never overwrite a key another process created in the meantime.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
