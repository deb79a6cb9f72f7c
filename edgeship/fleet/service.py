"""The rollout controller as a long-running service: a pass when something changed, not a flow run a minute.

`edgeship fleet controller` runs passes in one process (no flow run per pass: 1,440 a day on a 60 s schedule)
when one of these happened, at most every `min_interval_s`:
  * new telemetry reached the rollups (the newest window in the channel's device rows moved),
  * a stage's soak ended (the hold was waiting for it),
  * `max_interval_s` passed (a heartbeat: drift check, fleet metrics in MLflow, a pass even on a silent fleet).
Decisions that change something (advance, complete, abort) are logged to MLflow at once; fleet metrics and the
drift check run on the heartbeat. The `rollout-controller` Prefect deployment stays: the Prefect UI's Run
button (channel, targets, apply=false for a dry run) starts the same pass as a flow run, with artifacts.

    >>> service = ControllerService(lambda reason: controller_pass(...), store, "stable", policy)
    >>> service.run(stop_event)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from datetime import datetime, timedelta, timezone

from edgeship.fleet.policy import ChannelPolicy
from edgeship.fleet.rollout import TargetResult, control_channel

logger = logging.getLogger(__name__)


def soak_ends(results: list[TargetResult], policy: ChannelPolicy, now: datetime) -> list[datetime]:
    """When the stages the controller holds (and that have not soaked yet) will have soaked."""
    ends = []
    for result in results:
        status = result.status
        if status is not None and status.stage_started_at is not None and result.decision.action == "hold":
            end = status.stage_started_at + timedelta(seconds=policy.soak_s)
            if end > now:
                ends.append(end)
    return ends


class ControllerService:
    """Runs `run_pass(reason)` when something changed (see the module docstring), until stopped."""

    def __init__(self, run_pass: Callable[[str], list[TargetResult]], store, channel: str, policy: ChannelPolicy,
                 min_interval_s: float = 10.0, max_interval_s: float = 300.0, poll_s: float = 1.0):
        self.run_pass, self.store, self.channel, self.policy = run_pass, store, channel, policy
        self.min_interval_s, self.max_interval_s, self.poll_s = min_interval_s, max_interval_s, poll_s
        self.passes: list[tuple[datetime, str]] = []
        self._last: float | None = None
        self._seen: datetime | None = None
        self._soaks: list[datetime] = []

    def due(self, now: datetime) -> str | None:
        """Why a pass is due now (None: not yet)."""
        if self._last is None:
            return "first pass"
        elapsed = time.monotonic() - self._last
        if elapsed < self.min_interval_s:
            return None
        if elapsed >= self.max_interval_s:
            return "heartbeat"
        if self.store.latest_window(self.channel) != self._seen:
            return "new telemetry"
        if any(end <= now for end in self._soaks):
            return "a stage's soak ended"
        return None

    def step(self) -> bool:
        """One check: a pass when one is due; whether it ran."""
        now = datetime.now(timezone.utc)
        reason = self.due(now)
        if reason is None:
            return False
        self._seen = self.store.latest_window(self.channel)
        self._last = time.monotonic()
        try:
            results = self.run_pass(reason)
        except Exception:  # a failed pass (a store or repository outage) is retried on the next trigger
            logger.exception("controller pass failed (%s)", reason)
            return True
        self._soaks = soak_ends(results, self.policy, now)
        self.passes.append((now, reason))
        return True

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.step()
            stop.wait(self.poll_s)


def controller_pass(repository, store, channel: str, params, reason: str, tracking_uri: str | None = None,
                    apply: bool = True, writer=nullcontext, start_retraining=None) -> list[TargetResult]:
    """What a service pass does: decide and apply (edgeship.fleet.rollout), then record in MLflow what changed;
    on the heartbeat also fleet metrics and the drift check."""
    from edgeship.fleet.drift import drift_checks
    from edgeship.fleet.report import record_in_mlflow

    now = datetime.now(timezone.utc)
    results = control_channel(repository, store, channel, params.rollout.policy_for(channel), now=now, apply=apply,
                              writer=writer)
    heartbeat = reason in ("heartbeat", "first pass")
    for result in results:
        if tracking_uri and (result.applied or heartbeat):
            try:
                record_in_mlflow(tracking_uri, params.project.name, result, store)
            except Exception as error:  # the registry may not know the version
                logger.warning("could not record %s v%s in MLflow: %s", result.decision.target,
                               result.decision.version, error)
    if heartbeat:
        drift_checks(repository, store, channel, params.rollout.retraining, now, start=start_retraining)
    return results
