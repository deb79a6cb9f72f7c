"""The loop a platform team runs, on the real services of `infra/local-stack.sh` (every process on loopback,
on free ports, with its own PostgreSQL databases, all stopped and dropped at the end):

`prefect deploy --all` of prefect.yaml onto a process work pool served by two `prefect worker start` processes
-> release started through Prefect's API the way the UI's Run button starts it (a deployment with parameters),
while the other worker runs a rollout-controller pass started the same way -> MLflow server (PostgreSQL,
artifacts in S3) registers the version -> a reviewer sets `production` on the MLflow server -> MLflow
delivers its signed webhook -> `edgeship webhook serve` runs the publish deployment
-> the signed OTA repository lands in the S3 bucket (an endpoint that checks SigV4 signatures) -> a device
installs it over plain HTTP from the read-only server in front of the bucket. Each run says which worker
executed it: the worker labels the flow run (`prefect.worker.name`, prefect/workers/base.py) when it submits it.

The commands a user types are read from docs/real-services.md and docs/past-one-machine.md and run as typed
(tests/doc_blocks.py), changing only ports, paths and the target.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from doc_blocks import Processes, doc_block, link_venv, run_shell
from test_release_e2e import make_project
from test_webhook import free_port, wait_healthy

REPO = Path(__file__).resolve().parents[1]
POOL = "edgeship"  # prefect.yaml's work pool
WORKERS = ("edgeship-worker-1", "edgeship-worker-2")
pytestmark = pytest.mark.e2e


@pytest.fixture
def processes(tmp_path):
    started = Processes(tmp_path)
    yield started
    started.stop()


def _tiny_project(directory: Path, env: dict) -> Path:
    lenient = {"max_accuracy_drop": 100.0, "p99_latency_ms": 1000, "max_size_mb": 50}
    project = make_project(directory, targets=["onnx-fp32"],  # one target, no QAT: the loop is under test
                           train={"epochs": 1}, sensitivity={"enabled": False}, ptq={"enabled": False},
                           benchmark={"warmup": 3, "iterations": 20, "warmup_until_stable": False},
                           ota={"repository": "s3://edgeship-ota/releases",
                                "s3_endpoint_url": env["EDGESHIP_S3_ENDPOINT_URL"]})
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["gate"] = {"onnx-fp32": lenient}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


def _wait_for(what: str, probe, timeout_s: float, diagnose=lambda: ""):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}\n{diagnose()}")


def _deployment_id(api: str, name: str) -> str | None:
    answer = httpx.get(f"{api}/deployments/name/{name}", timeout=10)
    return answer.json()["id"] if answer.status_code == 200 else None


def _run_from_ui(api: str, deployment_id: str, parameters: dict) -> str:
    """POST /deployments/{id}/create_flow_run: what the Prefect UI's "Run" -> "Custom run" sends."""
    answer = httpx.post(f"{api}/deployments/{deployment_id}/create_flow_run", timeout=10,
                        json={"parameters": parameters, "state": {"type": "SCHEDULED",
                                                                  "message": "Run from the Prefect UI"}})
    assert answer.status_code == 201, answer.text
    return answer.json()["id"]


def _flow_run(api: str, flow_run_id: str) -> dict:
    return httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=10).json()


def _final_state(api: str, flow_run_id: str) -> str | None:
    state = _flow_run(api, flow_run_id)["state"]["type"]
    return state if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None


def _worker_of(api: str, flow_run_id: str) -> str | None:
    """The worker that executed a flow run: the label it gives the run when it submits it."""
    return (_flow_run(api, flow_run_id).get("labels") or {}).get("prefect.worker.name")


def _runs_of(api: str, deployment_id: str) -> list[str]:
    answer = httpx.post(f"{api}/flow_runs/filter", timeout=10, json={"deployments": {"id": {"any_": [deployment_id]}}})
    return [run["id"] for run in answer.json()]


def _deploy_to_work_pool(api: str, project: Path, env: dict, processes: Processes) -> dict[str, str]:
    """prefect.yaml's deployments on a process work pool with two workers, as docs/past-one-machine.md types it;
    their ids. The schedules are registered and then paused: every run this test checks, it starts itself."""
    link_venv(project)
    run_shell(doc_block("docs/past-one-machine.md", "work-pool-deploy",
                        replace={"path/to/edgeship/prefect.yaml": str(REPO / "prefect.yaml")}),
              cwd=project, env=env, timeout_s=300)
    names = {"release": "release/scheduled-retraining", "publish": "publish/publish",
             "controller": "rollout-controller/rollout-controller", "resign": "resign/resign"}
    ids = {key: _deployment_id(api, name) for key, name in names.items()}
    for key in ("release", "controller", "resign"):
        deployment = httpx.get(f"{api}/deployments/{ids[key]}", timeout=10).json()
        assert deployment["work_pool_name"] == POOL and deployment["schedules"], deployment
        assert httpx.patch(f"{api}/deployments/{ids[key]}", json={"paused": True}, timeout=10).status_code == 204
    workers = doc_block("docs/past-one-machine.md", "work-pool-workers")  # one flow run at a time each: a
    assert all(f"--pool {POOL} " in workers and f"--name {name} " in workers for name in WORKERS)  # second run
    processes.start_block("workers", workers, project, env)                                     # goes to the other
    _wait_for("both workers to poll the pool", lambda: {w["name"] for w in httpx.post(
        f"{api}/work_pools/{POOL}/workers/filter", json={}, timeout=10).json()} >= set(WORKERS), 120,
              lambda: processes.log("workers"))
    return ids


