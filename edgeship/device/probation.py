"""Probation: a newly installed model must prove itself, or the device rolls back by itself.

After the swap the new model is active but on probation (state.json `probation`):

    installed --N good inferences within the latency budget before the deadline--> confirmed
    installed --more than max_failures bad ones (error, wrong output, over budget)--> rolled_back
    installed --deadline passes unconfirmed--> rolled_back ("probation: deadline")
    installed --the process running it stops cleanly (SIGTERM)--> installed (the next start takes it over)
    installed --the process running it dies unconfirmed--> installed again on the next start, counts kept
    installed --it died MAX_RESTARTS times--> rolled_back ("probation: interrupted")
    any time --confirm() by the application or `edgeship-device confirm`--> confirmed

The deadline counts time served on the device's monotonic clock, kept across restarts and reboots
(a wall clock stepped forward does not end a probation). Only what was observed decides: inferences
the runtime ran (a client's request refused by edgeship.device.request_checks never counts), the
deadline, or a process that keeps dying while it runs the model.

Rolling back makes the last-known-good active again and marks the version bad on
this device: the updater will not install that file again; a newer version is a
new file and is offered as usual. Every transition is an UpdateEvent in events.jsonl.

    >>> record_inference(state_dir, latency_ms=3.2, ok=True)    # the runtime feeds every answer
    >>> confirm(state_dir)                                       # or the application says it is good
    >>> expire(state_dir)                                        # the updater's periodic check
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from edgeship.device.state import (BadRelease, DeviceState, Holder, Probation, UpdateEvent, changing_state,
                                   is_intact, load_identity, log_event)
from edgeship.ota.channel import ReleasedModel

logger = logging.getLogger(__name__)

MAX_RESTARTS = 3  # deaths of the process running a probation before it rolls back


@dataclass(frozen=True)
class ProbationPolicy:
    """How a new model earns its place (`edgeship-device update --confirm-after ... --probation-s ...`)."""

    required: int = 20  # good inferences to confirm
    max_failures: int = 2  # bad ones tolerated before rolling back
    deadline_s: float = 600.0


def begin(model: ReleasedModel, policy: ProbationPolicy, holder: Holder | None) -> Probation:
    now = datetime.now(timezone.utc)
    return Probation(version=model.version, sha256=model.sha256, started_at=now,
                     deadline=now + timedelta(seconds=policy.deadline_s), deadline_s=policy.deadline_s,
                     clock_at=time.monotonic(), clock_boot=_boot_id(), required=policy.required,
                     max_failures=policy.max_failures, latency_budget_ms=model.latency_budget_ms, holder=holder)


def served(probation: Probation) -> float:
    """Seconds of the device's monotonic clock the probation has run (across restarts and reboots)."""
    if probation.clock_at is None or probation.clock_boot != _boot_id():
        return probation.served_s  # after a reboot: counted again from the first process that takes it up
    return probation.served_s + max(0.0, time.monotonic() - probation.clock_at)


def _ticked(probation: Probation, **update) -> Probation:
    """The probation with its time served brought up to date (to save)."""
    return probation.model_copy(update={"served_s": served(probation), "clock_at": time.monotonic(),
                                        "clock_boot": _boot_id(), **update})


def _past_deadline(probation: Probation) -> bool:
    if probation.deadline_s is None:  # a probation begun before time served was kept
        return datetime.now(timezone.utc) > probation.deadline
    return served(probation) > probation.deadline_s


def record_inference(state_dir: str | Path, latency_ms: float, ok: bool) -> UpdateEvent | None:
    """Count one inference of the active model towards its probation; confirm or roll back when decided.

    Cheap when there is no probation (one stat of state.json, cached by mtime).
    """
    state_dir = Path(state_dir)
    if not _on_probation(state_dir):
        return None
    with changing_state(state_dir) as state:
        probation = state.probation
        if probation is None:
            return None
        within = probation.latency_budget_ms is None or latency_ms <= probation.latency_budget_ms
        update = {"successes": probation.successes + (ok and within),
                  "failures": probation.failures + (not (ok and within)),
                  "slow": probation.slow + (ok and not within)}
        probation = _ticked(probation, **update)
        if probation.failures > probation.max_failures:
            why = "latency" if probation.slow * 2 >= probation.failures else "errors"
            return _roll_back(state_dir, state, f"probation: {why}",
                              f"{probation.failures} bad of {probation.successes + probation.failures} inferences "
                              f"(budget {probation.latency_budget_ms} ms, last {latency_ms:.2f} ms)")
        if probation.successes >= probation.required:
            return _confirm(state_dir, state, f"{probation.successes} good inferences")
        state.probation = probation
        state.save(state_dir)
    return None


def confirm(state_dir: str | Path, reason: str = "confirmed by the application") -> UpdateEvent | None:
    """Confirm the model on probation now (the application found it good); None when nothing is on probation."""
    state_dir = Path(state_dir)
    with changing_state(state_dir) as state:
        if state.probation is None:
            return None
        return _confirm(state_dir, state, reason)


def fail(state_dir: str | Path, reason: str, detail: str = "") -> UpdateEvent | None:
    """End the probation as failed: roll back to the last-known-good now."""
    state_dir = Path(state_dir)
    with changing_state(state_dir) as state:
        if state.probation is None:
            return None
        return _roll_back(state_dir, state, reason, detail)


