"""A readable terminal for `edgeship run`: progress and results on the terminal, library noise in a log file.

Torch deprecation warnings, ONNX Runtime's C++ log lines, TFLite's INFO lines, Prefect's and
MLflow's own logging and tracebacks all write to the process's stdout/stderr file descriptors,
some from native code that Python's logging never sees. `library_output_to(log)` points both
descriptors at the log file (child processes, such as DVC, agents and converters, inherit it),
while the CLI's rich console keeps the real terminal. The release then moves the log into its run
directory and logs it to MLflow.

    >>> with library_output_to(Path(".edgeship/logs/run.log"), console):
    ...     release(...)                      # `console` shows progress on the terminal meanwhile
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator


@dataclass
class Terminal:
    """The real terminal's streams while library output goes to the log."""

    stdout: IO[str]
    stderr: IO[str]
    log_path: Path


@contextlib.contextmanager
def library_output_to(log_path: Path, console) -> Iterator[Terminal]:
    """Send everything written to fd 1 and fd 2 into `log_path`; `console` (rich) writes to the terminal."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = Terminal(stdout=os.fdopen(os.dup(saved[1]), "w", buffering=1),
                        stderr=os.fdopen(os.dup(saved[2]), "w", buffering=1), log_path=log_path)
    previous_file = console.file
    console.file = terminal.stderr
    logging.captureWarnings(True)  # warnings become log records, written (with the rest) to the log
    with open(log_path, "ab", buffering=0) as log:
        try:
            for fd in (1, 2):
                os.dup2(log.fileno(), fd)
            yield terminal
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            console.file = previous_file
            logging.captureWarnings(False)
            terminal.stdout.close()
            terminal.stderr.close()


def quiet_libraries() -> None:
    """Environment for the libraries' own verbosity: what still gets out lands in the log file anyway."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no phoning home from the ephemeral API
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TFLite / LiteRT INFO and WARNING lines
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    # Prefect gives its ephemeral API 20 s by default; a busy 2-core machine can take longer to start it.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
