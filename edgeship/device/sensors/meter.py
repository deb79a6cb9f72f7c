"""External power meters: whatever measures the device from outside (a USB power meter, a smart
plug, a lab supply) behind one small interface.

    >>> class MyMeter:
    ...     name = "um34c"
    ...     def read_power_w(self) -> float: ...
    >>> sensor = MeterSensor(MyMeter())

The agent's `--power-meter-cmd "um34c-read --watts"` wraps a command that prints watts as a
`CommandMeter`. Where a meter is present, its figure wins over on-board sensors: it sees the whole device.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Sequence
from typing import Protocol

from edgeship.device.sensors import Channel, RunTool, Sensor, run_tool

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


class PowerMeter(Protocol):
    """A meter the device is plugged into."""

    name: str

    def read_power_w(self) -> float:
        """The device's power draw now, in watts."""


class CommandMeter:
    """A meter read by running a command that prints the power in watts (the first number it prints)."""

    def __init__(self, command: str | Sequence[str], run: RunTool = run_tool):
        self.argv = shlex.split(command) if isinstance(command, str) else list(command)
        self.name = f"command {self.argv[0]}" if self.argv else "command"
        self._run = run

    def read_power_w(self) -> float:
        output = self._run(self.argv)
        match = _NUMBER.search(output)
        if not match:
            raise ValueError(f"the power meter command printed no number: {output.strip()[:80]!r}")
        return float(match.group())


class MeterSensor(Sensor):
    """An external meter as a sensor plug-in (absent when no meter is configured)."""

    name, kind = "meter", "power"
    power_rank = 10  # the whole device, at its plug

    def __init__(self, meter: PowerMeter | None):
        super().__init__()
        self._meter = meter
        if meter is None:
            self._absent("no external power meter configured (edgeship-device agent --power-meter-cmd)")
            return
        try:
            meter.read_power_w()
        except (OSError, ValueError, subprocess.SubprocessError) as error:
            self._absent(f"the power meter ({meter.name}) did not answer: {type(error).__name__}: {error}")
            return
        self.available, self.detail = True, f"external meter: {meter.name}"
        self.channels = {"meter/power": Channel("W", total_power=True)}

    def read(self) -> dict[str, float]:
        return {"meter/power": self._meter.read_power_w()}
