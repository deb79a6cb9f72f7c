"""The whole release on real parts: DVC data -> train -> QAT -> ONNX -> loopback device agent -> gate ->
MLflow registry (SQLite) -> publish to a signed TUF repository -> device updater over HTTP.

Tiny epochs keep it to a few minutes on 2 cores; accuracy thresholds are therefore not
asserted here (the gate's own verdicts are, against their measured values and limits).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from edgeship.files import sha256_of
from edgeship.records import ReleaseSummary
from edgeship.registry.target_models import version_models

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def make_project(directory: Path, **overrides) -> Path:
    """A fresh edgeship project: params.yaml (tiny epochs), dvc.yaml, a DVC repo, digits as an image folder."""
    from edgeship.tasks.data import export_digits

    directory.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["epochs"] = 3
    params["qat"].update(epochs=1, freeze_bn_after_epoch=0, freeze_observers_after_epoch=1)
    params["benchmark"].update(warmup=5, iterations=50)
    # The whole sensitivity -> plan -> QAT path runs, on a 100-image sample and without the optional extras
    # (converse view, per-layer latency, strategy comparison): those are covered by their own tests.
    params["sensitivity"].update(converse=False, latency=False, max_samples=100)
    params["precision"].update(compare_strategies=False, measure_candidates=False, frontier_steps=0)
    for section, values in overrides.items():
        params[section] = values if not isinstance(params.get(section), dict) else {**params[section], **values}
    (directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / "dvc.yaml", directory / "dvc.yaml")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=directory, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=directory, check=True)
    export_digits(directory / "data" / "raw")
    return directory


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Run `edgeship run --summary` exactly as a newcomer would, in a fresh project."""
    project = make_project(tmp_path_factory.mktemp("project"))
    edgeship = Path(sys.executable).parent / "edgeship"
    # As a newcomer's shell would be: no MLflow URI left in the environment by earlier tests in this process.
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    result = subprocess.run([str(edgeship), "run", "--summary", "release.json"], cwd=project, env=env,
                            capture_output=True, text=True, timeout=1200)
    summary = ReleaseSummary.model_validate_json((project / "release.json").read_text()) \
        if (project / "release.json").is_file() else None
    # The default release passes: exit 3 (a gate failed) is a failure of this test, never a reason to override
    failed = [f"{t.target}: {c.name} {c.measured} vs {c.limit}" for t in (summary.targets if summary else [])
              for c in t.gate.checks if not c.passed]
    assert result.returncode == 0 and summary.passed, (result.returncode, failed, result.stderr[-4000:])
    (project / "terminal.out").write_text(result.stdout)  # what the user saw, for the console test
    (project / "terminal.err").write_text(result.stderr)
    return project, summary


