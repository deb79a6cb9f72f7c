"""The fleet loop end to end on a small simulated fleet: real device processes, real MQTT, real images.
A good release is shadowed, then staged to 100%; a bad one is aborted on the first stage and rolled back,
with the broker killed and restarted in the middle; no telemetry record is lost."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from fleet_simulator import FleetSimulator  # noqa: E402
from rollout import policy  # noqa: E402  (benchmarks/rollout.py: the same policy, sized for the fleet)


@pytest.mark.e2e
def test_good_release_reaches_everyone_bad_release_is_aborted(tmp_path):
    rules = policy(devices=8, window_s=1.0, first=0.5)
    with FleetSimulator(tmp_path, devices=8, window_s=1.0, update_s=0.5, rate_hz=6.0, policy=rules) as fleet:
        good = fleet.roll_out("2", fleet.models["good-2"], shadow_fraction=0.5, timeout_s=120)
        assert good.outcome == "completed", good.decisions[-1]["reasons"]
        assert good.stages[0] == 0.5 and good.stages[-1] == 1.0 and all(0 < s < 1 for s in good.stages[:-1])
        assert fleet.wait_all_on("2", timeout_s=30)
        restart_marks = {d: json.loads((tmp_path / d / "telemetry" / "aggregator.json").read_text())["sequence"]
                         for d in fleet.processes}
        bad = fleet.roll_out("3", fleet.models["bad"], restart_broker_after_s=0.5, timeout_s=120)
        assert bad.outcome == "aborted", bad.decisions[-1]["reasons"] if bad.decisions else "no decision"
        assert any("latency failures" in reason for reason in bad.decisions[-1]["reasons"])
        assert fleet.wait_all_on("2", timeout_s=30)  # rolled back to the base
        assert 0 < fleet.blast_radius("3") < 1
        assert fleet.devices_without_working_model() == 0
    print("sequences before the bad release", restart_marks)
    assert fleet.final_records_lost == 0 and fleet.final_records > 8, (fleet.final_missing, fleet.collector_state)
