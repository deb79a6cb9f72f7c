"""Only what passed ships: the publish flow against a real MLflow registry (SQLite) and a real TUF repository.

Versions are registered the way the release flow registers them (`register_release`, with
gate reports); the publish flow and `edgeship promote/publish/rollout/channels` run for real.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from edgeship.cli import app
from edgeship.config import RegistryParams
from edgeship.errors import GateFailed
from edgeship.files import sha256_of
from edgeship.flows.publish import publish
from edgeship.ota.rollout import read_channel
from edgeship.records import BenchmarkResult, GateCheck, GateReport, HostCheck, LatencyStats, TargetSummary
from edgeship.registry.model_registry import promote, register_release
from edgeship.registry.tracking import ReleaseRun
from ota_world import make_artifact

MODEL = "digits-classifier"


def gate(target: str, passed: bool, required: bool = True) -> GateReport:
    return GateReport(target=target, required=required, checks=[
        GateCheck(name="p99_latency", measured=3.0 if passed else 30.0, limit=20.0, comparator="<=", passed=passed)])


def measured(artifact, gate_report: GateReport) -> TargetSummary:
    """The target as the release measured it: accuracy here and on a device, latency on the device."""
    p99 = gate_report.checks[0].measured
    bench = BenchmarkResult(target=artifact.target, device="pi4", runtime=artifact.runtime, sha256=artifact.sha256,
                            accuracy=0.93, latency_ms=LatencyStats(p50=p99 / 2, p90=p99, p95=p99, p99=p99, max=p99,
                                                                   mean=p99 / 2))
    return TargetSummary(target=artifact.target, artifact=artifact, benchmarks=[bench], gate=gate_report,
                         host_check=HostCheck(target=artifact.target, accuracy=0.95, runtime=artifact.runtime))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project whose registry holds v1 (int8 passed, fp32 failed but not required) and v2 (int8 failed)."""
    root = tmp_path_factory.mktemp("project")
    params = {"project": {"name": MODEL},
              "registry": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "artifact_location": "mlartifacts"},
              "ota": {"repository": "ota-repo", "keystore": ".edgeship/keys"},
              "gate": {"onnx-int8": {"p99_latency_ms": 20}, "onnx-fp32": {"p99_latency_ms": 20, "required": False}}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    prepared = root / "data" / "prepared"
    prepared.mkdir(parents=True)
    np.savez(prepared / "test.npz", x=np.random.default_rng(0).random((6, 1, 8, 8), dtype=np.float32),
             y=np.zeros(6, dtype=np.int64))
    settings = RegistryParams(**params["registry"])
    for version, int8_passes in (("1", True), ("2", False)):
        run = ReleaseRun.start(settings, root, f"release-{version}")
        artifacts = [make_artifact(root / "builds", version, target=t) for t in ("onnx-int8", "onnx-fp32")]
        gates = [gate("onnx-int8", int8_passes), gate("onnx-fp32", False, required=False)]
        registered = register_release(run, MODEL, f"runs:/{run.run_id}/model", list(map(measured, artifacts, gates)),
                                      alias="candidate")
        assert registered == version
        run.finish()
    run = ReleaseRun.start(settings, root, "fallback-1")  # the small fallback model, registered on its own
    tiny = make_artifact(root / "builds-tiny", "1", target="onnx-int8", seed=5)
    register_release(run, "digits-tiny", f"runs:/{run.run_id}/model", [measured(tiny, gate("onnx-int8", True))],
                     alias="production")
    run.finish()
    params["ota"]["fallback"] = {"model_name": "digits-tiny", "alias": "production"}
    (root / "params-fallback.yaml").write_text(yaml.safe_dump(params))
    return root, settings.tracking_uri


