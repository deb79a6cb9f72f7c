"""`edgeship fleet` as an operator types it, on a real signed repository, fleet store and MLflow registry:
`rollout --dry-run` says what the controller would do and changes nothing, `pause|resume|abort` steer one
target's rollout by hand, `status` stays readable in an 80-column terminal, and the ephemeral Prefect server
the CLI starts sends no usage telemetry unless asked for."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from typer.testing import CliRunner

from edgeship.cli import app
from edgeship.fleet.report import STATUS_COLUMNS
from edgeship.fleet.store import FleetStore
from edgeship.ota.rollout import read_channel

from fleet_records import record
from ota_world import TARGET, OtaWorld

from test_rollout_flow import POLICY

OTHER = "tflite-int8"   # published once, never rolled out: a target without a candidate


@pytest.fixture
def world(tmp_path):
    """v1 on every device of two targets; v2 of onnx-int8 rolling out to 5%; devices reporting both."""
    world = OtaWorld(tmp_path)
    world.write_params(rollout=POLICY)
    world.publish("1", targets=(TARGET, OTHER))
    world.publish("2", rollout_fraction=0.05)
    store = FleetStore(f"sqlite:///{tmp_path}/fleet.db")
    at = datetime.now(timezone.utc) + timedelta(hours=1)   # after the rollout's first pass, however slow the machine
    store.add_batch([record(f"{version}-{device_class}-{i}", version, at=at, device_class=device_class,
                            events=[("installed", version, None), ("confirmed", version, None)],
                            compared=("1", 98, 100) if version == "2" else None)
                     for version, devices in (("1", 4), ("2", 3)) for device_class in ("pi4", "orin-nano")
                     for i in range(devices)])
    store.close()
    yield world
    world.close()


def entry(world):
    world.repository.refresh()
    return read_channel(world.repository, "stable").targets[TARGET]


def fleet(world, *args: str, columns: int = 80):
    """`edgeship fleet ...` in this process (no Prefect involved), in an 80-column terminal."""
    return CliRunner().invoke(app, ["fleet", *args, "-C", str(world.tmp_path)], env={"COLUMNS": str(columns)})


def test_rollout_dry_run_says_what_it_would_do_and_changes_nothing(world, prefect_api):
    """In this process, on the session's Prefect API (the ship-it test in test_release_e2e.py runs the same command
    as a newcomer types it, with the ephemeral server it starts and its output kept off the terminal)."""
    done = fleet(world, "rollout", "--dry-run")
    assert done.exit_code == 0, done.output
    assert done.stdout.splitlines() == [
        "onnx-int8 v2: 0.05 -> 0.5 (not applied)  advance: every criterion met at 0.05 -> 0.5",
        f"{OTHER} (v1 on every device): no candidate is being rolled out"]
    assert entry(world).fraction == 0.05 and entry(world).candidate.version == "2"      # nothing changed
    store = FleetStore(f"sqlite:///{world.tmp_path}/fleet.db")
    [decided] = store.decisions("stable", TARGET, evidence=False)
    assert decided["action"] == "advance" and not decided["applied"]                  # recorded as not applied
    assert not store.decisions("stable", TARGET, action="retrain")                     # and started nothing
    store.close()
    assert not (world.tmp_path / "mlflow.db").exists()          # a dry run tags no model version with a decision


def test_pause_resume_abort_by_hand_and_the_status_at_80_columns(world):
    paused = fleet(world, "pause", "--target", TARGET, "--reason", "holiday freeze")
    assert paused.exit_code == 0, paused.output
    assert (entry(world).rollout_state, entry(world).state_reason) == ("paused", "holiday freeze")
    resumed = fleet(world, "resume", "--target", TARGET)
    assert resumed.exit_code == 0 and entry(world).rollout_state == "in_progress" and entry(world).fraction == 0.05
    assert fleet(world, "abort", "--target", TARGET).exit_code == 2                   # a reason is required
    aborted = fleet(world, "abort", "--target", TARGET, "--reason", "customer report")
    assert aborted.exit_code == 0, aborted.output
    after = entry(world)
    assert after.candidate is None and after.rollout_state == "aborted" and after.base.version == "1"
    again = fleet(world, "pause", "--target", TARGET, "--reason", "too late")          # nothing left to pause
    assert again.exit_code == 2 and "no rollout in progress" in again.output

    status = fleet(world, "status")
    assert status.exit_code == 0, status.output
    lines = status.output.splitlines()
    history = [line for line in lines if " onnx-int8 v2 at 0.05: " in line]       # the last decisions, one line each
    table = lines[:lines.index(history[0])]
    assert max(map(len, table)) <= 80 and "…" not in status.output, status.output
    # one row per metric, every name whole; a column per version and device class (here all four fit in one table)
    for column in STATUS_COLUMNS[2:]:
        assert any(line.strip().split("  ")[0] == column for line in table), (column, status.output)
    header = next(line for line in table if line.strip().startswith("version"))
    assert header.split() == ["version", "1", "1", "2", "2"]
    assert table[table.index(header) + 1].split() == ["device", "class", "orin-nano", "pi4", "orin-nano", "pi4"]
    assert next(line for line in table if line.strip().startswith("devices")).split()[1:] == ["4", "4", "3", "3"]
    assert [line.split(": ", 1)[1] for line in history] == ["pause by hand: holiday freeze",
                                                            "resume by hand: resumed by hand"]
    assert lines[-1].endswith(" onnx-int8 v2: 0.05 -> 0  abort by hand: customer report")          # where it stood
    wide = fleet(world, "status", columns=250)                                         # a wide terminal: one row each
    assert sum(line.startswith("│ ") for line in wide.output.splitlines()) == 4, wide.output


def test_the_cli_leaves_prefect_usage_telemetry_off_unless_the_user_opts_in(monkeypatch):
    """The ephemeral server's telemetry service runs when `server.analytics_enabled` (prefect/server/services/
    telemetry.py): the CLI turns it off in a shell that says nothing, and leaves a user's `true` alone."""
    from prefect.settings import Settings

    from edgeship.cli.base import quiet_libraries

    monkeypatch.delenv("PREFECT_SERVER_ANALYTICS_ENABLED", raising=False)
    quiet_libraries()
    assert Settings().server.analytics_enabled is False
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")
    quiet_libraries()
    assert Settings().server.analytics_enabled is True
