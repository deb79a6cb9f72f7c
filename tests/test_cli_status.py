"""`edgeship status` and `edgeship --help`, through the CLI as a user runs them, on a real MLflow registry
(SQLite) and a real signed OTA repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_ota import make_artifact

from edgeship.ota.keys import Keystore
from edgeship.ota.publish import publish_release
from edgeship.ota.repository import OtaRepository
from edgeship.ota.storage import open_storage

EDGESHIP = Path(sys.executable).parent / "edgeship"


def edgeship(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "EDGESHIP_TRACKING_URI")}
    env["COLUMNS"] = "200"  # one table row per line
    return subprocess.run([str(EDGESHIP), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def test_status_shows_versions_gates_aliases_and_what_each_channel_ships(tmp_path):
    from mlflow import MlflowClient

    (tmp_path / "params.yaml").write_text("project: {name: tiny}\n")
    empty = edgeship("status", cwd=tmp_path)
    assert empty.returncode == 0, empty.stderr
    assert "no version registered yet" in empty.stdout and "nothing published yet" in empty.stdout

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("tiny")
    run = client.create_run(client.create_experiment("status", artifact_location=(tmp_path / "art").as_uri()))
    for verdict in ("pass", "fail"):
        version = client.create_model_version("tiny", source=f"runs:/{run.info.run_id}/model",
                                              run_id=run.info.run_id).version
        for key, value in {"edgeship.gate": verdict, "edgeship.gate.onnx-int8": verdict,
                           "edgeship.gate.onnx-fp32": "pass"}.items():
            client.set_model_version_tag("tiny", version, key, value)
    client.set_registered_model_alias("tiny", "candidate", "1")
    client.set_registered_model_alias("tiny", "production", "1")

    repository = OtaRepository(open_storage(str(tmp_path / "ota-repo")), Keystore(tmp_path / ".edgeship" / "keys"))
    publish_release(repository, "tiny", "1", [make_artifact(tmp_path, "1")], channel="stable")
    publish_release(repository, "tiny", "2", [make_artifact(tmp_path, "2")], channel="stable")
    publish_release(repository, "tiny", "2", [make_artifact(tmp_path, "2")], channel="canary", rollout_fraction=0.1)

    shown = edgeship("status", "--json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert [(v["version"], v["gate"], v["aliases"]) for v in status["versions"]] == [
        ("2", "fail", []), ("1", "pass", ["candidate", "production"])]
    assert status["versions"][0]["target_gates"] == {"onnx-fp32": "pass", "onnx-int8": "fail"}
    channels = {c["channel"]: c for c in status["channels"]}
    assert sorted(channels) == ["canary", "stable"]
    assert [(t["target"], t["version"], t["previous"]) for t in channels["stable"]["targets"]] == [
        ("onnx-int8", "2", "1")]
    canary = channels["canary"]["targets"][0]
    assert (canary["candidate"], canary["fraction"]) == ("2", 0.1)

    table = edgeship("status", cwd=tmp_path).stdout
    assert "candidate, production" in table and "onnx-int8 FAIL" in table and "canary" in table


def test_help_reads_as_the_journey(tmp_path):
    shown = edgeship("--help", cwd=tmp_path)
    assert shown.returncode == 0
    listed = [line.split()[1] for line in shown.stdout.splitlines() if line.startswith("│ ") and line[2] != " "]
    journey = ["data", "check", "run", "status", "promote", "publish", "rollback", "serve", "webhook"]
    assert [name for name in listed if name in journey] == [name for name in journey if name in listed]
    assert {"data", "check", "run", "status", "publish", "rollback", "serve", "webhook"} <= set(listed)
