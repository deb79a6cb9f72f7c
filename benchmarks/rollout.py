"""The fleet loop end to end: a good release advances to 100%, a bad one is aborted and rolled back.

A FleetSimulator (tests/fleet_simulator.py) runs `--devices` real `edgeship-device serve` processes (each
its own updater, runtime, shadow and telemetry over real MQTT to a Mosquitto of its own), fed with real
digits test images, half of them in an emulated device class `small` with a tight p99 budget. Three
scenarios in one run:
  (a) good: v2 (another logistic regression, ~96% agreement with v1) is shadowed on half the fleet,
      then rolled out stage by stage to 100% by the controller;
  (b) bad: v3 (v2's answers in a model ~2000x slower: ~20 ms an answer) starts at the first
      stage, misses the `small` class's p99 budget (10 ms), and is aborted; devices go back to v2. The
      broker is killed and restarted (SIGKILL, 2 s down) in the middle.
  (c) silent failure: v4 (v2 with its classes rotated: as fast, the same class mix and confidences, installs
      and passes probation, gives another answer on nearly every input) is published straight to the first
      stage, no shadow; the devices serving it compare it with v2 (the model it replaced) in their idle time,
      and the controller aborts it on disagreement; devices go back to v2.
Then, with the applications and devices stopped (the host quiet again), the shadow's overhead on the primary's
answer path is measured in-process (p50 with the shadow sampling on vs off, alternating blocks, same
device state).

Sized for 2 shared cores (measured at 4 Hz and an update check every second): a device process costs
~26 ms CPU/s (~3 ms a request, ~10 ms/s the update checks, ~6 ms/s telemetry and idle threads) and
~116 MB; the simulator's applications, repository and collector ~17 ms/s per device: 1.7 cores for 40,
and the bad model's answers (then ~38 ms each) asked 2.4 more, so the collector fell 80 s behind and
the abort waited for it. Defaults now: updates every 2 s, 3 Hz, a ~20 ms bad model; about 2 minutes.

    .venv/bin/python benchmarks/rollout.py                 # 40 devices
    .venv/bin/python benchmarks/rollout.py --devices 12 --window-s 1

Prints a table and writes benchmarks/results/rollout.json (with a `targets` section); exits 1 when a
target is missed.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fleet_simulator import FleetSimulator  # noqa: E402


def policy(devices: int, window_s: float, first: float = 0.25) -> dict:
    """Stages first -> 0.5 -> 1.0. The `small` class's p99 budget (10 ms) is what the bad release (~20 ms) misses;
    the good releases answer in well under 1 ms, but a loaded 2-core host preempts a few answers of every
    release for many ms: the controller's latency analysis (edgeship.fleet.latency) judges the candidate
    against the base on the same class, so that tail fails no device and holds no stage."""
    return {"stages": sorted({first, 0.5, 1.0}), "min_reporting_devices": max(2, math.floor(devices * first * 0.5)),
            "min_samples_per_device": 40, "soak_s": 2 * window_s,
            "latency": {"significance": 0.01, "max_ratio_to_base": 2.0},
            "success": {"min_shadow_agreement": 0.9, "p99_budget_ms": {"small": 10.0, "fast": 2000.0}},
            "agreement": {"min_compared": 100},   # candidate vs the model it replaced, before a stage advances
            # Half the (stratified) first stage is the `small` class: a failure share of 40% over at least a
            # third of the first stage's devices (3 of 10 at 40 devices) is the bad release, not one device.
            "abort_criteria": [{"failure_type": t, "min_executed_devices": max(2, math.floor(devices * first / 3)),
                                "threshold_percentage": 40}
                               for t in ("install", "probation", "latency", "disagreement")]}


def timeline(scenario) -> list[dict]:
    """The controller's decisions on a release: seconds since its start, action, the first reasons."""
    return [{"t_s": round((d["at"] - scenario.started_at).total_seconds(), 2), "action": d["action"],
             "reasons": d["reasons"][:3]} for d in scenario.decisions]