def mlflow_client(project: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def test_release_registers_a_version_with_both_artifacts_and_metrics(released):
    project, summary = released
    client, _ = mlflow_client(project)
    version = client.get_model_version(summary.model_name, summary.model_version)
    assert version.run_id == summary.run_id
    run = client.get_run(summary.run_id)
    assert run.data.tags["edgeship.data_hash"] == summary.data_hash and summary.data_hash
    assert "fp32/test_accuracy" in run.data.metrics
    history = client.get_metric_history(summary.run_id, "train/val_accuracy")
    assert [m.step for m in history] == [1, 2, 3]  # one point per epoch (params: 3 epochs)
    assert [t.target for t in summary.targets] == yaml.safe_load((project / "params.yaml").read_text())["targets"]
    models = version_models(version.tags)
    assert sorted(models) == sorted(t.target for t in summary.targets)  # each shipped target is a logged model
    for target in summary.targets:
        assert target.artifact is not None, target.error
        assert version.tags[f"edgeship.artifact.{target.target}.sha256"] == target.artifact.sha256
        assert target.host_check.accuracy is not None
        assert f"{target.target}/host_accuracy" in run.data.metrics
        assert f"{target.target}/local/p99_ms" in run.data.metrics
        bench = target.benchmarks[0]
        assert bench.status == "ok" and bench.latency_ms.p50 <= bench.latency_ms.p99 <= bench.latency_ms.max
        assert version.tags[f"edgeship.gate.{target.target}"] == ("pass" if target.gate.passed else "fail")
        logged = client.get_logged_model(models[target.target])
        assert logged.source_run_id == summary.run_id and logged.tags["edgeship.sha256"] == target.artifact.sha256
        metrics = {m.key: m.value for m in logged.metrics}
        assert metrics[f"{target.target}/host_accuracy"] == pytest.approx(target.host_check.accuracy)
        assert metrics[f"{target.target}/local/p99_ms"] == pytest.approx(bench.latency_ms.p99)
    gate_files = {f.path for f in client.list_artifacts(summary.run_id, "gate")}
    assert {"gate/gate_report.md", "gate/gate_report.json"} <= gate_files


ADVISORY_CHECKS = {"p50_vs_float", "size_vs_float"}  # this project sets no fail_if_*_than_fp32


def test_each_target_model_loads_in_mlflow_and_computes_what_the_host_check_measured(released):
    """ONNX through mlflow.onnx, LiteRT through the pyfunc model around edgeship's runtime adapter: both give the
    logits the target's own runtime gives for the file that ships."""
    import mlflow.onnx
    import mlflow.pyfunc
    import onnxruntime as ort

    from edgeship.device.runtimes import open_session

    project, summary = released
    client, uri = mlflow_client(project)
    models = version_models(client.get_model_version(summary.model_name, summary.model_version).tags)
    images = np.load(project / "data" / "prepared" / "test.npz")["x"][:4]
    mlflow.set_tracking_uri(uri)
    for target in summary.targets:
        expected = open_session(target.artifact.runtime, target.artifact.path).run(images)
        if target.artifact.runtime == "onnxruntime":
            proto = mlflow.onnx.load_model(f"models:/{models[target.target]}")
            logits = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
                None, {"input": images})[0]
        else:
            logits = mlflow.pyfunc.load_model(f"models:/{models[target.target]}").predict(images)
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5, err_msg=target.target)


def test_every_gate_verdict_agrees_with_its_measurement_and_candidate_follows_the_gates(released):
    project, summary = released
    for target in summary.targets:
        for check in target.gate.checks:
            assert check.measured is not None
            expected = check.measured <= check.limit if check.comparator == "<=" else check.measured >= check.limit
            # Honest records: `passed` is the measurement against the limit, advisory checks included (int8 vs
            # its float sibling, which fail the gate only when params say so: here they do not).
            assert check.passed == expected, check
            assert check.advisory == (check.name in ADVISORY_CHECKS), check
            if check.advisory and not check.passed:
                assert "flagged only" in check.reason and not check.fails_gate, check
    client, _ = mlflow_client(project)
    aliases = client.get_registered_model(summary.model_name).aliases
    assert summary.passed == all(t.gate.passed for t in summary.targets if t.gate.required)
    assert (str(aliases.get("candidate")) == summary.model_version) == summary.passed


def test_a_failing_gate_leaves_candidate_alone(released, tmp_path):
    """A second release whose latency budget cannot be met registers a version but does not alias it, and
    `edgeship run` says so with exit code 3; `--summary -` puts the summary on stdout, the table on stderr."""
    project, first = released
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["targets"] = ["onnx-fp32"]
    params["gate"] = {"onnx-fp32": {"p99_latency_ms": 0.000001}}
    (project / "strict.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    result = subprocess.run([str(Path(sys.executable).parent / "edgeship"), "run", "-p", "strict.yaml", "--summary",
                             "-"], cwd=project, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 3, result.stderr[-4000:]  # refused by the gate (docs/cli.md)
    summary = ReleaseSummary.model_validate_json(result.stdout)  # stdout holds the JSON and nothing else
    assert "fp32 test accuracy" in result.stderr and "FAILED the gate" in result.stderr
    assert not summary.passed and int(summary.model_version) == int(first.model_version) + 1
    check = next(c for c in summary.targets[0].gate.checks if c.name == "p99_latency")
    assert not check.passed and check.measured > check.limit
    client, _ = mlflow_client(project)
    aliases = client.get_registered_model(summary.model_name).aliases
    assert str(aliases.get("candidate")) != summary.model_version
    if first.passed:
        assert str(aliases["candidate"]) == first.model_version


