"""Shadow mode: the candidate runs beside the active model on a sampled share of live inputs, off the answer path.

The application's answer never waits for the shadow and never comes from it: `offer()` only draws the
sample and puts (input, active outputs) on a short queue (a full queue skips the sample and counts
it); a background thread runs the shadow model (the state directory's shadow slot, installed by the
updater for the shadow cohort) and reports top-1 agreement, the confidence difference and the shadow's
own latency to the telemetry aggregator (`WindowAggregator.on_shadow`).

    >>> shadow = ShadowRunner(state_dir, aggregator.on_shadow, sample_rate=0.1)
    >>> prediction = runtime.predict(batch)
    >>> shadow.offer(batch, prediction)          # returns at once
    >>> shadow.stop()

No torch, TensorFlow, MLflow or Prefect here.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeship.device.runtimes import open_session
from edgeship.device.telemetry import probabilities

logger = logging.getLogger(__name__)

ShadowReport = Callable[..., None]  # WindowAggregator.on_shadow's signature


class ShadowRunner:
    """Runs the shadow slot's model on sampled inputs in a background thread.

    Args:
        state_dir: the device's state directory (the shadow slot is found through edgeship.device.state).
        report: called once per compared batch with (version, agreements, samples, confidence_diff_sum,
            latency_ms, error=False, skipped=0).
        sample_rate: share of offered batches the shadow sees (the channel entry's shadow_sample_rate).
        queue_size: batches waiting at most; more are skipped rather than delaying anything.
    """

    def __init__(self, state_dir: str | Path, report: ShadowReport, sample_rate: float = 0.1, threads: int = 1,
                 queue_size: int = 4, seed: int | None = None):
        self.state_dir = Path(state_dir)
        self.report, self.sample_rate, self.threads = report, sample_rate, threads
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._random = random.Random(seed)
        self._generation = object()
        self._session = None
        self._version: str | None = None
        self.compared = self.skipped = 0
        self._thread = threading.Thread(target=self._loop, name="edgeship-shadow", daemon=True)
        self._thread.start()

    def offer(self, batch: np.ndarray, prediction) -> bool:
        """Maybe give this input and the active answer to the shadow; never blocks. True when queued."""
        if getattr(prediction, "slot", "active") != "active" or self._random.random() >= self.sample_rate:
            return False
        try:
            self._queue.put_nowait((batch, prediction.outputs))
            return True
        except queue.Full:
            self.skipped += 1
            self.report(self._version, 0, 0, 0.0, None, skipped=1)
            return False

    def stop(self, timeout_s: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _load(self):
        from edgeship.device.state import shadow_model

        try:
            generation = (self.state_dir / "state.json").stat().st_mtime_ns
        except FileNotFoundError:
            generation = None
        if generation == self._generation:
            return self._session
        self._generation = generation
        installed = shadow_model(self.state_dir)
        if installed is None:
            self._session, self._version = None, None
        elif installed.version != self._version:
            try:
                self._session = open_session(installed.model.runtime, installed.path, threads=self.threads)
                self._version = installed.version
            except Exception as error:
                logger.warning("shadow model v%s does not load: %s", installed.version, error)
                self._session, self._version = None, installed.version
        return self._session

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch, active_outputs = item
            try:
                session = self._load()
                if session is None:
                    continue
                start = time.perf_counter()
                outputs = np.asarray(session.run(batch))
                latency_ms = (time.perf_counter() - start) * 1000
                mine, theirs = probabilities(outputs), probabilities(active_outputs)
                agreements = int(np.sum(mine.argmax(axis=1) == theirs.argmax(axis=1)))
                diff = float(np.sum(np.abs(mine.max(axis=1) - theirs.max(axis=1))))
                self.compared += 1
                self.report(self._version, agreements, len(mine), diff, latency_ms)
            except Exception as error:  # a failing shadow is telemetry, never an outage
                logger.warning("shadow run failed: %s", error)
                self.report(self._version, 0, 0, 0.0, None, error=True)
