"""NVIDIA Jetson: `tegrastats`, which prints one line per interval with RAM, per-core CPU load and
clock, GPU load, temperatures and INA3221 power rails.

    >>> parse_tegrastats("RAM 2448/30536MB ... CPU [1%@729,off] ... tj@45.875C VIN_SYS_5V0 3839mW/3839mW")
    {'ram_used_mb': 2448.0, 'cpu_mhz': 729.0, ..., 'temps': {'tj': 45.875}, 'rails_w': {'VIN_SYS_5V0': 3.839}}

Power rails read here are the same INA3221 monitors as the `ina3221` sysfs sensor; tegrastats also
works where those sysfs files are not readable to the agent's user.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from collections.abc import Callable

from edgeship.device.sensors import Channel, Sensor

_INPUT_RAILS = ("VDD_IN", "VIN_SYS_5V0", "POM_5V_IN")
_NOT_RAILS = {"RAM", "SWAP", "IRAM", "LFB"}
_DISABLED_C = -200.0
_TEMP = re.compile(r"\b([A-Za-z][\w.-]*)@(-?\d+(?:\.\d+)?)C\b")
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]+) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_GPU = re.compile(r"\bGR3D_FREQ (\d+)%")
_FIRST_LINE_S = 3.0

Spawn = Callable[[int], subprocess.Popen]


def parse_tegrastats(line: str) -> dict:
    """One tegrastats line as numbers; keys present only when the line has them."""
    parsed: dict = {}
    if match := _RAM.search(line):
        parsed["ram_used_mb"], parsed["ram_total_mb"] = float(match[1]), float(match[2])
    if match := _CPU.search(line):
        cores = [c.strip() for c in match[1].split(",") if c.strip()]
        online = [c for c in cores if c != "off"]
        loads = [float(c.split("%")[0]) for c in online if "%" in c]
        clocks = [float(c.split("@")[1]) for c in online if "@" in c]
        parsed["cpu_cores_online"] = float(len(online))
        if loads:
            parsed["cpu_load"] = sum(loads) / len(loads)
        if clocks:
            parsed["cpu_mhz"] = sum(clocks) / len(clocks)
            parsed["cpu_mhz_min"] = min(clocks)
    if match := _GPU.search(line):
        parsed["gpu_load"] = float(match[1])
    parsed["temps"] = {name: float(value) for name, value in _TEMP.findall(line)
                       if float(value) > _DISABLED_C and name.upper() not in {"EMC_FREQ", "GR3D_FREQ"}}
    parsed["rails_w"] = {name: int(now) / 1e3 for name, now, _ in _RAIL.findall(line) if name not in _NOT_RAILS}
    return parsed


def _channels(parsed: dict) -> dict[str, float]:
    values = {f"tegrastats/{key}": value for key, value in parsed.items()
              if key in ("ram_used_mb", "cpu_load", "cpu_mhz", "cpu_mhz_min", "gpu_load")}
    values.update({f"tegrastats/temp_{name}": value for name, value in parsed.get("temps", {}).items()})
    rails = parsed.get("rails_w", {})
    values.update({f"tegrastats/{name}": value for name, value in rails.items()})
    total = next((rails[name] for name in _INPUT_RAILS if name in rails), None)
    if total is not None:
        values["tegrastats/total"] = total
    return values


_UNITS = {"ram_used_mb": "MB", "cpu_load": "%", "cpu_mhz": "MHz", "cpu_mhz_min": "MHz", "gpu_load": "%"}


def _unit(key: str) -> Channel:
    short = key.removeprefix("tegrastats/")
    if short == "total":
        return Channel("W", total_power=True)
    if short.startswith("temp_"):
        return Channel("C")
    return Channel(_UNITS.get(short, "W"))


def _spawn_tegrastats(interval_ms: int) -> subprocess.Popen:
    return subprocess.Popen(["tegrastats", "--interval", str(interval_ms)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True, bufsize=1)


class Tegrastats(Sensor):
    """A `tegrastats` process for the length of a sampling session; `read` gives its latest line."""

    name, kind = "tegrastats", "power"
    power_rank = 20  # the module's input rail, like the ina3221 sensor

    def __init__(self, spawn: Spawn | None = None, interval_ms: int = 500):
        super().__init__()
        if spawn is None and shutil.which("tegrastats") is None:
            self._absent("`tegrastats` is not on PATH: not a Jetson (or L4T's tools are not installed)")
            return
        self._spawn = spawn or _spawn_tegrastats
        self._interval_ms = interval_ms
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._latest: dict[str, float] = {}
        self._first = threading.Event()
        try:
            self.start()
            self._first.wait(_FIRST_LINE_S)
        except OSError as error:
            self._absent(f"`tegrastats` would not start: {error}")
            return
        finally:
            self.stop()
        if not self._latest:
            self._absent(f"`tegrastats` printed nothing parseable within {_FIRST_LINE_S:g} s")
            return
        self.available, self.detail = True, f"tegrastats every {interval_ms} ms"
        self.channels = {key: _unit(key) for key in self._latest}

    def start(self) -> None:
        self._latest, self._first = {}, threading.Event()
        self._process = self._spawn(self._interval_ms)
        self._reader = threading.Thread(target=self._follow, args=(self._process,), daemon=True,
                                        name="edgeship-tegrastats")
        self._reader.start()

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)

    def read(self) -> dict[str, float]:
        for key in self._latest:
            self.channels.setdefault(key, _unit(key))
        return dict(self._latest)

    def _follow(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            values = _channels(parse_tegrastats(line))
            if values:
                self._latest = values
                self._first.set()
