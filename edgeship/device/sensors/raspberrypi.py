"""Raspberry Pi sensors through `vcgencmd`: throttling flags (`get_throttled`) and PMIC rails
(`pmic_read_adc`, Raspberry Pi 5).

    >>> decode_throttled(parse_get_throttled("throttled=0x50005"))["under_voltage"]
    True
    >>> pmic_power_w(parse_pmic_read_adc(open("pmic.txt").read()))
    3.1
"""

from __future__ import annotations

import re
import subprocess

from edgeship.device.sensors import Channel, RunTool, Sensor, run_tool

# Bits of `vcgencmd get_throttled`: 0-3 are the state now, 16-19 latch once it happened since boot.
THROTTLE_BITS = {0: "under_voltage", 1: "freq_capped", 2: "throttled", 3: "soft_temp_limit"}
_OCCURRED_SHIFT = 16
_THROTTLED = re.compile(r"throttled=(0x[0-9a-fA-F]+|\d+)")
_PMIC_LINE = re.compile(r"^\s*(?P<rail>\S+?)_(?P<which>[AV])\s+(?:current|volt)\(\d+\)=(?P<value>[-+0-9.eE]+)[AV]\s*$")


def parse_get_throttled(text: str) -> int:
    """The bit field of `vcgencmd get_throttled` ("throttled=0x50005"); ValueError on anything else."""
    match = _THROTTLED.search(text)
    if not match:
        raise ValueError(f"not `vcgencmd get_throttled` output: {text.strip()[:80]!r}")
    return int(match.group(1), 0)


def decode_throttled(bits: int) -> dict[str, bool]:
    """Each flag now and since boot: {"under_voltage": ..., "under_voltage_occurred": ..., ...}."""
    flags = {}
    for bit, name in THROTTLE_BITS.items():
        flags[name] = bool(bits >> bit & 1)
        flags[f"{name}_occurred"] = bool(bits >> (bit + _OCCURRED_SHIFT) & 1)
    return flags


def parse_pmic_read_adc(text: str) -> dict[str, dict[str, float]]:
    """Rails of `vcgencmd pmic_read_adc`: {"VDD_CORE": {"A": 0.74, "V": 0.88}, "EXT5V": {"V": 5.1}, ...}."""
    rails: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        match = _PMIC_LINE.match(line)
        if match:
            rails.setdefault(match["rail"], {})[match["which"]] = float(match["value"])
    return rails


def pmic_power_w(rails: dict[str, dict[str, float]]) -> float:
    """Sum of current x voltage over the rails that report both (the board after the PMIC, in W)."""
    return sum(r["A"] * r["V"] for r in rails.values() if "A" in r and "V" in r)


class RaspberryPiThrottle(Sensor):
    """Under-voltage, frequency capping, throttling and soft temperature limit, now and since boot."""

    name, kind = "rpi-throttle", "throttle"

    def __init__(self, run: RunTool = run_tool):
        super().__init__()
        self._run = run
        try:
            bits = parse_get_throttled(run(["vcgencmd", "get_throttled"]))
        except (OSError, subprocess.SubprocessError, ValueError) as error:
            self._absent(f"`vcgencmd get_throttled` is not available ({type(error).__name__}): not a Raspberry Pi")
            return
        self.available = True
        self.detail = f"vcgencmd get_throttled (0x{bits:x} at start)"
        self.channels = {f"rpi-throttle/{name}": Channel("flag", throttle="flag") for name in THROTTLE_BITS.values()}
        # The latched bits catch a throttling episode that falls between two samples.
        self.channels["rpi-throttle/occurred"] = Channel("flags", throttle="counter")

    def read(self) -> dict[str, float]:
        bits = parse_get_throttled(self._run(["vcgencmd", "get_throttled"]))
        values = {f"rpi-throttle/{name}": float(bits >> bit & 1) for bit, name in THROTTLE_BITS.items()}
        values["rpi-throttle/occurred"] = float(bits >> _OCCURRED_SHIFT & 0xF)
        return values


class RaspberryPiPmic(Sensor):
    """Raspberry Pi 5 board power from its PMIC's rail currents and voltages."""

    name, kind = "rpi-pmic", "power"
    power_rank = 30  # after the PMIC: no USB peripherals, no conversion loss

    def __init__(self, run: RunTool = run_tool):
        super().__init__()
        self._run = run
        try:
            rails = parse_pmic_read_adc(run(["vcgencmd", "pmic_read_adc"]))
        except (OSError, subprocess.SubprocessError) as error:
            self._absent(f"`vcgencmd pmic_read_adc` is not available ({type(error).__name__}): "
                         "not a Raspberry Pi 5")
            return
        powered = sorted(name for name, r in rails.items() if "A" in r and "V" in r)
        if not powered:
            self._absent("`vcgencmd pmic_read_adc` gave no rail readings: only a Raspberry Pi 5 has this PMIC")
            return
        self.available = True
        self.detail = (f"{len(powered)} PMIC rails summed (current x voltage); excludes USB peripherals and the "
                       "5 V input's conversion loss")
        self.channels = {"rpi-pmic/total": Channel("W", total_power=True)}
        if "VDD_CORE" in powered:
            self.channels["rpi-pmic/VDD_CORE"] = Channel("W")

    def read(self) -> dict[str, float]:
        rails = parse_pmic_read_adc(self._run(["vcgencmd", "pmic_read_adc"]))
        values = {"rpi-pmic/total": pmic_power_w(rails)}
        core = rails.get("VDD_CORE", {})
        if "A" in core and "V" in core:
            values["rpi-pmic/VDD_CORE"] = core["A"] * core["V"]
        return values
