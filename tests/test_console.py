"""An error in `edgeship run` reaches the terminal once, with its fix; its details go to the log file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_release_e2e import make_project

pytestmark = pytest.mark.e2e


def test_a_factory_error_is_printed_once_with_its_fix(tmp_path):
    project = make_project(tmp_path / "project", targets=["onnx-fp32"], sensitivity={"enabled": False},
                           ptq={"enabled": False})
    (project / "my_models.py").write_text("def build(num_classes):\n    return {'not': 'a module'}\n")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"] = {"factory": "my_models:build", "kwargs": {}}  # the project's own module
    params["gate"] = {"onnx-fp32": {"max_accuracy_drop": 100.0}}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    result = subprocess.run([str(Path(sys.executable).parent / "edgeship"), "run"], cwd=project, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 2, result.stderr[-3000:]
    shown = " ".join((result.stdout + result.stderr).split())  # rich wraps long lines
    assert shown.count("returned dict, not a torch.nn.Module") == 1, shown
    assert "return the model itself" in shown and "Traceback" not in shown
    logs = list((project / ".edgeship" / "logs").glob("release-*.log"))
    assert len(logs) == 1 and "ModelLoadError" in logs[0].read_text()
    assert str(logs[0]) in "".join(shown.split())  # the terminal says where the details are
