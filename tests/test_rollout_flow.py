"""The `rollout` flow on a real signed repository, a real fleet store and a real MLflow registry:
hold, advance and complete a rollout, abort another and stop its shadow, and steer one by hand."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from edgeship.fleet.rollout import hand_command, offer_shadow
from edgeship.fleet.store import FleetStore
from edgeship.ota.rollout import read_channel

from fleet_records import record
from ota_world import MODEL, TARGET, OtaWorld

POLICY = {"default": {"stages": [0.5, 1.0], "min_reporting_devices": 3, "soak_s": 0,
                      "success": {"min_shadow_agreement": 0.9},
                      "abort_criteria": [{"failure_type": "probation", "min_executed_devices": 2,
                                          "threshold_percentage": 50}]}}


@pytest.fixture
def world(tmp_path):
    world = OtaWorld(tmp_path)
    world.write_params(rollout=POLICY)
    yield world
    world.close()


def current(world):
    """The channel entry as committed now (the world's repository object caches what it last loaded)."""
    with world.repository.writing("test reads the channel"):
        return read_channel(world.repository, "stable").targets[TARGET]


def register_versions(tmp_path, versions):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("release", artifact_location=str(tmp_path / "mlartifacts"))
    client.create_registered_model(MODEL)
    for version in versions:
        run = client.create_run(experiment)
        client.create_model_version(MODEL, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    return client


def reports(store, version, devices, events=(("installed", None), ("confirmed", None)), shadow=None, start=0):
    """Windows of `devices` on `version`; on v2 each compares 100 answers with v1, agreeing on 98."""
    at = datetime.now(timezone.utc) + timedelta(seconds=31)  # events are 30 s before the window end
    for i in range(devices):
        store.add_record(record(f"d{start + i}", version, at=at, shadow=shadow, channel="stable", target=TARGET,
                                events=[(kind, version, reason) for kind, reason in events],
                                compared=("1", 98, 100) if version == "2" else None))


def test_the_flow_holds_advances_completes_and_records_why(world, tmp_path, prefect_api):
    from edgeship.flows.rollout import rollout_controller as rollout

    client = register_versions(tmp_path, ["1", "2"])
    world.publish("1")
    world.publish("2", rollout_fraction=0.0)
    offer_shadow(world.repository, "stable", TARGET, shadow_fraction=0.5, sample_rate=0.2)
    store = FleetStore(f"sqlite:///{tmp_path}/fleet.db")

    first = rollout(workdir=str(tmp_path))
    assert [d["action"] for d in first] == ["hold"] and "devices report the shadow" in first[0]["reasons"][0]
    reports(store, "1", 4, shadow=("2", 97, 100))          # the shadow cohort agrees
    second = rollout(workdir=str(tmp_path))
    assert second[0]["action"] == "advance" and second[0]["fraction_after"] == 0.5 and second[0]["applied"]
    assert current(world).fraction == 0.5
    reports(store, "2", 3, start=10)                       # the first stage installs and confirms
    third = rollout(workdir=str(tmp_path))
    assert third[0]["action"] == "advance" and third[0]["fraction_after"] == 1.0
    entry = current(world)
    assert entry.base.version == "2" and entry.candidate is None and entry.shadow is None

    actions = [d["action"] for d in store.decisions("stable", TARGET)]
    assert actions == ["hold", "advance", "advance"]
    tags = client.get_model_version(MODEL, "2").tags
    assert json.loads(tags["rollout.decision"])["action"] == "advance"
    assert float(tags["fleet.devices"]) == 3.0
    # the candidate's agreement with the base it replaces, and its accuracy estimated without labels (no calibration
    # in this channel entry: the mean top-1 confidence, half the answers in each of the two top tenths)
    assert float(tags["fleet.agreement_with_base"]) == pytest.approx(0.98)
    assert float(tags["fleet.compared_answers"]) == 300.0
    assert float(tags["fleet.estimated_accuracy"]) == pytest.approx(0.9)
    run_id = client.get_model_version(MODEL, "2").run_id
    assert {a.path for a in client.list_artifacts(run_id, "fleet")} >= {f"fleet/rollout-stable-{TARGET}.png"}
    images = _timeline_images(f"rollout-stable-{TARGET}-timeline")  # the timeline is shown in Prefect too
    assert images and all(png.startswith(b"\x89PNG") for png in images)
    assert client.get_metric_history(run_id, "fleet.p99_ms.default")
    assert float(tags["fleet.shadow_agreement"]) == pytest.approx(0.97)  # measured while it was the shadow
    store.close()


def _timeline_images(key: str) -> list[bytes]:
    """The rollout timeline's Prefect image artifacts (the PNG inline: the registry here is SQLite)."""
    import base64

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        found = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return [base64.b64decode(a.data.split(",", 1)[1]) for a in found
            if a.type == "image" and a.data.startswith("data:image/png;base64,")]


def test_abort_on_probation_failures_and_hand_commands(world, tmp_path, prefect_api):
    from edgeship.flows.rollout import rollout_controller as rollout

    world.publish("1")
    world.publish("2", rollout_fraction=0.5)
    store = FleetStore(f"sqlite:///{tmp_path}/fleet.db")
    hand_command(world.repository, store, "pause", "stable", TARGET, "holiday freeze")
    assert current(world).rollout_state == "paused"
    paused = rollout(workdir=str(tmp_path))
    assert paused[0]["action"] == "none" and paused[0]["reasons"] == ["rollout is paused"]
    hand_command(world.repository, store, "resume", "stable", TARGET, "back")
    rollout(workdir=str(tmp_path))               # marks the rollout's start
    reports(store, "2", 2, events=(("installed", None), ("rolled_back", "probation: latency")))
    decisions = rollout(workdir=str(tmp_path))
    assert decisions[0]["action"] == "abort" and decisions[0]["applied"]
    assert "probation failures on 2/2 devices" in decisions[0]["reasons"][0]
    entry = current(world)
    assert entry.candidate is None and entry.rollout_state == "aborted" and entry.base.version == "1"
    assert [d["action"] for d in store.decisions("stable", TARGET)] == ["pause", "resume", "hold", "abort"]
    store.close()
