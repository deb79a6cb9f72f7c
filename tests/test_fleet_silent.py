"""Every rollout compares answers, shadowed or not: on a small simulated fleet (real device processes, real MQTT,
the controller), a good release (~96% agreement with the base) published straight to a first stage advances to
100%, and a silent failure (as fast as the base, installs, passes probation, its classes rotated) is aborted on
disagreement within the first stage and rolled back."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from fleet_simulator import FleetSimulator  # noqa: E402
from rollout import policy  # noqa: E402  (benchmarks/rollout.py: the same policy, sized for the fleet)


@pytest.mark.e2e
def test_a_silent_failure_is_aborted_and_a_good_release_is_not(tmp_path):
    devices, first = 10, 0.45        # 3 of the 10 serve v2 at the first stage, 4 serve v3 (the cohort hash's draw)
    rules = policy(devices=devices, window_s=1.0, first=first)
    with FleetSimulator(tmp_path, devices=devices, window_s=1.0, update_s=0.5, rate_hz=6.0, policy=rules,
                        stratify_for="2") as fleet:
        good = fleet.roll_out("2", fleet.models["good-2"], timeout_s=150)     # no shadow stage
        assert good.outcome == "completed", good.decisions[-1]["reasons"]
        assert good.decisions[0]["fraction_before"] == first and good.stages == [0.5, 1.0]   # published at 0.45
        assert not any(d["action"] == "abort" for d in good.decisions)
        compared = good.decisions[-1]["evidence"]["compared"]
        assert compared["with"] == "1" and compared["samples"] >= 100 and 0.9 <= compared["agreement"] <= 0.99
        assert fleet.wait_all_on("2", timeout_s=30)

        silent = fleet.roll_out("3", fleet.models["silent"], timeout_s=120)  # no shadow stage either
        reasons = silent.decisions[-1]["reasons"] if silent.decisions else ["no decision"]
        assert silent.outcome == "aborted" and silent.stages == [], reasons                 # never past 0.45
        assert silent.decisions[-1]["fraction_before"] == first
        assert any(reason.startswith("abort: disagreement failures") for reason in reasons), reasons
        evidence = silent.decisions[-1]["evidence"]
        assert evidence["compared"]["with"] == "2" and evidence["compared"]["agreement"] < 0.1
        assert evidence["candidate"]["installed"] > 0 and evidence["candidate"]["rolled_back"] == 0
        assert fleet.wait_all_on("2", timeout_s=30)                           # rolled back to the base
        slack = 3 * math.sqrt(first * (1 - first) / devices)
        assert 0 < fleet.blast_radius("3") <= first + slack
        assert fleet.devices_without_working_model() == 0
