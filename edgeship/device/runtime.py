"""The on-device runtime: answers with the active model, falls back to the fallback model, feeds probation.

    >>> runtime = DeviceRuntime("/var/lib/edgeship")
    >>> prediction = runtime.predict(batch)
    >>> prediction.outputs, prediction.slot, prediction.version, prediction.latency_ms

Primary and fallback, per request:

    primary --load fails / raises / > budget on `miss_ratio` of the last `window` answers--> fallback
    fallback --every `retry_every` requests the primary is tried; `recover_after` good tries in a row--> primary

Every request is first checked against the declared inputs of the model that would answer
(edgeship.device.request_checks): one that fits neither model raises InputRefused and counts
against none. While the active model is on probation, every primary answer is counted
(edgeship.device.probation.record_inference): the runtime confirms it, or its
failures roll it back. The runtime holds the probation while it runs it: `close()` hands it
to the next start; a process killed before confirming is resumed by the next start (three such
deaths roll it back). Between requests
(never in the middle of one) it notices a new state.json generation and reloads.
Observers (`on_inference(InferenceRecord)`) see every answer: telemetry and
shadow execution plug in there.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeship.device import probation
from edgeship.device.detections import open_model
from edgeship.device.request_checks import InputRefused, RequestLimits, fit_batch
from edgeship.device.state import InstalledModel, active_model, fallback_model
from edgeship.errors import NoModelInstalled

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    outputs: np.ndarray  # logits; a detector's packed detections (N, K, 6)
    slot: str  # "active" | "fallback"
    version: str
    latency_ms: float
    task: str = "classification"
    request_id: str | None = None  # FieldRuntime's id of this answer: the application's feedback names it

    @property
    def detections(self) -> list[list[dict]] | None:
        """A detector's answer per image: [{"box": [x1, y1, x2, y2], "score": s, "class": c}, ...]; else None."""
        from edgeship.device.detections import as_objects

        return as_objects(self.outputs) if self.task == "detection" else None


@dataclass(frozen=True)
class InferenceRecord:
    latency_ms: float
    slot: str
    version: str | None
    outputs: np.ndarray | None
    ok: bool
    error: str | None = None
    on_probation: bool = False
    task: str = "classification"  # "detection": outputs are packed detections (edgeship.device.detections)


Observer = Callable[[InferenceRecord], None]


class _Loaded:
    def __init__(self, installed: InstalledModel, threads: int):
        self.installed = installed
        self.session = open_model(installed.model.runtime, installed.path, threads=threads,
                                  postprocess=getattr(installed.model, "postprocess", None))
        self.task = getattr(self.session, "task", "classification")

    @property
    def budget(self) -> float | None:
        return self.installed.model.latency_budget_ms


