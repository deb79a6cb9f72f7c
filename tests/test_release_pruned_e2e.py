"""The combined path in the release: distillation -> pruning -> sensitivity -> plan -> QAT, each stage from the
previous one's model, the lineage on the model version, the pruning search's plot and table in MLflow, and
the int8 target's gate compared with its fp32 sibling. Tiny epochs (1-2), ONNX targets only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgeship.records import ReleaseSummary
from test_release_e2e import make_project, mlflow_client

pytestmark = pytest.mark.e2e


def test_distill_prune_plan_qat_release_records_its_lineage(tmp_path):
    project = make_project(
        tmp_path / "project", targets=["onnx-fp32", "onnx-int8"],
        train={"epochs": 2}, model={"kwargs": {"width_mult": 0.35, "stages": 3, "stem_stride": 1}},
        distillation={"enabled": True, "teacher": {"factory": "edgeship.models.zoo:small_resnet",
                                                   "kwargs": {"widths": [8, 16]}}, "teacher_epochs": 1},
        pruning={"enabled": True, "search_ratios": [0.25], "fine_tune_epochs": 1, "max_drop_points": 100.0,
                 "latency_runs": 10},
        ptq={"enabled": False}, benchmark={"warmup": 2, "warmup_until_stable": False, "iterations": 30})
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["gate"] = {t: g for t, g in params["gate"].items() if t in params["targets"]}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    result = subprocess.run([str(Path(sys.executable).parent / "edgeship"), "run", "--summary", "release.json"],
                            cwd=project, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode in (0, 3), result.stderr[-4000:]
    summary = ReleaseSummary.model_validate_json((project / "release.json").read_text())

    client, _ = mlflow_client(project)
    version = client.get_model_version(summary.model_name, summary.model_version)
    assert version.tags["edgeship.lineage"] == "distill -> prune -> plan -> qat"
    assert version.tags["edgeship.lineage.distill"] == "from edgeship.models.zoo:small_resnet"
    assert "ratio 0.25" in version.tags["edgeship.lineage.prune"]
    assert version.tags["edgeship.lineage.prune.from"].startswith("models:/")
    run = client.get_run(summary.run_id)
    assert float(run.data.metrics["pruning/chosen_ratio"]) == 0.25
    logged = {a.path for a in client.list_artifacts(summary.run_id, "pruning")}
    assert {"pruning/pruning.png", "pruning/report.json", "pruning/candidates.json"} <= logged

    int8 = next(t for t in summary.targets if t.target == "onnx-int8")
    checks = {c.name: c for c in int8.gate.checks}
    assert checks["size_vs_float"].unit == "x onnx-fp32" and checks["size_vs_float"].measured > 0
    assert "p50_vs_float" in checks  # both were measured on the loopback device
    fp32 = next(t for t in summary.targets if t.target == "onnx-fp32")
    assert fp32.host_check.accuracy == pytest.approx(summary.fp32_test_accuracy, abs=0.01)  # the pruned model
