"""DVC: reproduce the `prepare` stage when its inputs changed, and read its hash for lineage.

The prepared splits are a DVC output, so the md5 that `dvc.lock` records for
them identifies exactly the data a model was trained on; the release logs it to
MLflow next to the git commit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from edgeship.errors import DataError


def _dvc(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # The stage command (`edgeship data prepare`) must run from this same installation.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=1800)


def reproduce(workdir: Path, stage: str = "prepare") -> str | None:
    """Run `dvc repro <stage>` (a no-op when nothing changed) and return the stage's output hash."""
    workdir = Path(workdir)
    if not (workdir / ".dvc").is_dir():
        raise DataError(f"{workdir} is not a DVC project; run `dvc init` there (or `dvc init --no-scm` "
                        f"outside git) so data preparation is versioned")
    if not (workdir / "dvc.yaml").is_file():
        raise DataError(f"{workdir}/dvc.yaml is missing; copy it from the edgeship repository")
    result = _dvc(workdir, "repro", stage)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise DataError(f"`dvc repro {stage}` failed:\n" + "\n".join(message[-15:]))
    return output_hash(workdir, stage)


def output_hash(workdir: Path, stage: str = "prepare") -> str | None:
    """The md5 of the stage's first output as recorded in dvc.lock (None when not locked yet)."""
    lock = Path(workdir) / "dvc.lock"
    if not lock.is_file():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    outs = stages.get(stage, {}).get("outs", [])
    return outs[0].get("md5") if outs else None
