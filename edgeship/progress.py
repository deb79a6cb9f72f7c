"""Progress of long stages, shown by whoever is watching.

Stages report through `progress()`; by default nobody listens. The CLI installs a
rich progress display; a flow run that no terminal watches (a deployment, the Prefect
UI's Run button) installs `PrefectProgress`, so its long stages show as progress
artifacts beside their task states.

    >>> with reporting(RichProgress(console)):
    ...     release_flow(...)
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from typing import Iterator, Protocol

logger = logging.getLogger(__name__)


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


def listening() -> bool:
    """Whether anyone receives progress (a terminal's display, a benchmark's timer, Prefect artifacts)."""
    return not isinstance(_sink, _Silent)


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


class PrefectProgress:
    """Long stages as Prefect progress artifacts: one per stage whose length is known (epochs, layers), updated
    at most every `interval_s` and at its end. Stages of one step show as their task's state alone."""

    def __init__(self, prefix: str = "progress", interval_s: float = 2.0):
        self.prefix, self.interval_s = prefix, interval_s
        self._stages: dict[str, dict] = {}  # stage -> artifact id, total, done, last update
        self._lock = threading.Lock()

    def start(self, stage: str, total: int | None = None) -> None:
        if not total or total <= 1:
            return
        key = f"{self.prefix}-" + re.sub(r"[^a-z0-9]+", "-", stage.lower()).strip("-")
        artifact = self._call("create_progress_artifact", 0.0, key=key, description=f"{stage}: 0 of {total}")
        if artifact is not None:
            with self._lock:
                self._stages[stage] = {"id": artifact, "total": total, "done": 0, "shown": time.monotonic()}

    def advance(self, stage: str, steps: int = 1, note: str = "") -> None:
        with self._lock:
            entry = self._stages.get(stage)
            if entry is None:
                return
            entry["done"] += steps
            if time.monotonic() - entry["shown"] < self.interval_s:
                return
            entry["shown"] = time.monotonic()
            done, total = entry["done"], entry["total"]
        self._update(entry["id"], done, total, stage, note)

    def finish(self, stage: str, note: str = "") -> None:
        with self._lock:
            entry = self._stages.pop(stage, None)
        if entry is not None:
            self._update(entry["id"], entry["total"], entry["total"], stage, note)

    def _update(self, artifact, done: int, total: int, stage: str, note: str) -> None:
        shown = re.sub(r"\[/?[a-z ]*\]", "", note)  # rich markup, as the terminal shows it
        self._call("update_progress_artifact", artifact, min(100.0, 100.0 * done / total),
                   description=f"{stage}: {min(done, total)} of {total}" + (f" ({shown})" if shown else ""))

    @staticmethod
    def _call(name: str, *args, **kwargs):
        """A Prefect artifact call; a failure (no API, no run context) costs the display, never the stage."""
        try:
            from prefect import artifacts

            return getattr(artifacts, name)(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - see the docstring
            logger.debug("progress artifact %s failed: %s", name, error)
            return None