def minimum_met_at(decisions: list[dict], minimum: int):
    """When the controller first had the latency abort criterion's minimum of executed devices."""
    for d in decisions:
        if ((d["evidence"].get("abort_criteria") or {}).get("latency") or {}).get("executed", 0) >= minimum:
            return d["at"]
    return None


def _alternating_p50(field, images, blocks: int, per_block: int, gap_s: float, rate: float) -> dict:
    """p50 of the primary's answer path (wall clock around FieldRuntime.predict), shadow sampling on in half the
    blocks, in off-on-on-off order (short blocks in that order cancel the host's drift, linear or not, better
    than long ones); `gap_s` paces requests as an application would."""
    timings = np.zeros((blocks, per_block))
    compared, skipped = field.shadow.compared, field.shadow.skipped
    on_blocks = np.array([block % 4 in (1, 2) for block in range(blocks)])
    for block in range(blocks):
        field.shadow.sample_rate = rate if on_blocks[block] else 0.0
        for i in range(per_block):
            idle_until = time.perf_counter() + gap_s
            while time.perf_counter() < idle_until:  # idle, but on the CPU: a sleep's wake-up varies more than
                time.sleep(0)                        # the effect measured; sleep(0) lets the shadow thread run
            start = time.perf_counter()
            field.predict(images[(block * per_block + i) % len(images)][None])
            timings[block, i] = (time.perf_counter() - start) * 1000

    def ratio(blocks_on: np.ndarray, blocks_off: np.ndarray) -> float:
        return float(np.median(timings[blocks_on]) / np.median(timings[blocks_off]) - 1.0)

    on_index, off_index = np.flatnonzero(on_blocks), np.flatnonzero(~on_blocks)
    rng = np.random.default_rng(0)  # the spread: blocks resampled (a bootstrap), 90% of the ratios inside
    spread = [ratio(rng.choice(on_index, len(on_index)), rng.choice(off_index, len(off_index))) for _ in range(200)]
    return {"p50_ms_shadow_on": float(np.median(timings[on_index])),
            "p50_ms_shadow_off": float(np.median(timings[off_index])), "ratio": ratio(on_index, off_index),
            "ratio_90pct": [float(np.percentile(spread, 5)), float(np.percentile(spread, 95))],
            "gap_ms": gap_s * 1000, "shadow_runs": field.shadow.compared - compared,
            "shadow_skipped": field.shadow.skipped - skipped}