def newcomer_env() -> dict:
    """A newcomer's shell: nothing of this test session's MLflow and Prefect settings but its PREFECT_HOME."""
    left_out = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL", "PREFECT_LOGGING_LEVEL",
                "PREFECT_SERVER_ANALYTICS_ENABLED")
    return {k: v for k, v in os.environ.items() if k not in left_out}


LIBRARY_NOISE = ("| WARNING |", "| INFO ", "| ERROR ", "Traceback", "Downloading artifacts", "telemetry", "Concurrency")


def test_ship_it_and_the_fleet_loop_as_the_docs_type_them(released, tmp_path):
    """docs/shipping.md's ship-it block after the quick start, then docs/fleet-loop.md's try-it blocks, as typed:
    the reviewer promotes v1, publish signs the target models the version lists, a device that nobody provisioned
    installs one with `update`, and `serve` runs it there (same identity), answers an application, reports to
    `fleet collect`; `fleet rollout --dry-run` and `fleet status` show it in an 80-column terminal, with no library
    output on it."""
    import httpx
    import mlflow.artifacts
    import onnxruntime as ort

    from doc_blocks import Processes, doc_block, link_venv, run_shell
    from test_webhook import free_port
    from timing import wait_until

    from edgeship.config import load_params
    from edgeship.device.state import active_model, load_identity
    from edgeship.fleet.store import FleetStore
    from edgeship.ota.repository import open_repository
    from edgeship.ota.rollout import read_channel

    project, summary = released
    link_venv(project)
    env, device = newcomer_env(), tmp_path / "device"
    ota_port, device_port, broker_port = free_port(), free_port(), free_port()
    # A user types one line at a time; the test waits, as they would, for the file server before the update.
    serving = f"until (exec 3<>/dev/tcp/127.0.0.1/{ota_port}) 2>/dev/null; do sleep 0.1; done"
    processes = Processes(tmp_path)
    try:
        ship = doc_block("docs/shipping.md", "ship-it", replace={
            "8000 &": f"{ota_port} &\n{serving}", "127.0.0.1:8000": f"127.0.0.1:{ota_port}", "/tmp/device": str(device)})
        processes.start_block("ship-it", ship, project, env)
        said = processes.log("ship-it")
        assert not [noise for noise in LIBRARY_NOISE if noise in said], said

        channel = read_channel(open_repository(load_params(project / "params.yaml").ota, project), "stable")
        int8 = next(t for t in summary.targets if t.target == "onnx-int8")
        shipped = channel.targets["onnx-int8"]
        assert shipped.base.version == summary.model_version and shipped.allow_failed_gate is None
        assert shipped.base.sha256 == int8.artifact.sha256
        golden = shipped.base.golden  # from the release's own host check, in the target's model
        assert golden is not None and golden.count == 8
        client, uri = mlflow_client(project)
        model_id = version_models(client.get_model_version(summary.model_name, summary.model_version).tags)["onnx-int8"]
        model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_id}", tracking_uri=uri,
                                                             dst_path=str(tmp_path / "model")))
        assert sha256_of(model_dir / "extra_files" / "golden.npz") == golden.sha256
        registered_model = model_dir / "model.onnx"  # the logged model's file is the one that shipped
        assert sha256_of(registered_model) == int8.artifact.sha256

        identity = load_identity(device)  # `update` provisioned the device with the flags it was given
        assert identity.provisioned and identity.target == "onnx-int8" and identity.channel == "stable"
        assert (device / "root.json").read_bytes() == (project / "ota-repo" / "metadata" / "1.root.json").read_bytes()
        installed = active_model(device)
        assert installed.version == summary.model_version
        images = np.load(project / "data" / "prepared" / "test.npz")["x"][:8]
        outputs = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": images})[0]
                   for path in (installed.path, registered_model)]
        np.testing.assert_allclose(*outputs, rtol=0, atol=0)

        start = doc_block("docs/fleet-loop.md", "fleet-loop-start", replace={
            "1884": str(broker_port), "/tmp/device": str(device), "8766": str(device_port)})
        processes.start_block("fleet-loop-start", start, project, env)
        health = f"http://127.0.0.1:{device_port}/health"

        def answering():
            try:
                return httpx.get(health, timeout=5).json()["versions"]["active"] == summary.model_version
            except httpx.HTTPError:
                return False

        wait_until(answering, 120, f"serve answering with v{summary.model_version}: {processes.log('fleet-loop-start')}")
        asked = run_shell(doc_block("docs/fleet-loop.md", "fleet-loop-ask", replace={"8766": str(device_port)}),
                          cwd=project, env=env)
        answer = json.loads(asked.stdout)
        assert (answer["slot"], answer["version"], len(answer["outputs"][0])) == ("active", summary.model_version, 10)
        store = FleetStore(f"sqlite:///{project / 'fleet.db'}")
        wait_until(lambda: store.count_records() and any(r.inferences for r in store.records()), 60,
                   f"a telemetry window with the answer: {processes.log('fleet-loop-start')}")
        store.close()

        look = run_shell(doc_block("docs/fleet-loop.md", "fleet-loop-look"), cwd=project, env={**env, "COLUMNS": "80"})
        lines = look.stdout.splitlines()
        assert lines[:4] == [f"{t} (v{summary.model_version} on every device): no candidate is being rolled out"
                             for t in sorted(t.target for t in summary.targets)]
        table = lines[4:]
        assert max(map(len, table)) <= 80 and "…" not in look.stdout, look.stdout
        header = next(i for i, line in enumerate(table) if line.split()[:1] == ["version"])  # one row per metric
        assert table[header].split() == ["version", summary.model_version], look.stdout
        assert table[header + 1].split() == ["device", "class", "pi4"], look.stdout
        assert next(line.split() for line in table if line.split()[:1] == ["devices"]) == ["devices", "1"]
        assert not [noise for noise in LIBRARY_NOISE if noise in look.stderr], look.stderr
        updates = [json.loads(line) for line in processes.log("fleet-loop-start").splitlines() if line.startswith("{")]
        assert updates and updates[0]["status"] == "up_to_date"   # serve's updater runs as the device update set up
    finally:
        processes.stop()


