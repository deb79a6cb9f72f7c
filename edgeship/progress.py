"""Progress of long stages, shown by whoever is watching.

Stages report through `progress()`; by default nobody listens. The CLI installs a
rich progress display; in the Prefect UI the same stages show as task states.

    >>> with reporting(RichProgress(console)):
    ...     release_flow(...)
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Protocol


class ProgressSink(Protocol):
    def start(self, stage: str, total: int | None = None) -> None: ...
    def advance(self, stage: str, steps: int = 1, note: str = "") -> None: ...
    def finish(self, stage: str, note: str = "") -> None: ...


class _Silent:
    def start(self, stage: str, total: int | None = None) -> None:
        pass

    def advance(self, stage: str, steps: int = 1, note: str = "") -> None:
        pass

    def finish(self, stage: str, note: str = "") -> None:
        pass


_sink: ProgressSink = _Silent()


def progress() -> ProgressSink:
    """The sink that stages report to."""
    return _sink


@contextlib.contextmanager
def reporting(sink: ProgressSink) -> Iterator[ProgressSink]:
    """Send stage progress to `sink` for the duration of the block."""
    global _sink
    previous, _sink = _sink, sink
    try:
        yield sink
    finally:
        _sink = previous


class RichProgress:
    """A rich progress display: one row per stage, thread-safe (targets compile in parallel)."""

    def __init__(self, console=None):
        from rich.progress import MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.table import Column

        fixed = dict(no_wrap=True)
        self._progress = Progress(
            SpinnerColumn(table_column=Column(width=2, **fixed)),
            TextColumn("[bold]{task.description}", table_column=Column(width=26, **fixed)),
            MofNCompleteColumn(table_column=Column(width=7, **fixed)),
            TimeElapsedColumn(table_column=Column(width=8, **fixed)),
            TextColumn("{task.fields[note]}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
            console=console, transient=False, expand=True)
        self._rows: dict[str, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> "RichProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def start(self, stage: str, total: int | None = None) -> None:
        with self._lock:
            if stage not in self._rows:
                self._rows[stage] = self._progress.add_task(stage, total=total, note="")
            else:
                self._progress.reset(self._rows[stage], total=total)

    def advance(self, stage: str, steps: int = 1, note: str = "") -> None:
        with self._lock:
            if stage not in self._rows:
                self._rows[stage] = self._progress.add_task(stage, total=None, note="")
            self._progress.update(self._rows[stage], advance=steps, note=note)

    def finish(self, stage: str, note: str = "") -> None:
        with self._lock:
            if stage not in self._rows:
                self._rows[stage] = self._progress.add_task(stage, total=1, note="")
            row = self._rows[stage]
            done = max(1, int(self._progress._tasks[row].completed))
            self._progress.update(row, total=done, completed=done, note=note)
