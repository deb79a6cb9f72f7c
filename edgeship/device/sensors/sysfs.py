"""Sensors read from Linux sysfs: thermal zones, cpufreq, cooling devices, x86 throttle counters,
powercap RAPL energy counters and INA3221 power monitors (Jetson).

Each takes `root`, the directory that stands for "/", so tests point it at a fake tree:

    >>> ThermalZones("/").read()
    {'thermal/cpu-thermal': 48.3}
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from edgeship.device.sensors import Channel, Sensor, read_number, read_text

_DISABLED_C = -200.0  # Jetson reports switched-off zones as -256 C
_PROCESSOR_COOLING = re.compile(r"cpufreq|processor|cpu|gpu|devfreq", re.IGNORECASE)
_INPUT_RAILS = ("VDD_IN", "VIN_SYS_5V0", "POM_5V_IN", "VIN")  # a Jetson module's whole input


def _natural(path: Path) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name))


class ThermalZones(Sensor):
    """Temperatures from /sys/class/thermal/thermal_zone*/temp (millidegrees Celsius)."""

    name, kind = "thermal", "temperature"

    def __init__(self, root: str | Path = "/"):
        super().__init__()
        self._zones: dict[str, Path] = {}
        for zone in sorted(Path(root, "sys/class/thermal").glob("thermal_zone*"), key=_natural):
            kind = read_text(zone / "type") or zone.name
            value = read_number(zone / "temp")
            if value is None or value / 1000 <= _DISABLED_C:
                continue
            key = f"thermal/{kind}"
            if key in self._zones:
                key = f"thermal/{kind}-{zone.name.removeprefix('thermal_zone')}"
            self._zones[key] = zone / "temp"
        if not self._zones:
            self._absent("no readable /sys/class/thermal/thermal_zone*/temp")
            return
        self.available, self.detail = True, f"{len(self._zones)} thermal zone(s)"
        self.channels = {key: Channel("C") for key in self._zones}

    def read(self) -> dict[str, float]:
        values = {}
        for key, path in self._zones.items():
            value = read_number(path)
            if value is not None and value / 1000 > _DISABLED_C:
                values[key] = value / 1000
        return values


class CpuFreq(Sensor):
    """Current CPU clock per cpufreq policy (kHz in sysfs, MHz here)."""

    name, kind = "cpufreq", "clock"

    def __init__(self, root: str | Path = "/"):
        super().__init__()
        cpu = Path(root, "sys/devices/system/cpu")
        policies = sorted(cpu.glob("cpufreq/policy*"), key=_natural) or sorted(cpu.glob("cpu[0-9]*/cpufreq"),
                                                                                 key=lambda p: _natural(p.parent))
        self._paths: dict[str, Path] = {}
        ranges = []
        for policy in policies:
            label = policy.name if policy.name.startswith("policy") else policy.parent.name
            if read_number(policy / "scaling_cur_freq") is None:
                continue
            self._paths[f"cpufreq/{label}"] = policy / "scaling_cur_freq"
            low, high = read_number(policy / "cpuinfo_min_freq"), read_number(policy / "cpuinfo_max_freq")
            governor = read_text(policy / "scaling_governor")
            if low and high:
                ranges.append(f"{label} {low / 1000:g}-{high / 1000:g} MHz" + (f" ({governor})" if governor else ""))
        if not self._paths:
            self._absent("no cpufreq in /sys/devices/system/cpu (a VM, or the kernel has no cpufreq driver)")
            return
        self.available, self.detail = True, "; ".join(ranges) or f"{len(self._paths)} cpufreq policies"
        self.channels = {key: Channel("MHz") for key in self._paths}

    def read(self) -> dict[str, float]:
        values = {}
        for key, path in self._paths.items():
            value = read_number(path)
            if value is not None:
                values[key] = value / 1000
        return values


class CoolingDevices(Sensor):
    """Thermal cooling devices; a processor/GPU one above state 0 is the kernel capping clocks."""

    name, kind = "cooling", "throttle"

    def __init__(self, root: str | Path = "/"):
        super().__init__()
        self._paths: dict[str, Path] = {}
        for device in sorted(Path(root, "sys/class/thermal").glob("cooling_device*"), key=_natural):
            kind = read_text(device / "type")
            if not kind or read_number(device / "cur_state") is None:
                continue
            key = f"cooling/{kind}"
            if key in self._paths:
                key = f"cooling/{kind}-{device.name.removeprefix('cooling_device')}"
            self._paths[key] = device / "cur_state"
            self.channels[key] = Channel("state", throttle="flag" if _PROCESSOR_COOLING.search(kind) else None)
        if not self._paths:
            self._absent("no /sys/class/thermal/cooling_device*")
            return
        capping = [k for k, c in self.channels.items() if c.throttle]
        self.available = True
        self.detail = f"{len(self._paths)} cooling device(s); clock capping read from {capping or 'none'}"

    def read(self) -> dict[str, float]:
        return {key: value for key, path in self._paths.items() if (value := read_number(path)) is not None}


class X86ThrottleCounters(Sensor):
    """Intel/AMD thermal throttle event counters (/sys/devices/system/cpu/cpu*/thermal_throttle)."""

    name, kind = "x86-throttle", "throttle"

    def __init__(self, root: str | Path = "/"):
        super().__init__()
        self._dirs = sorted(Path(root, "sys/devices/system/cpu").glob("cpu[0-9]*/thermal_throttle"),
                            key=lambda p: _natural(p.parent))
        self._dirs = [d for d in self._dirs if read_number(d / "core_throttle_count") is not None]
        if not self._dirs:
            self._absent("no /sys/devices/system/cpu/cpu*/thermal_throttle (not x86, or a VM)")
            return
        self.available, self.detail = True, f"throttle event counters of {len(self._dirs)} CPU(s)"
        self.channels = {"x86-throttle/core_events": Channel("count", throttle="counter"),
                         "x86-throttle/package_events": Channel("count", throttle="counter")}

    def read(self) -> dict[str, float]:
        core = [read_number(d / "core_throttle_count") for d in self._dirs]
        package = [read_number(d / "package_throttle_count") for d in self._dirs]
        values = {"x86-throttle/core_events": sum(v for v in core if v is not None)}
        if any(v is not None for v in package):  # every CPU of a package repeats the package's count
            values["x86-throttle/package_events"] = max(v for v in package if v is not None)
        return values


class Rapl(Sensor):
    """CPU package (or platform, `psys`) power from Linux powercap RAPL energy counters.

    A counter gives energy since boot; power is its increase over the time between two reads,
    so the first read of a session returns nothing. The counters wrap at max_energy_range_uj.
    """

    name, kind = "rapl", "power"
    power_rank = 40  # the CPU package (psys: the platform), not the whole board

    def __init__(self, root: str | Path = "/", clock=time.monotonic):
        super().__init__()
        self._clock = clock
        self._zones: dict[str, tuple[Path, float]] = {}
        self._last: dict[str, tuple[float, float]] = {}
        zones = [z for z in Path(root, "sys/class/powercap").glob("intel-rapl:*")
                 if re.fullmatch(r"intel-rapl:\d+", z.name)]
        if not zones:
            self._absent("no /sys/class/powercap/intel-rapl:* (not x86, or the RAPL driver is not loaded)")
            return
        unreadable = []
        for zone in sorted(zones, key=_natural):
            label = read_text(zone / "name") or zone.name
            try:
                (zone / "energy_uj").read_text()
            except PermissionError:
                unreadable.append(label)
                continue
            except OSError:
                continue
            wrap = read_number(zone / "max_energy_range_uj") or 2.0 ** 32
            self._zones[f"rapl/{label}"] = (zone / "energy_uj", wrap)
        if not self._zones:
            self._absent(f"RAPL zones {unreadable} are readable by root only (Linux 5.10+); run the agent as "
                         "root or grant its user read access to /sys/class/powercap/intel-rapl:*/energy_uj"
                         if unreadable else "no readable RAPL energy counter")
            return
        self.available = True
        total = "psys" if "rapl/psys" in self._zones else "sum of packages"
        self.detail = f"energy counters {sorted(self._zones)}; total power: {total} (CPU, not the whole board)"
        self.channels = {key: Channel("W") for key in self._zones}
        self.channels["rapl/total"] = Channel("W", total_power=True)

    def read(self) -> dict[str, float]:
        now, values = self._clock(), {}
        for key, (path, wrap) in self._zones.items():
            energy = read_number(path)
            if energy is None:
                continue
            previous = self._last.get(key)
            self._last[key] = (now, energy)
            if previous is None or now <= previous[0]:
                continue
            delta = energy - previous[1]
            if delta < 0:
                delta += wrap
            values[key] = delta / 1e6 / (now - previous[0])
        if "rapl/psys" in values:
            values["rapl/total"] = values["rapl/psys"]
        elif packages := [v for k, v in values.items() if k.startswith("rapl/package")]:
            values["rapl/total"] = sum(packages)
        return values

    def start(self) -> None:
        self._last.clear()


class Ina3221(Sensor):
    """Jetson power rails from the INA3221 monitors: hwmon (JetPack 5+) or the older ina3221x iio driver."""

    name, kind = "ina3221", "power"
    power_rank = 20  # the module's input rail: everything but the carrier board

    def __init__(self, root: str | Path = "/"):
        super().__init__()
        self._rails: dict[str, tuple] = {}  # key -> ("hwmon", volt_path, curr_path) | ("iio", power_path)
        for hwmon in sorted(Path(root, "sys/class/hwmon").glob("hwmon*"), key=_natural):
            if read_text(hwmon / "name") != "ina3221":
                continue
            for label_file in sorted(hwmon.glob("in*_label"), key=_natural):
                index = label_file.name.removeprefix("in").removesuffix("_label")
                label = read_text(label_file)
                volt, curr = hwmon / f"in{index}_input", hwmon / f"curr{index}_input"
                if label and curr.exists() and read_number(volt) is not None:
                    self._rails[f"ina3221/{label}"] = ("hwmon", volt, curr)
        for device in sorted(Path(root, "sys/bus/i2c/drivers/ina3221x").glob("*/iio:device*")):
            for name_file in sorted(device.glob("rail_name_*"), key=_natural):
                index, label = name_file.name.removeprefix("rail_name_"), read_text(name_file)
                power = device / f"in_power{index}_input"
                if label and read_number(power) is not None:
                    self._rails[f"ina3221/{label}"] = ("iio", power)
        if not self._rails:
            self._absent("no INA3221 power monitor (hwmon 'ina3221' or the ina3221x driver): not a Jetson")
            return
        self.channels = {key: Channel("W") for key in self._rails}
        inputs = [f"ina3221/{rail}" for rail in _INPUT_RAILS if f"ina3221/{rail}" in self._rails]
        self._total = inputs[0] if inputs else None
        self.channels["ina3221/total"] = Channel("W", total_power=True)
        self.available = True
        self.detail = (f"rails {sorted(k.removeprefix('ina3221/') for k in self._rails)}; total: "
                       + (self._total.removeprefix("ina3221/") if self._total else "sum of rails (no input rail)"))

    def read(self) -> dict[str, float]:
        values = {}
        for key, rail in self._rails.items():
            if rail[0] == "hwmon":
                volt_mv, curr_ma = read_number(rail[1]), read_number(rail[2])
                if volt_mv is not None and curr_ma is not None:
                    values[key] = volt_mv * curr_ma / 1e6
            elif (power_mw := read_number(rail[1])) is not None:
                values[key] = power_mw / 1e3
        if self._total and self._total in values:
            values["ina3221/total"] = values[self._total]
        elif not self._total and values:
            values["ina3221/total"] = sum(values.values())
        return values