def test_each_target_is_a_logged_model_of_the_version_loadable_with_its_metrics_and_verdict(project):
    import mlflow.onnx
    import onnxruntime as ort
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus

    from edgeship.registry.target_models import version_models

    _, tracking = project
    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    version = client.get_model_version(MODEL, "1")
    models = version_models(version.tags)
    assert sorted(models) == ["onnx-fp32", "onnx-int8"]  # one per compiled target, failed gates included
    batch = np.random.default_rng(3).random((2, 1, 8, 8), dtype=np.float32)
    for target, model_id in models.items():
        logged = client.get_logged_model(model_id)
        assert logged.source_run_id == version.run_id and logged.status == LoggedModelStatus.READY
        assert logged.tags["edgeship.model_version"] == "1" and logged.tags["edgeship.registered_model"] == MODEL
        assert logged.tags["edgeship.sha256"] == version.tags[f"edgeship.artifact.{target}.sha256"]
        assert logged.tags["edgeship.gate"] == version.tags[f"edgeship.gate.{target}"]
        metrics = {m.key: m.value for m in logged.metrics}
        assert metrics[f"{target}/host_accuracy"] == 0.95 and metrics[f"{target}/pi4/accuracy"] == 0.93
        assert metrics[f"{target}/pi4/p99_ms"] == (3.0 if target == "onnx-int8" else 30.0)
        assert metrics[f"{target}/bytes"] > 0
        proto = mlflow.onnx.load_model(f"models:/{model_id}")  # what MLflow users load, as they load any model
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        assert session.run(None, {"input": batch})[0].shape == (2, 10)
        assert logged.to_dictionary()["model_type"] == "edgeship/onnxruntime"
    assert client.get_logged_model(models["onnx-fp32"]).tags["edgeship.gate.failed_checks"] == "p99_latency"


def test_publish_refuses_a_logged_model_changed_after_gating(project, tmp_path):
    from mlflow import MlflowClient

    from edgeship.errors import SignatureError
    from edgeship.registry.model_registry import resolve_release
    from edgeship.registry.target_models import version_models

    root, tracking = project
    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    model_id = version_models(client.get_model_version(MODEL, "1").tags)["onnx-int8"]
    stored = Path(client.get_logged_model(model_id).artifact_location.removeprefix("file://")) / "model.onnx"
    original = stored.read_bytes()
    stored.write_bytes(original[:-4] + bytes(4))  # the store changed: same size, other bytes
    try:
        with pytest.raises(SignatureError, match="onnx-int8: no file of logged model .* has the sha256"):
            resolve_release(tracking, MODEL, tmp_path, version="1", targets=["onnx-int8"])
    finally:
        stored.write_bytes(original)


def test_resolve_reads_the_named_store_whatever_store_the_process_last_used(project, tmp_path):
    """In one process (a test session, a Prefect worker) another store may be the process-wide MLflow URI; a
    release is still resolved from the store it was named with."""
    import mlflow

    from edgeship.registry.model_registry import resolve_release

    root, tracking = project
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'another.db'}")
    try:
        release = resolve_release(tracking, MODEL, tmp_path / "dl", version="1", targets=["onnx-int8"])
    finally:
        mlflow.set_tracking_uri(before)
    assert [artifact.target for artifact in release.artifacts] == ["onnx-int8"]


def test_publish_ships_only_targets_that_passed_and_records_how_the_version_was_chosen(project):
    root, tracking = project
    promote(tracking, MODEL, "1", "production")
    descriptor = publish(alias="production", workdir=str(root))
    assert sorted(descriptor.targets) == ["onnx-int8"]  # fp32's (optional) gate failed: it does not ship
    entry = descriptor.targets["onnx-int8"]
    assert entry.base.version == "1" and entry.allow_failed_gate is None
    assert descriptor.source == "alias production -> v1"
    assert entry.base.latency_budget_ms == 20 and entry.base.golden.count == 6  # golden vectors from the test split
    from mlflow import MlflowClient
    tags = MlflowClient(tracking_uri=tracking, registry_uri=tracking).get_model_version(MODEL, "1").tags
    assert tags["edgeship.published.stable"].startswith("alias production -> v1 at 1")


def test_a_version_whose_required_gate_failed_is_refused_unless_the_override_names_a_reason(project):
    root, tracking = project
    with pytest.raises(GateFailed, match="failed its required gate for onnx-int8.*--allow-failed-gate"):
        promote(tracking, MODEL, "2", "production")
    with pytest.raises(GateFailed, match="refusing to publish it"):
        publish(version="2", workdir=str(root))

    reason = "p99 measured on a throttled device; re-measured by hand at 12 ms"
    descriptor = publish(version="2", workdir=str(root), rollout_fraction=0.1, allow_failed_gate=reason)
    entry = descriptor.targets["onnx-int8"]
    assert (entry.candidate.version, entry.allow_failed_gate, entry.fraction) == ("2", reason, 0.1)
    assert sorted(descriptor.targets) == ["onnx-fp32", "onnx-int8"]  # the override ships what was asked for
    from mlflow import MlflowClient
    tags = MlflowClient(tracking_uri=tracking, registry_uri=tracking).get_model_version(MODEL, "2").tags
    assert tags["edgeship.allow_failed_gate"] == reason


