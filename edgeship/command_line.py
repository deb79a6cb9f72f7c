"""What `edgeship` and `edgeship-device` share as command lines: the version, `-v` / `--log-level`, the log format.

Standard library only, so the device side uses it too. The exit codes live with the errors that cause them
(`edgeship.errors.ExitCode`); the conventions are written down in docs/cli.md.

    >>> configure_logging(log_level_for(verbose=1, name=None))   # -v: edgeship's INFO records on stderr
    >>> configure_logging(logging.INFO, "json")                   # a daemon's: one JSON object per line
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("plain", "text", "json")  # plain: level and logger; text: with a timestamp; json: JSON lines
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


def configure_logging(level: int, log_format: str = "plain") -> None:
    """Send log records to stderr (stdout is kept for what a command prints for machines), at `level` for
    edgeship's own loggers, formatted as `log_format` (LOG_FORMATS). Once per process: a second call replaces
    the first's handler.

    INFO (-v) also asks Prefect and MLflow for their INFO lines (through their environment variables, unless
    set already); DEBUG (-vv) lets every library's records through; ERROR silences warnings. During
    `edgeship run`, stderr is the run's log file. Prefect replaces the root handler when it is imported (its
    console handler, also on stderr); the level set on the `edgeship` logger survives that.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"the log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER]:  # a second call (tests) replaces the first
        root.removeHandler(old)
    handler = _Stderr()
    handler.set_name(HANDLER)
    handler.setFormatter(_JsonLines() if log_format == "json" else _text(log_format == "text"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if level <= logging.DEBUG else max(level, logging.WARNING))
    logging.getLogger("edgeship").setLevel(logging.NOTSET if level == logging.WARNING else level)
    if level < logging.WARNING:
        for variable in LIBRARY_LEVELS:
            os.environ.setdefault(variable, logging.getLevelName(level))


def _text(timestamps: bool) -> logging.Formatter:
    """`LEVEL logger: message`, after a UTC timestamp (2026-12-03T19:40:00.123Z) when `timestamps`."""
    if not timestamps:
        return logging.Formatter("%(levelname)s %(name)s: %(message)s")
    formatter = logging.Formatter("%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    return formatter


class _JsonLines(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (a test runner swaps it per command)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass
