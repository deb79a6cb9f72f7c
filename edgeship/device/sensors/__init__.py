"""Sensor plug-ins: temperature, CPU clock, throttling and power, read from what the device exposes.

Each plug-in reads one source (a sysfs tree, `vcgencmd`, `tegrastats`, an external meter) and says
whether it is available here; an absent sensor is reported as absent, with the reason, never guessed.
The agent samples the available ones in its own process while a benchmark's child process runs, so
sampling never shares an interpreter with the timed loop.

    >>> sensors = discover_sensors()                       # every plug-in, available or not
    >>> [s.info().name for s in sensors if s.available]
    >>> with SensorSampler(sensors, interval_s=1.0) as sampler:
    ...     run_the_benchmark()                            # reports its timed window (monotonic clock)
    >>> report = sampler.report(start, end, inferences=1000)   # a SensorReport record
    >>> report.power_w, report.energy_per_inference_mj, report.throttled

Readers of sysfs take a `root` ("/" on a device, a fake tree in tests); readers of tools take a
`run` callable (argv -> stdout), so parsers are tested on recorded outputs.
No torch, TensorFlow, MLflow or Prefect here: this runs on the device.
"""

from __future__ import annotations

import math
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeship.records import ChannelStats, SensorInfo, SensorReport

_TIMELINE_POINTS = 600  # most samples kept in a report's timeline (evenly thinned beyond)
_TOOL_TIMEOUT_S = 5.0

RunTool = Callable[[Sequence[str]], str]


def run_tool(argv: Sequence[str]) -> str:
    """Run a device tool and return its stdout; OSError or CalledProcessError when it cannot."""
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S, check=True).stdout


@dataclass(frozen=True)
class Channel:
    """One value a sensor reports."""

    unit: str  # C, MHz, W, flag, flags, count, state, %
    throttle: str | None = None  # "flag": above 0 means throttling now; "counter": an increase means it happened
    total_power: bool = False  # the device's whole draw (or the widest this sensor sees), in W


class Sensor:
    """Base of the plug-ins: probe in __init__ (fill `channels`, `available`, `detail`), then `read`."""

    name = "sensor"
    kind = "temperature"
    power_rank = 100  # where several sensors give a total power, the lowest rank (closest to the wall) wins

    def __init__(self) -> None:
        self.available = False
        self.detail = ""
        self.channels: dict[str, Channel] = {}

    def read(self) -> dict[str, float]:
        """The current value of each channel, keyed "<sensor>/<channel>"; missing keys: not readable now."""
        raise NotImplementedError

    def start(self) -> None:
        """Called before a sampling session (a streaming tool starts here)."""

    def stop(self) -> None:
        """Called after a sampling session."""

    def info(self) -> SensorInfo:
        """What this plug-in found here, as /info reports it."""
        return SensorInfo(name=self.name, kind=self.kind, available=self.available, detail=self.detail,
                          channels=sorted(self.channels))

    def _absent(self, why: str) -> None:
        self.available, self.detail, self.channels = False, why, {}


def discover_sensors(root: str | Path = "/", run: RunTool = run_tool, meter_command: Sequence[str] | None = None,
                     tegrastats_spawn=None) -> list[Sensor]:
    """Every sensor plug-in, each probed against this device (or against a fake tree under `root`)."""
    from edgeship.device.sensors import jetson, meter, raspberrypi, sysfs

    sensors: list[Sensor] = [
        sysfs.ThermalZones(root), sysfs.CpuFreq(root), sysfs.CoolingDevices(root), sysfs.X86ThrottleCounters(root),
        raspberrypi.RaspberryPiThrottle(run), jetson.Tegrastats(spawn=tegrastats_spawn),
        sysfs.Rapl(root), sysfs.Ina3221(root), raspberrypi.RaspberryPiPmic(run),
    ]
    if meter_command:
        sensors.append(meter.MeterSensor(meter.CommandMeter(meter_command)))
    else:
        sensors.append(meter.MeterSensor(None))
    return sensors


