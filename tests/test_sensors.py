"""Sensor plug-ins on recorded outputs of the real tools (tests/fixtures/sensors: `vcgencmd`, `tegrastats`)
and on snapshots of real sysfs trees laid out under tmp_path; then an agent reading a fake sysfs tree
whose RAPL counter a test thread advances, to see power and energy per inference end to end."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from edgeship.device.cli import main as device_cli
from edgeship.device.client import local_agent
from edgeship.device.sensors import Channel, SensorSampler, discover_sensors, summarize
from edgeship.device.sensors.jetson import Tegrastats, parse_tegrastats
from edgeship.device.sensors.meter import CommandMeter, MeterSensor
from edgeship.device.sensors.raspberrypi import (RaspberryPiPmic, RaspberryPiThrottle, decode_throttled,
                                                 parse_get_throttled, parse_pmic_read_adc, pmic_power_w)
from edgeship.device.sensors.sysfs import CoolingDevices, CpuFreq, Ina3221, Rapl, ThermalZones, X86ThrottleCounters
from edgeship.records import BenchmarkRequest
from edgeship.files import write_atomic

from onnx_models import write_tiny_classifier

FIXTURES = Path(__file__).parent / "fixtures" / "sensors"


def recorded(name: str) -> str:
    return (FIXTURES / name).read_text()


def sysfs_tree(root: Path, snapshot: str | dict) -> Path:
    """Lay out a recorded sysfs snapshot ({path relative to /: content}) under `root`."""
    files = json.loads(recorded(snapshot)) if isinstance(snapshot, str) else snapshot
    for relative, content in files.items():
        if relative.startswith("_"):
            continue
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content + "\n")
    return root


def replay(*outputs: str):
    """A `run` callable that answers each call with the next recorded output (the last one repeats)."""
    queue = list(outputs)

    def run(argv):
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return run


def missing_tool(argv):
    raise FileNotFoundError(2, "No such file or directory", argv[0])


# --- Raspberry Pi ------------------------------------------------------------------------------------


def test_get_throttled_flags():
    assert parse_get_throttled(recorded("vcgencmd_get_throttled_ok.txt")) == 0
    bits = parse_get_throttled(recorded("vcgencmd_get_throttled_undervoltage.txt"))
    flags = decode_throttled(bits)
    assert bits == 0x50005
    assert flags["under_voltage"] and flags["throttled"] and not flags["freq_capped"]
    assert flags["under_voltage_occurred"] and flags["throttled_occurred"] and not flags["soft_temp_limit_occurred"]
    assert decode_throttled(parse_get_throttled(recorded("vcgencmd_get_throttled_soft_limit_occurred.txt"))) == {
        **{name: False for name in flags}, "soft_temp_limit_occurred": True}
    with pytest.raises(ValueError, match="not `vcgencmd get_throttled` output"):
        parse_get_throttled("VCHI initialization failed")


def test_throttling_seen_now_or_latched_between_samples():
    ok, under = recorded("vcgencmd_get_throttled_ok.txt"), recorded("vcgencmd_get_throttled_undervoltage.txt")
    sensor = RaspberryPiThrottle(replay(ok, ok, under))  # the probe, then two samples
    assert sensor.available and "0x0 at start" in sensor.detail
    samples = [(0.0, sensor.read()), (1.0, sensor.read())]
    report = summarize(samples, sensor.channels, 0.0, 1.0, inferences=10, interval_s=1.0)
    assert report.throttled is True
    assert "rpi-throttle/under_voltage" in report.throttle_detail and "rpi-throttle/throttled" in report.throttle_detail

    latched = recorded("vcgencmd_get_throttled_soft_limit_occurred.txt")  # nothing now, but it happened
    sensor = RaspberryPiThrottle(replay(ok, ok, latched))
    report = summarize([(0.0, sensor.read()), (1.0, sensor.read())], sensor.channels, 0.0, 1.0, 10, 1.0)
    assert report.throttled is True and "rpi-throttle/occurred +8" in report.throttle_detail

    quiet = RaspberryPiThrottle(replay(ok))
    report = summarize([(0.0, quiet.read()), (1.0, quiet.read())], quiet.channels, 0.0, 1.0, 10, 1.0)
    assert report.throttled is False and report.throttle_detail == ""

    absent = RaspberryPiThrottle(missing_tool)
    assert not absent.available and "not a Raspberry Pi" in absent.detail and not absent.channels


def test_pi5_pmic_power():
    rails = parse_pmic_read_adc(recorded("vcgencmd_pmic_read_adc_pi5.txt"))
    assert rails["VDD_CORE"] == {"A": 1.9125, "V": 0.8804856}
    assert rails["EXT5V"] == {"V": 5.135211} and "BATT" in rails
    expected = sum(r["A"] * r["V"] for r in rails.values() if len(r) == 2)
    assert pmic_power_w(rails) == pytest.approx(expected) and 2.5 < expected < 3.5
    sensor = RaspberryPiPmic(replay(recorded("vcgencmd_pmic_read_adc_pi5.txt")))
    assert sensor.available and sensor.channels["rpi-pmic/total"].total_power
    assert sensor.read() == {"rpi-pmic/total": pytest.approx(expected),
                             "rpi-pmic/VDD_CORE": pytest.approx(1.9125 * 0.8804856)}
    pi4 = RaspberryPiPmic(replay(recorded("vcgencmd_pmic_read_adc_pi4.txt")))
    assert not pi4.available and "only a Raspberry Pi 5" in pi4.detail
    assert "not a Raspberry Pi 5" in RaspberryPiPmic(missing_tool).detail


# --- Jetson ------------------------------------------------------------------------------------------


def test_tegrastats_lines_from_three_jetson_generations():
    orin = parse_tegrastats(recorded("tegrastats_orin_nano_jp6.txt").splitlines()[1])
    assert orin["ram_used_mb"] == 2190 and orin["cpu_load"] == pytest.approx(106 / 6)
    assert orin["cpu_mhz"] == 1510 and orin["gpu_load"] == 0
    assert orin["temps"] == {"cpu": 48.562, "soc2": 46.531, "soc0": 47.125, "gpu": 46.781, "tj": 48.562,
                             "soc1": 46.187}
    assert orin["rails_w"] == {"VDD_IN": 6.142, "VDD_CPU_GPU_CV": 1.772, "VDD_SOC": 1.571}

    agx = parse_tegrastats(recorded("tegrastats_orin_agx_jp5.txt"))
    assert agx["cpu_cores_online"] == 8 and "CV0" not in agx["temps"] and agx["temps"]["Tdiode"] == 36.75
    assert agx["rails_w"]["VIN_SYS_5V0"] == 3.839 and "RAM" not in agx["rails_w"]

    nano = parse_tegrastats(recorded("tegrastats_nano_jp4.txt"))
    assert nano["rails_w"] == {"POM_5V_IN": 1.119, "POM_5V_GPU": 0.0, "POM_5V_CPU": 0.124}
    assert nano["cpu_mhz"] == 102 and nano["temps"]["thermal"] == 32.75 and "IRAM" not in nano["rails_w"]

    xavier = parse_tegrastats(recorded("tegrastats_xavier_nx_jp4.txt"))
    assert xavier["rails_w"]["VDD_IN"] == 3.741 and xavier["cpu_cores_online"] == 4 and "gpu_load" in xavier


class _FakeTegrastats:
    """Stands in for the `tegrastats` process: prints recorded lines, one every few milliseconds."""

    def __init__(self, lines: list[str]):
        self._lines, self._stopped = lines, threading.Event()
        self.stdout = self._follow()

    def _follow(self):
        for line in self._lines:
            if self._stopped.wait(0.02):
                return
            yield line + "\n"
        self._stopped.wait()

    def poll(self):
        return 0 if self._stopped.is_set() else None

    def terminate(self):
        self._stopped.set()

    def wait(self, timeout=None):
        return 0


def test_tegrastats_streams_power_into_a_report():
    lines = recorded("tegrastats_orin_nano_jp6.txt").splitlines()
    sensor = Tegrastats(spawn=lambda interval_ms: _FakeTegrastats(lines))
    assert sensor.available and sensor.channels["tegrastats/total"].total_power
    assert sensor.channels["tegrastats/temp_tj"].unit == "C" and sensor.channels["tegrastats/cpu_mhz"].unit == "MHz"
    with SensorSampler([sensor], interval_s=0.05) as sampler:
        time.sleep(0.3)
    assert sampler.samples[-1][1]["tegrastats/total"] == 6.218  # the last recorded line
    started, ended = sampler.samples[0][0], sampler.samples[-1][0]
    report = sampler.report(started, ended, inferences=100)
    assert report.power_source == "tegrastats/total" and 4.6 <= report.power_w <= 6.3
    assert report.energy_per_inference_mj == pytest.approx(report.power_w * (ended - started) / 100 * 1e3)
    assert report.channels["tegrastats/temp_tj"].max == 49.406

    gone = Tegrastats(spawn=lambda interval_ms: (_ for _ in ()).throw(FileNotFoundError("tegrastats")))
    assert not gone.available and "would not start" in gone.detail


# --- sysfs trees -------------------------------------------------------------------------------------


def test_pi5_sysfs_temperature_clock_and_fan(tmp_path):
    root = sysfs_tree(tmp_path, "sysfs_raspberrypi5.json")
    assert ThermalZones(root).read() == {"thermal/cpu-thermal": 51.35}
    clock = CpuFreq(root)
    assert clock.read() == {"cpufreq/policy0": 2400.0} and "policy0 1500-2400 MHz (ondemand)" in clock.detail
    cooling = CoolingDevices(root)
    assert cooling.read() == {"cooling/pwm-fan": 1.0}
    assert cooling.channels["cooling/pwm-fan"].throttle is None, "a spinning fan is not throttling"
    assert not X86ThrottleCounters(root).available and not Rapl(root).available and not Ina3221(root).available


def test_x86_sysfs_rapl_power_and_throttle_counters(tmp_path):
    root = sysfs_tree(tmp_path, "sysfs_x86_laptop.json")
    assert ThermalZones(root).read() == {"thermal/acpitz": 27.8, "thermal/x86_pkg_temp": 58.0}
    assert CpuFreq(root).read() == {"cpufreq/policy0": 2893.432, "cpufreq/policy1": 1211.203}
    cooling = CoolingDevices(root)
    assert set(cooling.read()) == {"cooling/Processor", "cooling/Processor-1", "cooling/intel_powerclamp",
                                   "cooling/TCC Offset"}
    assert cooling.channels["cooling/Processor"].throttle == "flag"

    counters = X86ThrottleCounters(root)
    assert counters.read() == {"x86-throttle/core_events": 2, "x86-throttle/package_events": 12}

    now = [100.0]
    rapl = Rapl(root, clock=lambda: now[0])
    assert rapl.available and "psys" in rapl.detail and set(rapl.channels) == {"rapl/package-0", "rapl/psys",
                                                                                 "rapl/total"}
    assert rapl.read() == {}  # a counter needs two reads
    zone, psys = root / "sys/class/powercap/intel-rapl:0/energy_uj", root / "sys/class/powercap/intel-rapl:1/energy_uj"
    zone.write_text(str(43219812345 + 7_500_000))  # 7.5 J in 0.5 s
    psys.write_text(str(98112030411 + 11_000_000))
    now[0] = 100.5
    assert rapl.read() == {"rapl/package-0": pytest.approx(15.0), "rapl/psys": pytest.approx(22.0),
                           "rapl/total": pytest.approx(22.0)}
    zone.write_text("1000000")  # the counter wrapped at max_energy_range_uj
    now[0] = 101.5
    wrapped = 262143328850 - (43219812345 + 7_500_000) + 1_000_000
    assert rapl.read()["rapl/package-0"] == pytest.approx(wrapped / 1e6)


def test_x86_throttle_counter_increase_is_throttling(tmp_path):
    root = sysfs_tree(tmp_path, "sysfs_x86_laptop.json")
    counters = X86ThrottleCounters(root)
    before = (0.0, counters.read())
    (root / "sys/devices/system/cpu/cpu1/thermal_throttle/core_throttle_count").write_text("5")
    report = summarize([before, (1.0, counters.read()), (2.0, counters.read())], counters.channels, 0.5, 2.0,
                       inferences=1, interval_s=1.0)
    assert report.throttled and "x86-throttle/core_events +3" in report.throttle_detail


def test_jetson_sysfs_ina3221_rails(tmp_path):
    root = sysfs_tree(tmp_path, "sysfs_jetson_orin_nano.json")
    zones = ThermalZones(root).read()
    assert "thermal/cv0-thermal" not in zones and zones["thermal/tj-thermal"] == 47.281
    assert CpuFreq(root).read() == {"cpufreq/policy0": 1510.4, "cpufreq/policy4": 729.6}
    rails = Ina3221(root)
    assert rails.available and "total: VDD_IN" in rails.detail
    assert rails.read() == {"ina3221/VDD_IN": pytest.approx(5.064 * 0.912),
                            "ina3221/VDD_CPU_GPU_CV": pytest.approx(5.056 * 0.096),
                            "ina3221/VDD_SOC": pytest.approx(5.064 * 0.280),
                            "ina3221/total": pytest.approx(5.064 * 0.912)}

    legacy = sysfs_tree(tmp_path / "jp4", {  # JetPack 4's ina3221x driver: milliwatts per rail
        "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/rail_name_0": "POM_5V_IN",
        "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/in_power0_input": "2131",
        "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/rail_name_1": "POM_5V_GPU",
        "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/in_power1_input": "0"})
    assert Ina3221(legacy).read() == {"ina3221/POM_5V_IN": 2.131, "ina3221/POM_5V_GPU": 0.0,
                                      "ina3221/total": 2.131}


def test_discovery_reports_every_plugin_and_absent_ones_say_why(tmp_path):
    found = {s.name: s for s in discover_sensors(sysfs_tree(tmp_path, "sysfs_jetson_orin_nano.json"),
                                                 run=missing_tool)}
    assert {n for n, s in found.items() if s.available} == {"thermal", "cpufreq", "cooling", "ina3221"}
    for name in ("x86-throttle", "rpi-throttle", "rapl", "rpi-pmic", "meter"):
        assert not found[name].available and found[name].detail, name
    assert found["meter"].info().detail.startswith("no external power meter configured")

    empty = discover_sensors(tmp_path / "nothing", run=missing_tool)
    assert not any(s.available for s in empty)


def test_an_external_meter_wins_over_on_board_power(tmp_path):
    meter = CommandMeter("um34c --watts", run=replay("Power: 7.25 W\n"))
    assert meter.argv == ["um34c", "--watts"] and meter.read_power_w() == 7.25
    board = Ina3221(sysfs_tree(tmp_path, "sysfs_jetson_orin_nano.json"))
    plug = MeterSensor(meter)
    with SensorSampler([board, plug], interval_s=0.05) as sampler:
        time.sleep(0.12)
    report = sampler.report(sampler.samples[0][0], sampler.samples[-1][0], inferences=1)
    assert report.power_source == "meter/power" and report.power_w == 7.25
    silent = MeterSensor(CommandMeter("meter", run=replay("no reading")))
    assert not silent.available and "did not answer" in silent.detail


def test_a_sensor_failing_mid_run_is_dropped_and_reported(tmp_path):
    class Flaky(ThermalZones):
        reads = 0

        def read(self):
            self.reads += 1
            if self.reads > 1:
                raise OSError(5, "Input/output error")  # an I2C sensor that stopped answering
            return super().read()

    flaky, steady = Flaky(sysfs_tree(tmp_path, "sysfs_raspberrypi5.json")), CpuFreq(tmp_path)
    with SensorSampler([flaky, steady], interval_s=0.02) as sampler:
        time.sleep(0.1)
    report = sampler.report(sampler.samples[0][0], sampler.samples[-1][0], inferences=1)
    assert flaky.reads == 2 and report.problems == ["sensor thermal stopped: OSError: [Errno 5] Input/output error"]
    assert report.channels["cpufreq/policy0"].mean == 2400.0 and len(sampler.samples) >= 4


def test_summary_covers_the_timed_run_only():
    channels = {"rapl/total": Channel("W", total_power=True), "thermal/cpu": Channel("C")}
    samples = [(0.0, {"thermal/cpu": 40.0}), (1.0, {"rapl/total": 99.0, "thermal/cpu": 50.0}),
               (2.0, {"rapl/total": 4.0, "thermal/cpu": 60.0}), (3.0, {"rapl/total": 6.0, "thermal/cpu": 70.0}),
               (4.0, {"rapl/total": 50.0, "thermal/cpu": 80.0})]
    report = summarize(samples, channels, start=1.5, end=3.5, inferences=1000, interval_s=1.0)
    assert report.power_w == 5.0 and report.energy_j == pytest.approx(10.0)
    assert report.energy_per_inference_mj == pytest.approx(10.0)
    assert report.channels["thermal/cpu"].model_dump() == {"unit": "C", "min": 60.0, "mean": 65.0, "max": 70.0,
                                                          "first": 60.0, "last": 70.0}
    assert report.timeline_s == [-1.5, -0.5, 0.5, 1.5, 2.5] and report.timeline["rapl/total"][0] is None
    assert report.throttled is None  # no throttle sensor here: unknown, not "no"

    short = summarize(samples, channels, start=1.2, end=1.4, inferences=10, interval_s=1.0)
    assert short.power_w == 4.0, "a run shorter than the interval takes the first sample after it"
    many = summarize([(i * 0.01, {"thermal/cpu": float(i)}) for i in range(5000)], channels, 0, 50, 1, 0.01)
    assert len(many.timeline_s) <= 601 and many.timeline_s[-1] == pytest.approx(49.99)


def test_cli_lists_sensors(tmp_path, capsys):
    root = sysfs_tree(tmp_path, "sysfs_raspberrypi5.json")
    assert device_cli(["sensors", "--sysfs-root", str(root)]) == 0
    listed = {s["name"]: s for s in json.loads(capsys.readouterr().out)}
    assert listed["thermal"]["available"] and listed["thermal"]["channels"] == ["thermal/cpu-thermal"]
    assert not listed["rapl"]["available"]


# --- end to end: an agent on a fake sysfs tree -------------------------------------------------------


def test_agent_samples_sensors_and_reports_energy_per_inference(tmp_path):
    """A 5 W RAPL counter (advanced by a test thread) and a warming CPU zone, read by a real agent's job."""
    root = sysfs_tree(tmp_path / "sys-root", "sysfs_x86_laptop.json")
    model = write_tiny_classifier(tmp_path / "tiny.onnx")
    energy = root / "sys/class/powercap/intel-rapl:1/energy_uj"
    temperature = root / "sys/class/thermal/thermal_zone1/temp"
    stop = threading.Event()

    def five_watts() -> None:
        started, base = time.monotonic(), 98112030411
        while not stop.wait(0.005):
            elapsed = time.monotonic() - started
            # Replace, don't rewrite in place: a reader must never see the empty file a truncating write leaves.
            write_atomic(energy, str(base + int(5e6 * elapsed)).encode())
            write_atomic(temperature, str(58000 + int(2000 * elapsed)).encode())

    writer = threading.Thread(target=five_watts)
    writer.start()
    try:
        with local_agent(name="sensed", sysfs_root=root) as agent, agent.client(timeout_s=60) as client:
            info = client.info()
            available = {s.name for s in info.sensors if s.available}
            assert available == {"thermal", "cpufreq", "cooling", "x86-throttle", "rapl"}
            request = BenchmarkRequest(warmup=5, duration_s=1.5, sensor_interval_s=0.1)
            result = client.benchmark(model, "onnx-fp32", request)
            assert httpx.get(f"{agent.url}/health").json()["jobs_failed"] == 0
    finally:
        stop.set()
        writer.join()

    report = result.sensors
    assert report.power_source == "rapl/total" and 3.5 < report.power_w < 6.5
    assert report.energy_j == pytest.approx(report.power_w * result.duration_s, rel=0.05)
    assert report.energy_per_inference_mj == pytest.approx(report.energy_j / result.iterations * 1e3)
    assert report.throttled is False and report.samples >= 10
    cpu = report.channels["thermal/x86_pkg_temp"]
    assert cpu.unit == "C" and cpu.last > cpu.first >= 58.0
    assert len(report.timeline_s) == len(report.timeline["rapl/total"]) and report.timeline_s[0] < 0
    assert {s.name for s in report.sensors} >= {"rpi-throttle", "tegrastats", "meter"}  # absent, listed
