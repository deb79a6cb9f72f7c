"""What `edgeship` and `edgeship-device` share as command lines: the version, and `-v` / `--log-level`.

Standard library only, so the device side uses it too. The exit codes live with the errors that cause them
(`edgeship.errors.ExitCode`); the conventions are written down in docs/cli.md.

    >>> configure_logging(log_level_for(verbose=1, name=None))   # -v: edgeship's INFO records on stderr
"""

from __future__ import annotations

import logging
import os
import sys

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
HANDLER = "edgeship-command-line"
LIBRARY_LEVELS = ("PREFECT_LOGGING_LEVEL", "MLFLOW_LOGGING_LEVEL")  # libraries that read their level from the env


def package_version() -> str:
    """The installed edgeship's version (what `--version` prints)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgeship")
    except PackageNotFoundError:  # run from a source tree nobody installed
        return "unknown (not installed)"


def log_level_for(verbose: int, name: str | None) -> int:
    """The logging level a command runs at: `--log-level NAME` if given, else WARNING, INFO at -v, DEBUG at -vv."""
    if name:
        if name.upper() not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {name!r}")
        return getattr(logging, name.upper())
    return max(logging.DEBUG, logging.WARNING - 10 * verbose)


def configure_logging(level: int) -> None:
    """Send log records to stderr (stdout is kept for what a command prints for machines), at `level` for
    edgeship's own loggers.

    INFO (-v) also asks Prefect and MLflow for their INFO lines (through their environment variables, unless
    set already); DEBUG (-vv) lets every library's records through; ERROR silences warnings. During
    `edgeship run`, stderr is the run's log file. Prefect replaces the root handler when it is imported (its
    console handler, also on stderr); the level set on the `edgeship` logger survives that.
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER]:  # a second call (tests) replaces the first
        root.removeHandler(old)
    handler = _Stderr()
    handler.set_name(HANDLER)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if level <= logging.DEBUG else max(level, logging.WARNING))
    logging.getLogger("edgeship").setLevel(logging.NOTSET if level == logging.WARNING else level)
    if level < logging.WARNING:
        for variable in LIBRARY_LEVELS:
            os.environ.setdefault(variable, logging.getLevelName(level))


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (a test runner swaps it per command)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass
