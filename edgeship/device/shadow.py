"""Shadow mode: the candidate runs beside the active model on a sampled share of live inputs, off the answer path.

The application's answer never waits for the shadow and never comes from it: `offer()` only draws the
sample and puts (input, active outputs) on a short queue (a full queue skips the sample and counts
it); a background thread runs the shadow model (the state directory's shadow slot, installed by the
updater for the shadow cohort) and reports top-1 agreement (a detector's: IoU-matched detections, `compare`),
the confidence difference and the shadow's own latency to the telemetry aggregator (`WindowAggregator.on_shadow`).

The shadow runs in the primary's idle time only: the caller brackets each answer with `primary_started()`
and `primary_done()`, and a sample waits until no answer is in progress and none has finished for
`idle_gap_s` (a burst of requests is not interleaved with shadow runs, which in one process would hold
the interpreter between two answers); a sample that finds no such gap within `max_wait_s` is skipped
and counted. What remains is a request that arrives while a shadow run is under way.

    >>> shadow = ShadowRunner(state_dir, aggregator.on_shadow, sample_rate=0.1)
    >>> shadow.primary_started(); prediction = runtime.predict(batch); shadow.primary_done()
    >>> shadow.offer(batch, prediction)          # returns at once
    >>> shadow.stop()

The same runner compares the active model with the model it replaced (`ShadowRunner(..., model=compared_model)`:
the rollback slot, still installed while a candidate serves): every rollout compares answers, shadowed or not.

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

from edgeship.device.detections import frame_agreement, open_model
from edgeship.device.request_checks import InputRefused, RequestLimits, fit_batch
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
        idle_gap_s: how long the primary must have been idle before a shadow run starts.
        max_wait_s: a sample that finds no idle gap this long is skipped (and counted).
        model: which installed model runs (edgeship.device.state's shadow_model, or compared_model for the model the
            active one replaced); None when there is none now.
        name: the background thread's name.
        disagreed: called with the request id of an answer the model run here disagreed with (the field sampler
            keeps such inputs: `FieldSampler.prefer`); an answer without an id is not reported.
    """

    def __init__(self, state_dir: str | Path, report: ShadowReport, sample_rate: float = 0.1, threads: int = 1,
                 queue_size: int = 4, seed: int | None = None, idle_gap_s: float = 0.0005, max_wait_s: float = 2.0,
                 model: Callable[[Path], object] | None = None, name: str = "edgeship-shadow",
                 disagreed: Callable[[str], object] | None = None):
        self.state_dir = Path(state_dir)
        self._model, self._disagreed = model, disagreed
        self.report, self.sample_rate, self.threads = report, sample_rate, threads
        self.idle_gap_s, self.max_wait_s = idle_gap_s, max_wait_s
        self._answers = threading.Lock()
        self._busy = 0
        self._last_answer = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._random = random.Random(seed)
        self._generation = object()
        self._session = None
        self._version: str | None = None
        self._active_version: str | None = None
        self.compared = self.skipped = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def primary_started(self) -> None:
        """An answer is being computed: no shadow run starts until it is done and the gap has passed."""
        with self._answers:
            self._busy += 1

    def primary_done(self) -> None:
        with self._answers:
            self._busy -= 1
            self._last_answer = time.monotonic()

    def _wait_for_idle(self) -> bool:
        """Poll until the primary has been idle for idle_gap_s; False when max_wait_s passes first. Polling, not a
        notification per answer: waking this thread after every answer of a burst would itself slow them."""
        deadline = time.monotonic() + self.max_wait_s
        poll_s = max(self.idle_gap_s, 0.001)
        while True:
            now = time.monotonic()
            quiet = now - self._last_answer
            if not self._busy and quiet >= self.idle_gap_s:
                return True
            if now >= deadline:
                return False
            time.sleep(min(deadline - now, poll_s if self._busy else max(self.idle_gap_s - quiet, 0.0001)))

    def offer(self, batch: np.ndarray, prediction) -> bool:
        """Maybe give this input and the active answer to the shadow; never blocks. True when queued."""
        if getattr(prediction, "slot", "active") != "active" or self._random.random() >= self.sample_rate:
            return False
        try:
            self._queue.put_nowait((batch, prediction.outputs, getattr(prediction, "request_id", None),
                                    getattr(prediction, "version", None)))
            return True
        except queue.Full:
            self.skipped += 1
            self.report(self._version, 0, 0, 0.0, None, skipped=1)
            return False

    def stop(self, timeout_s: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _load(self):
        from edgeship.device.state import active_model, shadow_model

        model = self._model or shadow_model
        try:
            generation = (self.state_dir / "state.json").stat().st_mtime_ns
        except FileNotFoundError:
            generation = None
        if generation == self._generation:
            return self._session
        self._generation = generation
        active = active_model(self.state_dir)
        self._active_version = active.version if active is not None else None
        installed = model(self.state_dir)
        if installed is None:
            self._session, self._version = None, None
        elif installed.version != self._version:
            try:
                self._session = open_model(installed.model.runtime, installed.path, threads=self.threads,
                                           postprocess=getattr(installed.model, "postprocess", None))
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
            batch, active_outputs, request_id, answered_by = item
            try:
                session = self._load()
                if session is None:
                    continue
                if answered_by is not None and answered_by != self._active_version:
                    # answered just before a hand-over: comparing it with the new state's model would count it
                    # for the wrong pair of versions
                    self.skipped += 1
                    self.report(self._version, 0, 0, 0.0, None, skipped=1)
                    continue
                if not self._wait_for_idle():
                    self.skipped += 1
                    self.report(self._version, 0, 0, 0.0, None, skipped=1)
                    continue
                try:  # the request fitted the model that answered; the shadow takes it in its own dtype, or not
                    batch = fit_batch(batch, session.inputs, (), session.dynamic_batch, RequestLimits(len(batch)))
                except InputRefused:
                    self.skipped += 1
                    self.report(self._version, 0, 0, 0.0, None, skipped=1)
                    continue
                start = time.perf_counter()
                outputs = np.asarray(session.run(batch))
                latency_ms = (time.perf_counter() - start) * 1000
                agreements, samples, diff = compare(outputs, np.asarray(active_outputs),
                                                    getattr(session, "task", "classification"))
                self.compared += 1
                self.report(self._version, agreements, samples, diff, latency_ms)
                if agreements < samples and request_id and self._disagreed is not None:
                    self._disagreed(request_id)
            except Exception as error:  # a failing shadow is telemetry, never an outage
                logger.warning("shadow run failed: %s", error)
                self.report(self._version, 0, 0, 0.0, None, error=True)


def compare(shadow: np.ndarray, active: np.ndarray, task: str) -> tuple[int, int, float]:
    """(agreements, samples, summed confidence difference) of the shadow's answer against the active one's.

    A classifier: per input, the same top-1 class, and |top-1 confidence difference|. A detector: per frame its
    IoU-matched detections (same class, IoU >= 0.5) over the larger set (two empty answers agree: 1 of 1), and
    the |score difference| of the matched pairs; so the window's agreement is the matched fraction.
    """
    if task == "detection":
        totals = [frame_agreement(mine, theirs) for mine, theirs in zip(shadow, active)]
        return sum(t[0] for t in totals), sum(t[1] for t in totals), float(sum(t[2] for t in totals))
    mine, theirs = probabilities(shadow), probabilities(active)
    return (int(np.sum(mine.argmax(axis=1) == theirs.argmax(axis=1))), len(mine),
            float(np.sum(np.abs(mine.max(axis=1) - theirs.max(axis=1)))))
