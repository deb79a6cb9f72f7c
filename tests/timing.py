"""How long a test may wait on this machine: one factor for slow or emulated machines.

`EDGESHIP_TEST_TIME_SCALE` (default 1) multiplies every timing threshold a test asserts or waits on: a
deadline that must pass, a timeout a process must beat, a wait for a record to arrive. A loaded 2-core CI
machine passes at 1; an aarch64 job under QEMU sets it to 5 or so. A test never writes a bare sub-second
limit: it writes `scaled(0.3)`, and polls with `wait_until` rather than sleeping a fixed time and hoping.
Speed targets are not tests at all: they live in `benchmarks/` (docs/writing-docs.md).

    >>> from timing import scaled, wait_until
    >>> wait_until(lambda: store.count_records() >= 6, 20, "six records")   # 20 s here, 100 s at a scale of 5
    >>> time.sleep(scaled(0.3))                                               # past a probation deadline of 0.2
"""

from __future__ import annotations

import os
import time

VARIABLE = "EDGESHIP_TEST_TIME_SCALE"


def _read() -> float:
    text = os.environ.get(VARIABLE, "1")
    try:
        scale = float(text)
    except ValueError:
        scale = 0.0
    if not scale >= 1:
        raise ValueError(f"${VARIABLE}={text!r}: give a factor of at least 1 (e.g. 5 under QEMU emulation)")
    return scale


TIME_SCALE = _read()


def scaled(seconds: float) -> float:
    """A timing threshold of `seconds` on a quiet x86 machine, as long as this machine needs."""
    return seconds * TIME_SCALE


def wait_until(condition, timeout_s: float = 60.0, what: str = "the condition", interval_s: float = 0.1):
    """Poll `condition` until it returns something true (returned) or `scaled(timeout_s)` passes (AssertionError)."""
    deadline = time.monotonic() + scaled(timeout_s)
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {scaled(timeout_s):g} s (${VARIABLE}={TIME_SCALE:g})")
        time.sleep(interval_s)
