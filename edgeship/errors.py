"""Error types, and the exit codes both command lines (`edgeship`, `edgeship-device`) end with.

Each message says what went wrong and what to do about it. Each error type carries its exit code,
so a command exits the same way for the same cause whichever command it is:

    0  ok
    1  crashed: a bug in edgeship (the traceback is in the log, or on stderr)
    2  bad input (arguments, params.yaml, files, a version or alias that does not exist) or a service that
       could not be used (unreachable agent, server or bucket; a repository another writer holds)
    3  refused by a gate or a policy (a failed required gate, a signature or smoke test a device refused,
       a model that failed probation)
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What `edgeship` and `edgeship-device` exit with (docs/cli.md)."""

    OK = 0
    CRASHED = 1
    BAD_INPUT = 2
    REFUSED = 3


def exit_code_for(error: BaseException) -> ExitCode:
    """The exit code an error ends a command with: its type's, or CRASHED for anything edgeship did not raise."""
    return error.exit_code if isinstance(error, EdgeshipError) else ExitCode.CRASHED


class EdgeshipError(Exception):
    """Base class: every error edgeship raises on purpose (exit code 2 unless the type says otherwise)."""

    exit_code = ExitCode.BAD_INPUT


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

    exit_code = ExitCode.REFUSED


class RegistryError(EdgeshipError):
    """MLflow does not hold what was asked for (no such alias, missing artifact tags)."""


class SignatureError(EdgeshipError):
    """OTA metadata or a model file failed verification."""

    exit_code = ExitCode.REFUSED


class SmokeTestFailed(EdgeshipError):
    """A downloaded model verified but did not run correctly on the device runtime."""

    exit_code = ExitCode.REFUSED


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
