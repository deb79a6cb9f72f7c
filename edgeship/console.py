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
    # None: rich follows sys.stderr as it is swapped (a test runner's per command), rather than keeping this one
    previous_file = None if console.file in (sys.stdout, sys.stderr) else console.file
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
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per download, not progress
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TFLite / LiteRT INFO and WARNING lines
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    # Prefect gives its ephemeral API 20 s by default; a busy 2-core machine can take longer to start it.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def print_table(out, columns: list[str], rows: list[list[str]], title: str | None = None, caption: str | None = None,
                key_columns: int = 1) -> None:
    """A table on the rich console `out` that stays readable at its width (80 columns, say): as it is when every
    column fits without cutting a word, else without vertical rules, else turned: one row per column (a metric),
    one column per row, headed by its first `key_columns` cells, split into as many tables as the width takes.

        >>> print_table(stdout(), ["version", "device class", "p99 ms"], [["7", "pi4", "41.20"]], key_columns=2)
    """
    from rich import box

    def fits(table) -> bool:  # its columns' longest words side by side, measured where nothing squeezes them
        return out.measure(table, options=out.options.update_width(100_000)).minimum <= out.width

    # as usual; then without vertical rules; then with no edge and one space of padding between columns
    for style in ({"box": box.HEAVY_HEAD}, {"box": box.SIMPLE_HEAD}, {"box": box.SIMPLE_HEAD, "show_edge": False,
                                                                       "pad_edge": False, "collapse_padding": True}):
        table = _table(columns, rows, title, caption, **style)
        if fits(table):
            out.print(table)
            return
    names = ["\n".join(columns[:key_columns]), *columns[key_columns:]]
    heads = ["\n".join(row[:key_columns]) for row in rows]
    start = 0
    while start < len(rows):  # as many rows (now columns) as fit, at least one
        end = start + 1
        while end < len(rows) and fits(_turned(names, heads, rows, start, end + 1, key_columns, title, caption)):
            end += 1
        out.print(_turned(names, heads, rows, start, end, key_columns, title if start == 0 else None, caption))
        start = end


def _table(columns, rows, title, caption, **style):
    from rich.table import Table

    table = Table(title=title, caption=caption, **style)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    return table


def _turned(names, heads, rows, start, end, key_columns, title, caption):
    from rich import box

    body = [[name, *(row[key_columns + i] for row in rows[start:end])] for i, name in enumerate(names[1:])]
    return _table([names[0], *heads[start:end]], body, title, caption, box=box.SIMPLE_HEAD)
