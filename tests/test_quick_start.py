"""The README's quick start on a fresh `git clone`, as far as it can run without reinstalling the venv.

`.ci/run` runs the quick start verbatim in a fresh clone (its install step included) and then this
suite; here, in seconds, the part that broke unnoticed once: a git clone, `edgeship data digits`, and
the release's data stage (`dvc repro prepare`, which DVC refuses while dvc.lock is git-ignored) leave
the clone clean, with the prepared data's hash exactly the one dvc.lock commits as lineage.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from doc_blocks import doc_block, link_venv, run_shell

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / ".ci"))
import check_quick_start  # noqa: E402
import readme_command  # noqa: E402


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def clone(tmp_path) -> Path:
    if subprocess.run(["git", "rev-parse", "--git-dir"], cwd=REPO, capture_output=True).returncode != 0:
        pytest.skip(f"{REPO} is not a git checkout: the quick start is about a git clone")
    subprocess.run(["git", "clone", "-q", str(REPO), str(tmp_path / "clone")], check=True)
    return tmp_path / "clone"


def _quick_start() -> list[str]:
    """The README's quick start, one command per step: install, data, release."""
    install, data, release = doc_block("README.md", "quick-start").split(" && ")
    assert install == "bash infra/install.sh" and release.endswith("edgeship run --summary release.json")
    return [install, data, release]


def test_ci_runs_the_readme_commands():
    """What .ci/run reads (by heading, standard library only) is the block the tests read (by name)."""
    readme = (REPO / "README.md").read_text()
    assert readme_command.command(readme, "Quick start") == " && ".join(_quick_start())
    assert readme_command.command(readme, "Tests") == doc_block("README.md", "tests") == ".venv/bin/python -m pytest"


def test_fresh_clone_data_stage_matches_the_committed_lineage_and_leaves_git_clean(clone):
    from edgeship.tasks.data_version import reproduce

    assert "dvc.lock" in _git("ls-files", cwd=clone).split()
    link_venv(clone)  # what the quick start's install step made: .venv, here this checkout's
    run_shell(_quick_start()[1], cwd=clone, env=dict(os.environ))  # `.venv/bin/edgeship data digits`, as typed
    (clone / ".venv").unlink()
    data_hash = reproduce(clone)  # what `edgeship run` does first
    committed = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]["prepare"]
    assert data_hash == committed["outs"][0]["md5"]
    assert (clone / "data" / "prepared" / "train.npz").is_file()
    status = _git("status", "--porcelain", "--untracked-files=all", cwd=clone)
    assert status == "", status
    assert reproduce(clone) == data_hash  # nothing changed: DVC does not run the stage again


def test_the_ci_check_names_what_a_user_would_not_expect_in_git_status():
    passing = {"passed": True, "model_version": "1", "aliases": ["candidate"],
               "targets": [{"target": "onnx-fp32", "artifact": {"sha256": "0"}, "benchmarks": [{"status": "ok"}],
                            "gate": {"checks": [{"passed": True}]}}]}
    assert check_quick_start.problems(passing, " M dvc.lock\n") == []
    # The quick start's int8 slower than its float sibling: an advisory check that failed, in a passing release.
    advisory = {"name": "p50_vs_float", "measured": 1.32, "limit": 1.0, "passed": False, "advisory": True}
    passing["targets"][0]["gate"]["checks"].append(advisory)
    assert check_quick_start.problems(passing, "") == []
    advisory["advisory"] = False  # the same failure where params.yaml makes it fail the gate
    assert check_quick_start.problems(passing, "") == ["onnx-fp32: its gate failed"]
    advisory["advisory"] = True
    found = check_quick_start.problems({**passing, "passed": False}, "?? onnxruntime_profile.json\n M params.yaml\n")
    assert len(found) == 3 and "'?? onnxruntime_profile.json'" in found[1] and "' M params.yaml'" in found[2]
