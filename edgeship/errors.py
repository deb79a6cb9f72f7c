"""Error types. Each message says what went wrong and what to do about it."""

from __future__ import annotations


class EdgeshipError(Exception):
    """Base class: every error edgeship raises on purpose."""


class ConfigError(EdgeshipError):
    """params.yaml is missing, malformed, or holds a value that is not allowed."""


class DataError(EdgeshipError):
    """The image folder cannot be turned into splits (empty, one class, unreadable file)."""


class ModelLoadError(EdgeshipError):
    """A model factory or a model file cannot be loaded."""


class PruningError(EdgeshipError):
    """A model's graph cannot be pruned as asked (a layer the pruner cannot follow, an unknown layer name)."""


class CompileError(EdgeshipError):
    """A target's converter failed; the message carries the converter's own words."""


class UnknownTarget(ConfigError):
    """A target name that no compile module registers."""


class DeviceUnreachable(EdgeshipError):
    """A device agent did not answer (connection refused, timeout)."""


class AgentProtocolMismatch(DeviceUnreachable):
    """A device agent speaks a wire protocol this pipeline cannot use; the message says which side to upgrade."""


class DeviceJobFailed(EdgeshipError):
    """A device agent answered, but the job failed (bad artifact, runtime error)."""


class GateFailed(EdgeshipError):
    """A required gate check failed or could not be measured."""


class RegistryError(EdgeshipError):
    """MLflow does not hold what was asked for (no such alias, missing artifact tags)."""


class SignatureError(EdgeshipError):
    """OTA metadata or a model file failed verification."""


class SmokeTestFailed(EdgeshipError):
    """A downloaded model verified but did not run correctly on the device runtime."""


class ReleaseError(EdgeshipError):
    """A release cannot be published, rolled out or rolled back as asked (nothing to roll back to, wrong channel)."""


class RepositoryBusy(EdgeshipError):
    """Another writer holds the OTA repository's lock."""


class KeyPassphraseError(ConfigError):
    """An encrypted signing key cannot be opened: the passphrase is missing or wrong."""


class NothingToRollBack(EdgeshipError):
    """A local rollback was asked for, but the device keeps no last-known-good model."""


class NoModelInstalled(EdgeshipError):
    """Neither the device's active model nor its fallback can answer."""