def test_release_promote_publish_and_install_on_the_real_stack(stack, processes, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from edgeship.ota.storage import S3Storage, StorageError

    env, root = stack
    api, tracking, ota_url = env["PREFECT_API_URL"], env["MLFLOW_TRACKING_URI"], env["EDGESHIP_OTA_URL"]
    project = _tiny_project(tmp_path / "project", env)
    env = {**env, "OMP_NUM_THREADS": "1", "PREFECT_WORKER_QUERY_SECONDS": "1"}
    ids = _deploy_to_work_pool(api, project, env, processes)
    workers_log = lambda: processes.log("workers")  # noqa: E731
    run_id = _run_from_ui(api, ids["release"], {"params_path": "params.yaml", "workdir": str(project),
                                                "summary_path": "release.json"})
    release_worker = _wait_for("a worker to take the release", lambda: _worker_of(api, run_id), 120, workers_log)
    # While that worker is busy with the release, a second run (a dry controller pass) goes to the other one.
    controller_id = _run_from_ui(api, ids["controller"], {"params_path": "params.yaml", "workdir": str(project),
                                                          "apply": False})
    state = _wait_for("the controller pass", lambda: _final_state(api, controller_id), 300, workers_log)
    assert state == "COMPLETED", workers_log()
    state = _wait_for("the release run", lambda: _final_state(api, run_id), 900, workers_log)
    assert state == "COMPLETED", workers_log()
    assert {release_worker, _worker_of(api, controller_id)} == set(WORKERS), "each worker executed a run"
    summary = json.loads((project / "release.json").read_text())
    assert summary["passed"] and summary["model_version"] == "1"

    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    version = client.get_model_version(summary["model_name"], "1")
    assert version.tags["edgeship.gate"] == "pass"
    assert client.get_registered_model(summary["model_name"]).aliases == {"candidate": "1"}
    model_id = version.tags["edgeship.model.onnx-fp32"]  # the target's logged model, in the MLflow bucket
    stored = list((root / "stack" / "s3" / "edgeship-mlflow").rglob(f"models/{model_id}/artifacts/model.onnx"))
    assert stored, "the compiled target's model is in the MLflow bucket"

    port = free_port()  # the receiver, and its registration with MLflow, as docs/real-services.md types them
    processes.start_block("webhook", doc_block("docs/real-services.md", "webhook", replace={"8787": str(port)}),
                          project, env)
    wait_healthy(f"http://127.0.0.1:{port}/health", timeout_s=60)

    client.set_registered_model_alias(summary["model_name"], "production", "1")  # the reviewer, in MLflow's UI
    publish_run = _wait_for("the webhook to start the publish deployment", lambda: _runs_of(api, ids["publish"]), 120,
                            lambda: processes.log("webhook"))[0]
    state = _wait_for("the publish run to sign the release into the bucket",
                      lambda: _final_state(api, publish_run), 300, lambda: processes.log("webhook") + workers_log())
    assert state == "COMPLETED" and _worker_of(api, publish_run) in WORKERS, workers_log()

    # The device was provisioned with the root metadata; the tiny project ships onnx-fp32 alone.
    (project / "root.json").write_bytes(httpx.get(f"{ota_url}/releases/metadata/1.root.json", timeout=5).content)
    device = run_shell(doc_block("docs/real-services.md", "device-from-bucket",
                                 replace={"/tmp/device": str(tmp_path / "device"), "onnx-int8": "onnx-fp32"}),
                       cwd=project, env=env, timeout_s=300)
    report = json.loads(device.stdout.strip().splitlines()[-1])
    assert report["status"] == "updated" and report["installed_version"] == "1", report
    fp32 = summary["targets"][0]
    assert Path(report["model_path"]).read_bytes() == Path(fp32["artifact"]["path"]).read_bytes()
    assert all(processes.alive("workers", f"--name {name} ") for name in WORKERS)

    # The bucket checks signatures as AWS does: a wrong secret is refused, with the fix named.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", env["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    forged = S3Storage("edgeship-ota", "releases", endpoint_url=env["EDGESHIP_S3_ENDPOINT_URL"])
    with pytest.raises(StorageError, match="access denied"):
        forged.put("metadata/timestamp.json", b"{}")