def shadow_overhead(fleet: FleetSimulator, blocks: int = 192, per_block: int = 50, rate: float = 0.1) -> dict:
    """The shadow's cost on the primary's p50, on a device state with v1 active and a v2 shadow.

    `paced` (the target): requests 1 ms apart, a busy application; the shadow runs in the gaps. 9600 answers:
    repeated runs on a quiet host agree within about 2%. `back_to_back` (detail): no gap at all, where the
    shadow yields and skips its samples rather than slow the answers."""
    from edgeship.device.serve import FieldRuntime
    from edgeship.device.state import provision
    from edgeship.device.updater import DeviceUpdater, UpdaterConfig
    from edgeship.ota.publish import publish_shadow

    from ota_world import MODEL, TARGET, make_artifact

    world = fleet.world
    artifact = make_artifact(fleet.tmp_path / "overhead", "shadow-1", content=fleet.models["good-1"])
    publish_shadow(world.repository, MODEL, "4", artifact, shadow_fraction=1.0, sample_rate=rate)
    state_dir = fleet.tmp_path / "overhead-probe"
    provision(state_dir, "overhead-probe", "stable", TARGET, world.url, world.root)
    DeviceUpdater(UpdaterConfig(repository_url=world.url, trusted_root=world.root, state_dir=state_dir,
                                target=TARGET, self_check=False)).update()
    field = FieldRuntime(state_dir, telemetry=None, shadow_sample_rate=rate)
    assert field.health()["versions"]["shadow"] == "4", field.health()
    try:
        for i in range(400):  # warm up both models (and confirm the active one's probation)
            field.predict(fleet.images[i % len(fleet.images)][None])
        paced = _alternating_p50(field, fleet.images, blocks, per_block, gap_s=0.001, rate=rate)
        back_to_back = _alternating_p50(field, fleet.images, blocks // 4, per_block, gap_s=0.0, rate=rate)
    finally:
        field.close()
    return {**paced, "sample_rate": rate, "back_to_back": back_to_back}


def _compared_line(compared: dict | None) -> str:
    if not compared or not compared.get("samples"):
        return "-"
    return (f"agreement {compared['agreement']:.3f} over {compared['samples']} answers on {compared['devices']} "
            f"devices")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=40)
    parser.add_argument("--window-s", type=float, default=2.0, help="telemetry window")
    parser.add_argument("--update-s", type=float, default=2.0, help="device update check interval")
    parser.add_argument("--rate-hz", type=float, default=3.0, help="requests per second per device")
    parser.add_argument("--first-stage", type=float, default=0.25, help="the first stage's fraction")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/rollout.json")
    args = parser.parse_args(argv)
    # A SIGTERM (a timeout) leaves through the simulator's exit, which stops every device process and the broker.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(3)))

    rules = policy(args.devices, args.window_s, args.first_stage)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgeship-rollout-") as tmp:
        fleet = FleetSimulator(Path(tmp), devices=args.devices, window_s=args.window_s, update_s=args.update_s,
                               rate_hz=args.rate_hz, policy=rules)
        with fleet:
            good = fleet.roll_out("2", fleet.models["good-2"], shadow_fraction=0.5)
            on_good = fleet.wait_all_on("2", timeout_s=30 + 2 * args.update_s) if good.outcome == "completed" else False
            bad = fleet.roll_out("3", fleet.models["bad"], restart_broker_after_s=0.5)
            rolled_back = fleet.wait_all_on("2", timeout_s=30 + 2 * args.update_s)
            silent = fleet.roll_out("4", fleet.models["silent"])
            silent_rolled_back = fleet.wait_all_on("2", timeout_s=30 + 2 * args.update_s)
            silent_blast = fleet.blast_radius("4")
            silent_first = fleet.nth_first_answer("4", 1)
            fleet.stop_feeding()
            blast = fleet.blast_radius("3")
            without_model = fleet.devices_without_working_model()
            answers = sum(log.answers for log in fleet.logs.values())
            # end to end, devices to decision: from the moment as many devices as the abort criterion needs
            # answered with v3 (telemetry window, broker restart, collector and controller all included)
            evidence_at = fleet.nth_first_answer("3", rules["abort_criteria"][2]["min_executed_devices"])
            fleet.stop_devices()  # the overhead is the runtime's, not 40 other processes' noise
            overhead = shadow_overhead(fleet)
        lost, records, unsent = fleet.final_records_lost, fleet.final_records, fleet.final_unsent
    elapsed = time.monotonic() - started

    first = rules["stages"][0]
    slack = 3 * math.sqrt(first * (1 - first) / args.devices)  # binomial: 3 standard deviations
    met_at = minimum_met_at(bad.decisions, rules["abort_criteria"][2]["min_executed_devices"])
    abort_after_s = bad.duration_s
    abort_after_minimum_s = (bad.ended_at - met_at).total_seconds() if bad.ended_at and met_at else None
    abort_after_answers_s = (bad.ended_at - evidence_at).total_seconds() if bad.ended_at and evidence_at else None
    result = {
        "devices": args.devices, "window_s": args.window_s, "first_stage_fraction": first,
        "good": {"outcome": good.outcome, "stages": good.stages, "duration_s": good.duration_s,
                 "every_device_on_it": on_good, "last_reasons": good.decisions[-1]["reasons"] if good.decisions else []},
        "bad": {"outcome": bad.outcome, "stages": bad.stages, "abort_reasons": bad.decisions[-1]["reasons"]
                if bad.decisions else [], "every_device_back_on_base": rolled_back, "timeline": timeline(bad)},
        "silent": {"outcome": silent.outcome, "stages": silent.stages, "blast_radius": silent_blast,
                   "abort_reasons": silent.decisions[-1]["reasons"] if silent.decisions else [],
                   "compared": (silent.decisions[-1]["evidence"].get("compared") if silent.decisions else None),
                   "every_device_back_on_base": silent_rolled_back, "abort_after_s": silent.duration_s,
                   "abort_after_first_answer_s": (silent.ended_at - silent_first).total_seconds()
                   if silent.ended_at and silent_first else None, "timeline": timeline(silent)},
        "good_compared": good.decisions[-1]["evidence"].get("compared") if good.decisions else None,
        "blast_radius": blast, "devices_without_working_model": without_model, "telemetry_records_lost": lost,
        "telemetry_records": records, "telemetry_records_unsent_at_exit": unsent, "answers": answers, "abort_after_s": abort_after_s,
        "abort_after_minimum_met_s": abort_after_minimum_s, "abort_after_devices_answered_s": abort_after_answers_s,
        "shadow_overhead": overhead["ratio"],
        "shadow_overhead_detail": overhead, "wall_s": elapsed,
        "targets": {
            "good_release_completes": {"limit": "completed", "measured": good.outcome, "met": good.outcome == "completed"},
            "bad_release_aborted": {"limit": "aborted", "measured": bad.outcome, "met": bad.outcome == "aborted"},
            "blast_radius": {"limit": round(first + slack, 4), "measured": blast, "met": blast <= first + slack},
            "devices_without_working_model": {"limit": 0, "measured": without_model, "met": without_model == 0},
            "silent_failure_aborted": {"limit": "aborted", "measured": silent.outcome,
                                       "met": silent.outcome == "aborted"},
            "silent_failure_blast_radius": {"limit": round(first + slack, 4), "measured": silent_blast,
                                            "met": silent_blast <= first + slack},
            "telemetry_records_lost": {"limit": 0, "measured": lost, "met": lost == 0},
            "abort_within_two_windows_of_minimum": {"limit": 2 * args.window_s, "measured": abort_after_minimum_s,
                                                    "met": abort_after_minimum_s is not None
                                                    and abort_after_minimum_s <= 2 * args.window_s},
            "shadow_overhead": {"limit": 0.05, "measured": overhead["ratio"], "met": overhead["ratio"] < 0.05},
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    rows = [("devices", args.devices), ("good release", f"{good.outcome}, stages {good.stages}"),
            ("bad release", f"{bad.outcome}, stages {bad.stages}"), ("first stage fraction", first),
            ("blast radius", f"{blast:.3f}"),
            ("silent failure (no shadow)", f"{silent.outcome}, stages {silent.stages}, blast radius "
                                           f"{silent_blast:.3f} (limit {first + slack:.3f})"),
            ("silent failure: compared with v2", _compared_line(result["silent"]["compared"])),
            ("good release: compared with v1", _compared_line(result["good_compared"])),
            ("silent failure: start -> abort", f"{silent.duration_s:.1f} s" if silent.duration_s else "-"),
            ("devices without a working model", without_model),
            ("telemetry records lost / stored", f"{lost} / {records} ({unsent} still spooled at exit)"),
            ("bad release: start -> abort", f"{abort_after_s:.1f} s" if abort_after_s else "-"),
            ("abort after first-stage minimum met", f"{abort_after_minimum_s:.1f} s" if abort_after_minimum_s is not None else "-"),
            ("abort after that many devices answered", f"{abort_after_answers_s:.1f} s (windows, broker restart, "
                                                       "collector, controller)" if abort_after_answers_s is not None
                                                       else "-"),
            ("shadow overhead on primary p50", f"{overhead['ratio'] * 100:+.1f}% ({overhead['p50_ms_shadow_off']:.4f} -> "
                                               f"{overhead['p50_ms_shadow_on']:.4f} ms; 90% of resamples "
                                               f"{overhead['ratio_90pct'][0] * 100:+.1f}..{overhead['ratio_90pct'][1] * 100:+.1f}%; "
                                               f"{overhead['shadow_runs']} shadow runs, requests 1 ms apart)")]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("targets: " + ", ".join(f"{k} {'met' if v['met'] else 'MISSED'}" for k, v in result["targets"].items()))
    print(f"wrote {args.out} ({elapsed:.0f} s)")
    return 0 if all(t["met"] for t in result["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
