"""Re-runs redo only what changed (Prefect task caching under the project, keyed on each stage's inputs).

A tiny project released five times in one process: cold; again with nothing changed (every stage
reused, a new version registered that can still be published); with only a gate limit changed
(re-gated and re-registered, nothing retrained); with `train:` changed (retrained, and everything
downstream with it); and with fresh=True (everything again).
"""

from __future__ import annotations

import pytest
import yaml
from test_release_e2e import make_project

pytestmark = pytest.mark.e2e
CACHED_STAGES = {"train", "qat", "compile_onnx-fp32", "compile_onnx-int8", "bench_onnx-fp32_local",
                 "bench_onnx-int8_local"}


def cached_stages(project, summary) -> set[str]:
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    tags = MlflowClient(tracking_uri=uri, registry_uri=uri).get_run(summary.run_id).data.tags
    return {key.removeprefix("edgeship.cached.") for key, value in tags.items()
            if key.startswith("edgeship.cached.") and value == "true"}


def set_params(project, section: str, values: dict) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section] = {**params[section], **values}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_reruns_redo_only_what_changed(tmp_path):
    from edgeship.flows.publish import publish
    from edgeship.flows.release import release

    lenient = {"max_accuracy_drop": 100.0, "p99_latency_ms": 1000}
    project = make_project(tmp_path / "project", targets=["onnx-fp32", "onnx-int8"], train={"epochs": 1},
                           sensitivity={"enabled": False}, ptq={"enabled": False},
                           benchmark={"warmup": 2, "iterations": 10, "warmup_until_stable": False})
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["gate"] = {"onnx-fp32": lenient, "onnx-int8": lenient}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    cold = release(workdir=str(project))
    assert cold.passed and cached_stages(project, cold) == set()

    warm = release(workdir=str(project))
    assert cached_stages(project, warm) == CACHED_STAGES
    assert warm.passed and warm.model_version == "2"
    assert [t.artifact.sha256 for t in warm.targets] == [t.artifact.sha256 for t in cold.targets]
    assert [t.benchmarks[0].latency_ms for t in warm.targets] == [t.benchmarks[0].latency_ms for t in cold.targets]
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(warm.model_name, "production", "2")
    assert publish(alias="production", workdir=str(project)).targets["onnx-int8"].base.version == "2"

    params["gate"]["onnx-fp32"] = {"p99_latency_ms": 0.000001}  # only a gate limit changes
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    regated = release(workdir=str(project))
    assert cached_stages(project, regated) == CACHED_STAGES
    assert not regated.passed and regated.model_version == "3"

    set_params(project, "train", {"lr": 0.04})  # the model changes: everything downstream runs again
    retrained = release(workdir=str(project))
    assert cached_stages(project, retrained) == set()
    assert retrained.model_version == "4"

    fresh = release(workdir=str(project), fresh=True)
    assert cached_stages(project, fresh) == set()
    assert (project / ".edgeship" / "cache" / "keys").is_dir()