class SensorSampler:
    """Reads the available sensors every `interval_s` on a thread, for as long as a `with` lasts.

    One reading is taken on entry and one on exit, so even a run shorter than the interval is bracketed.
    A sensor that fails while sampling is dropped from the rest of the session (and said so in `errors`).
    """

    def __init__(self, sensors: Sequence[Sensor], interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.sensors = list(sensors)
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.errors: list[str] = []
        self._live = [s for s in self.sensors if s.available]
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> SensorSampler:
        for sensor in list(self._live):
            try:
                sensor.start()
            except Exception as error:  # a tool that will not start leaves the others sampling
                self._drop(sensor, error)
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="edgeship-sensors", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        for sensor in self._live:
            try:
                sensor.stop()
            except Exception:
                pass

    def report(self, start: float, end: float, inferences: int) -> SensorReport:
        """Summarise the samples over the timed run [start, end] (this sampler's clock)."""
        channels = {key: channel for s in self.sensors if s.available for key, channel in s.channels.items()}
        ranks = {key: s.power_rank for s in self.sensors for key in s.channels}
        report = summarize(self.samples, channels, start, end, inferences, self.interval_s, ranks)
        return report.model_copy(update={"sensors": [s.info() for s in self.sensors], "problems": list(self.errors)})

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        now, values = self._clock(), {}
        for sensor in list(self._live):
            try:
                values.update(sensor.read())
            except Exception as error:
                self._drop(sensor, error)
        self.samples.append((now, values))

    def _drop(self, sensor: Sensor, error: Exception) -> None:
        self._live.remove(sensor)
        self.errors.append(f"sensor {sensor.name} stopped: {type(error).__name__}: {error}")


def summarize(samples: Sequence[tuple[float, dict[str, float]]], channels: dict[str, Channel], start: float,
              end: float, inferences: int, interval_s: float, power_ranks: dict[str, int] | None = None
              ) -> SensorReport:
    """Turn timed sensor samples into a SensorReport for the timed run [start, end].

    Channel statistics and power use the samples inside the run; when the run was shorter than the
    sampling interval, the first sample after it stands in (and power then covers a wider span).
    Energy is the mean total power times the run's duration.
    """
    inside = [(t, v) for t, v in samples if start <= t <= end]
    if not inside:
        inside = [next(((t, v) for t, v in samples if t > end), samples[-1])] if samples else []
    before = [v for t, v in samples if t < start]

    stats: dict[str, ChannelStats] = {}
    for key, channel in channels.items():
        values = [v[key] for _, v in inside if key in v and math.isfinite(v[key])]
        if values:
            stats[key] = ChannelStats(unit=channel.unit, min=min(values), mean=sum(values) / len(values),
                                      max=max(values), first=values[0], last=values[-1])

    power_source, power_w, energy_j, per_inference = None, None, None, None
    totals = [k for k, c in channels.items() if c.total_power and k in stats]
    if totals:
        power_source = min(totals, key=lambda k: ((power_ranks or {}).get(k, 100), k))
        power_w = stats[power_source].mean
        energy_j = power_w * max(end - start, 0.0)
        per_inference = energy_j / inferences * 1e3 if inferences else None

    throttled, reasons = _throttling(channels, inside, before)
    timeline_s, timeline = _timeline(samples, channels, start)
    return SensorReport(interval_s=interval_s, samples=len(samples), channels=stats, timeline_s=timeline_s,
                        timeline=timeline, power_source=power_source, power_w=power_w, energy_j=energy_j,
                        energy_per_inference_mj=per_inference, throttled=throttled, throttle_detail=reasons)


def _throttling(channels: dict[str, Channel], inside, before) -> tuple[bool | None, str]:
    watched = {k: c for k, c in channels.items() if c.throttle}
    if not watched:
        return None, ""
    seen = []
    for key, channel in watched.items():
        values = [v[key] for _, v in inside if key in v]
        if not values:
            continue
        if channel.throttle == "flag" and max(values) > 0:
            seen.append(key)
        elif channel.throttle == "counter":
            baseline = next((v[key] for v in reversed(before) if key in v), values[0])
            if values[-1] > baseline:
                seen.append(f"{key} +{values[-1] - baseline:g}")
    return bool(seen), ("throttling seen: " + ", ".join(seen)) if seen else ""


def _timeline(samples, channels: dict[str, Channel], start: float) -> tuple[list[float], dict[str, list]]:
    step = max(1, math.ceil(len(samples) / _TIMELINE_POINTS))
    kept = list(samples[::step])
    if samples and kept[-1] is not samples[-1]:
        kept.append(samples[-1])
    keys = [k for k in channels if any(k in v for _, v in kept)]
    return ([round(t - start, 3) for t, _ in kept],
            {k: [v.get(k) for _, v in kept] for k in keys})


def read_text(path: Path) -> str | None:
    """A sysfs file's stripped content, or None when it is missing or cannot be read now."""
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None


def read_number(path: Path) -> float | None:
    """A sysfs file holding one number, or None."""
    text = read_text(path)
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None