def test_cli_promote_rollout_and_channels(project):
    root, _ = project
    runner = CliRunner()
    refused = runner.invoke(app, ["promote", "2", "-C", str(root)])
    assert refused.exit_code == 3 and "failed its required gate" in refused.stderr  # refused by the gate
    unpublished = runner.invoke(app, ["publish", "--version", "2", "-C", str(root)])
    assert unpublished.exit_code == 3 and "refusing to publish it" in unpublished.stderr  # as `run` exits
    widened = runner.invoke(app, ["rollout", "stable", "--target", "onnx-int8", "--fraction", "0.5",
                                  "--expect-version", "2", "-C", str(root)])
    assert widened.exit_code == 0, widened.output
    assert json.loads(widened.stdout)["targets"]["onnx-int8"]["fraction"] == 0.5
    wrong = runner.invoke(app, ["rollout", "stable", "--target", "onnx-int8", "--fraction", "0.9",
                                "--expect-version", "1", "-C", str(root)])
    assert wrong.exit_code == 2 and "candidate is v2, not v1" in wrong.output
    listing = runner.invoke(app, ["channels", "-C", str(root)], env={"COLUMNS": "200"})
    assert listing.exit_code == 0 and "onnx-int8" in listing.stdout and "50%" in listing.stdout
    resign = runner.invoke(app, ["resign", "-C", str(root)])
    assert resign.exit_code == 0 and "timestamp" in resign.output
    from edgeship.ota.repository import open_repository
    from edgeship.config import load_params
    repository = open_repository(load_params(root / "params.yaml").ota, Path(root))
    assert read_channel(repository, "stable").targets["onnx-int8"].candidate.version == "2"


def test_the_fallback_model_named_in_config_ships_with_every_release(project):
    root, _ = project
    descriptor = publish(version="1", channel="with-fallback", params_path="params-fallback.yaml", workdir=str(root))
    fallback = descriptor.targets["onnx-int8"].fallback
    assert (fallback.model_name, fallback.version) == ("digits-tiny", "1")
    assert fallback.target_path == "models/digits-tiny/1/onnx-int8/model.onnx"


def test_the_webhook_handler_publishes_the_events_version_not_the_alias(project):
    from edgeship.flows.webhook import publish_in_process

    root, tracking = project
    promote(tracking, MODEL, "1", "production")
    handler = publish_in_process(root, "params.yaml")
    with pytest.raises(GateFailed):  # the event names v2, whose gate failed: refused (the receiver does not retry)
        handler(MODEL, "2")
    handler(MODEL, "1")
    from edgeship.config import load_params
    from edgeship.ota.repository import open_repository
    descriptor = read_channel(open_repository(load_params(root / "params.yaml").ota, Path(root)), "stable")
    assert descriptor.source == "version 1" and descriptor.targets["onnx-int8"].base.version == "1"


def test_a_version_registered_before_targets_were_models_still_publishes(project, tmp_path):
    """Old records still read: a version whose compiled files are run artifacts (compiled/<target>/), as versions
    registered before per-target models kept them, resolves from there, checked against its recorded sha256."""
    from mlflow import MlflowClient

    from edgeship.registry.model_registry import resolve_release

    root, tracking = project
    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    run = ReleaseRun.start(RegistryParams(tracking_uri=tracking, artifact_location="mlartifacts"), root, "old-style")
    artifact = make_artifact(tmp_path / "builds", "9", target="onnx-int8")
    run.log_artifact(artifact.path, "compiled/onnx-int8")
    run.log_text(artifact.model_copy(update={"path": Path(artifact.path.name)}).model_dump_json(),
                 "compiled/onnx-int8/artifact.json")
    client.create_registered_model("digits-old-style")
    version = client.create_model_version("digits-old-style", source=f"runs:/{run.run_id}/model", run_id=run.run_id)
    for key, value in {"edgeship.artifact.onnx-int8.sha256": artifact.sha256, "edgeship.gate.onnx-int8": "pass",
                       "edgeship.gate": "pass", "edgeship.gate.required": "onnx-int8"}.items():
        client.set_model_version_tag("digits-old-style", version.version, key, value)

    release = resolve_release(tracking, "digits-old-style", tmp_path / "dl", version=version.version)
    [resolved] = release.artifacts
    assert resolved.sha256 == artifact.sha256 and sha256_of(resolved.path) == artifact.sha256