def expire(state_dir: str | Path) -> UpdateEvent | None:
    """Roll back a probation whose deadline passed (in time served), or whose holder died MAX_RESTARTS times;
    resume one whose holder died fewer times. None unless it rolled back."""
    state_dir = Path(state_dir)
    with changing_state(state_dir) as state:
        probation = state.probation
        if probation is None:
            return None
        if _past_deadline(probation):
            return _roll_back(state_dir, state, "probation: deadline",
                              f"{probation.successes} of {probation.required} good inferences in "
                              f"{probation.deadline_s or 0:g} s served")
        if probation.holder is not None and not _alive(probation.holder):
            if probation.restarts + 1 >= MAX_RESTARTS:
                return _roll_back(state_dir, state, "probation: interrupted",
                                  f"the process running it died {probation.restarts + 1} times before confirming")
            logger.warning("process %d died while running the probation of version %s; resuming it (%d of %d good)",
                           probation.holder.pid, probation.version, probation.successes, probation.required)
            state.probation = _ticked(probation, holder=None, restarts=probation.restarts + 1)
            state.save(state_dir)
        elif probation.clock_boot != _boot_id() and probation.clock_at is not None:
            state.probation = _ticked(probation)  # the first look after a reboot: time served counts on again
            state.save(state_dir)
    return None


def hold(state_dir: str | Path) -> bool:
    """Make this process the probation's holder (its death unconfirmed means rollback); False if none."""
    with changing_state(state_dir) as state:
        if state.probation is None:
            return False
        holder = state.probation.holder
        if holder is not None and (holder.pid == os.getpid() or _alive(holder)):
            return True  # this process already holds it, or another live one does (the updater's own check)
        state.probation = _ticked(state.probation, holder=this_process())
        state.save(Path(state_dir))
    return True


def release_hold(state_dir: str | Path) -> None:
    """This process stops running the probation cleanly (e.g. the updater exits and leaves it to the app)."""
    with changing_state(state_dir) as state:
        if state.probation is not None and state.probation.holder is not None \
                and state.probation.holder.pid == os.getpid():
            state.probation = _ticked(state.probation, holder=None)
            state.save(Path(state_dir))


def roll_back(state_dir: str | Path, reason: str = "rolled back by the operator") -> UpdateEvent | None:
    """Make the last-known-good active and mark the current active model bad (`edgeship-device rollback`)."""
    state_dir = Path(state_dir)
    with changing_state(state_dir) as state:
        if state.active is None or state.last_known_good is None or state.last_known_good.sha256 == state.active.sha256:
            return None
        return _roll_back(state_dir, state, reason, "")


def this_process() -> Holder:
    return Holder(pid=os.getpid(), boot_id=_boot_id(), start_ticks=_start_ticks(os.getpid()))


# --- transitions ------------------------------------------------------------------------------

def _confirm(state_dir: Path, state: DeviceState, reason: str) -> UpdateEvent:
    version = state.active.version if state.active else None
    state.probation = None  # last_known_good stays the model before: what an operator's rollback returns to
    state.save(state_dir)
    logger.info("confirmed version %s: %s", version, reason)
    return log_event(state_dir, "confirmed", version, _target(state_dir), reason)


def _roll_back(state_dir: Path, state: DeviceState, reason: str, detail: str) -> UpdateEvent:
    bad = state.active
    good = state.last_known_good if is_intact(state_dir, state.last_known_good) else None
    if bad is not None and not state.is_bad(bad.sha256):
        state.bad.append(BadRelease(sha256=bad.sha256, version=bad.version, reason=reason,
                                    at=datetime.now(timezone.utc)))
    state.active = good if good is not None and (bad is None or good.sha256 != bad.sha256) else None
    state.probation, state.replaced = None, None
    state.save(state_dir)
    logger.warning("rolled back version %s -> %s: %s %s", bad.version if bad else None,
                   state.active.version if state.active else "nothing", reason, detail)
    text = f"{reason}; {detail}" if detail else reason
    return log_event(state_dir, "rolled_back", bad.version if bad else None, _target(state_dir), text)


def _target(state_dir: Path) -> str | None:
    identity = load_identity(state_dir)
    return identity.target if identity else None


_mtime_cache: dict[Path, tuple[int, bool]] = {}


def _on_probation(state_dir: Path) -> bool:
    try:
        mtime = (state_dir / "state.json").stat().st_mtime_ns
    except FileNotFoundError:
        return False
    cached = _mtime_cache.get(state_dir)
    if cached and cached[0] == mtime:
        return cached[1]
    on = DeviceState.load(state_dir).probation is not None
    _mtime_cache[state_dir] = (mtime, on)
    return on


def _alive(holder: Holder) -> bool:
    if holder.boot_id and holder.boot_id != _boot_id():
        return False  # the device rebooted since
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if _process_state(holder.pid) == "Z":
        return False  # killed, not yet reaped
    return not holder.start_ticks or _start_ticks(holder.pid) == holder.start_ticks  # not a reused pid


def _process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return ""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int:
    try:  # the main thread's entry: the same as /proc/PID/stat on Linux, and QEMU user-mode passes it through
        stat = Path(f"/proc/{pid}/task/{pid}/stat").read_text()  # (its own /proc/self/stat differs per thread)
        return int(stat.rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return 0