class DeviceRuntime:
    """Runs the device's models from its state directory.

    Args:
        state_dir: The updater's state directory.
        threads: Runtime threads per session.
        observers: Called with an InferenceRecord after every answer (never on the answer's path for errors).
        window: Primary answers the latency check looks at.
        miss_ratio: Share of the window over budget that switches to the fallback.
        retry_every: While on the fallback, try the primary on every n-th request.
        recover_after: Good primary tries in a row that switch back.
        limits: The largest batch a request may hold.
    """

    def __init__(self, state_dir: str | Path, threads: int = 1, observers: Sequence[Observer] = (),
                 window: int = 20, miss_ratio: float = 0.5, retry_every: int = 10, recover_after: int = 3,
                 limits: RequestLimits = RequestLimits()):
        self.state_dir = Path(state_dir)
        self.limits = limits
        self.threads = threads
        self.observers = list(observers)
        self.window, self.miss_ratio = window, miss_ratio
        self.retry_every, self.recover_after = retry_every, recover_after
        self._latencies: deque[bool] = deque(maxlen=window)  # True: over budget
        self._on_fallback = False
        self._since_retry = 0
        self._recovered = 0
        self._generation = None
        self.primary: _Loaded | None = None
        self.fallback: _Loaded | None = None
        self.reason = ""  # why the runtime is on the fallback
        probation.expire(self.state_dir)  # a probation whose process died: roll back before loading
        self._reload()

    @property
    def slot(self) -> str:
        return "fallback" if self._on_fallback else "active"

    def predict(self, batch: np.ndarray) -> Prediction:
        """Answer one request.

        The batch is checked against the declared inputs of the model that would answer first
        (edgeship.device.request_checks); one that fits neither model is refused and counts against none.

        Raises:
            InputRefused: the request does not fit the models' declared inputs (the client's error).
            NoModelInstalled: no model at all can answer.
        """
        self._maybe_reload()
        for_primary = _fit(self.primary, batch, self.limits)
        for_fallback = None  # checked only when the fallback may answer
        if isinstance(for_primary, np.ndarray):
            if self._on_fallback and not self._retry_due():
                for_fallback = _fit(self.fallback, batch, self.limits)
            if not isinstance(for_fallback, np.ndarray):  # the primary's turn, or only the primary takes it
                prediction = self._run_primary(for_primary)
                if prediction is not None:
                    return prediction
        if for_fallback is None:
            for_fallback = _fit(self.fallback, batch, self.limits)
        if isinstance(for_primary, InputRefused) and not isinstance(for_fallback, np.ndarray):
            raise for_primary  # fits neither: the client's error, counted against no model
        if isinstance(for_fallback, InputRefused):
            raise for_fallback if self.primary is None else NoModelInstalled(
                f"the primary v{self.primary.installed.version} failed ({self.reason}) and the fallback cannot take "
                f"this request: {for_fallback}")
        return self._run_fallback(for_fallback)

    # --- the two slots ------------------------------------------------------------------

    def _run_primary(self, batch: np.ndarray) -> Prediction | None:
        loaded = self.primary
        on_probation = loaded.installed.on_probation
        start = time.perf_counter()
        try:
            outputs = np.asarray(loaded.session.run(batch))
            error = None
        except Exception as exc:  # each runtime raises its own types
            outputs, error = None, f"{type(exc).__name__}: {exc}"
        latency_ms = (time.perf_counter() - start) * 1000
        ok = error is None and bool(np.all(np.isfinite(outputs)))
        over = loaded.budget is not None and latency_ms > loaded.budget
        self._notify(InferenceRecord(latency_ms, "active", loaded.installed.version, outputs, ok, error, on_probation,
                                     loaded.task))
        if on_probation and probation.record_inference(self.state_dir, latency_ms, ok) is not None:
            self._maybe_reload()
        if self._on_fallback:
            self._recovered = self._recovered + 1 if ok and not over else 0
            if self._recovered >= self.recover_after:
                logger.info("primary v%s recovered; switching back from the fallback", loaded.installed.version)
                self._on_fallback, self.reason = False, ""
                self._latencies.clear()
        else:
            self._latencies.append(over)
            if not ok:
                self._switch(f"primary raised: {error}" if error else "primary returned non-finite outputs")
            elif len(self._latencies) == self.window and sum(self._latencies) >= self.miss_ratio * self.window:
                self._switch(f"primary over its {loaded.budget} ms budget on {sum(self._latencies)} of the last "
                             f"{self.window} requests")
        if not ok:
            return None
        return Prediction(outputs, "active", loaded.installed.version, latency_ms, loaded.task)

    def _run_fallback(self, batch: np.ndarray | None) -> Prediction:
        if self.fallback is None or batch is None:
            raise NoModelInstalled(f"no model in {self.state_dir} can answer ({self.reason or 'none installed'}); "
                                   f"run edgeship-device update, and publish a fallback model for this target")
        start = time.perf_counter()
        outputs = np.asarray(self.fallback.session.run(batch))
        latency_ms = (time.perf_counter() - start) * 1000
        self._notify(InferenceRecord(latency_ms, "fallback", self.fallback.installed.version, outputs, True,
                                     task=self.fallback.task))
        return Prediction(outputs, "fallback", self.fallback.installed.version, latency_ms, self.fallback.task)

    def _switch(self, reason: str) -> None:
        if self.fallback is None:
            return  # nothing to switch to: keep answering with the primary
        logger.warning("switching to the fallback model: %s", reason)
        self._on_fallback, self.reason = True, reason
        self._since_retry = self._recovered = 0

    def _retry_due(self) -> bool:
        self._since_retry += 1
        if self._since_retry >= self.retry_every:
            self._since_retry = 0
            return True
        return False

    # --- reloading ----------------------------------------------------------------------

    def _maybe_reload(self) -> None:
        try:
            generation = (self.state_dir / "state.json").stat().st_mtime_ns
        except FileNotFoundError:
            generation = None
        if generation != self._generation:
            self._reload()

    def _reload(self) -> None:
        try:
            self._generation = (self.state_dir / "state.json").stat().st_mtime_ns
        except FileNotFoundError:
            self._generation = None
        active, fallback = active_model(self.state_dir), fallback_model(self.state_dir)
        self.primary = self._load(active, self.primary)
        self.fallback = self._load(fallback, self.fallback)
        if active is not None and active.on_probation:
            probation.hold(self.state_dir)
        if self.primary is None:
            self._switch(self.reason or ("the active model does not load" if active else "no active model"))
        elif self._on_fallback and self.primary is not None and (active is None or self.reason.startswith("the ")):
            self._on_fallback, self.reason = False, ""

    def _load(self, installed: InstalledModel | None, current: _Loaded | None) -> _Loaded | None:
        if installed is None:
            return None
        if current is not None and current.installed.model.sha256 == installed.model.sha256:
            if current.installed.on_probation != installed.on_probation:
                current.installed = installed
            return current
        try:
            return _Loaded(installed, self.threads)
        except Exception as error:
            self.reason = f"the {installed.slot} model v{installed.version} does not load: {error}"
            logger.warning(self.reason)
            if installed.on_probation:
                probation.fail(self.state_dir, "probation: errors", self.reason)
            return None

    def close(self) -> None:
        """Stop running the probation cleanly: a restart takes it over, without counting an interruption."""
        probation.release_hold(self.state_dir)

    def _notify(self, record: InferenceRecord) -> None:
        for observer in self.observers:
            try:
                observer(record)
            except Exception:  # an observer must never take the answer down
                logger.exception("runtime observer failed")


def _fit(loaded: _Loaded | None, batch: np.ndarray, limits: RequestLimits) -> np.ndarray | InputRefused | None:
    """The batch as `loaded` takes it, or why it does not fit (None: no such model)."""
    if loaded is None:
        return None
    session = loaded.session
    try:
        return fit_batch(batch, session.inputs, loaded.installed.model.inputs,
                         session.dynamic_batch or loaded.task == "detection", limits)  # a detector splits batches
    except InputRefused as refused:
        return refused