def test_cli_rejects_a_broken_config_before_any_work(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  epochs: -3\n  learning_rate: 1\n")
    edgeship = Path(sys.executable).parent / "edgeship"
    result = subprocess.run([str(edgeship), "run"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "'train.epochs'" in result.stderr and "'train.learning_rate': unknown key" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_the_terminal_shows_stages_and_the_table_and_the_run_log_keeps_library_noise(released):
    """Progress per stage and the final table on the terminal; warnings and native runtime logs in the log file
    of the run's directory, which is in MLflow too."""
    project, summary = released
    shown = (project / "terminal.err").read_text() + (project / "terminal.out").read_text()
    for stage in ("data", "train", "qat", "compile onnx-int8", "bench onnx-int8 @ local", "register"):
        assert stage in (project / "terminal.err").read_text(), stage  # progress: stderr
    assert "onnx-int8" in (project / "terminal.out").read_text()  # the result's table: stdout
    assert "fp32 test accuracy" in (project / "terminal.out").read_text()
    for noise in ("Warning", "CleanUnusedInitializers", "INFO: ", "Traceback"):
        assert noise not in shown, noise
    assert not re.search(r"^[IWE]\d{4} \d\d:\d\d", shown, re.M), "a glog line from torch or a runtime"
    log = project / ".edgeship" / "runs" / summary.run_id / "release.log"
    assert "UserWarning" in log.read_text()  # torch's quantized-tensor deprecation, raised during QAT
    client, _ = mlflow_client(project)
    assert "logs/release.log" in {f.path for f in client.list_artifacts(summary.run_id, "logs")}
