"""DVC: reproduce the `prepare` stage when its inputs changed, and read its hash for lineage.

The prepared splits are a DVC output, so the md5 that `dvc.lock` records for
them identifies exactly the data a model was trained on; the release logs it to
MLflow next to the git commit.

DVC runs as a subprocess (its own interpreter: about 2 s even when nothing changed), so the
release starts it first (`Reproduction`) and does its own set-up meanwhile. And when nothing DVC
looks at changed since its last successful run here (dvc.yaml, dvc.lock, params.yaml, and the size,
modification time and inode of every file of the stage's dependencies and outputs: what DVC's own
state database trusts too), it is not started at all: `.edgeship/cache/dvc-<stage>.json` keeps
that fingerprint.

    >>> preparing = Reproduction(workdir)   # `dvc repro prepare`, in the background
    >>> data_hash = preparing.result()      # waits; DataError when DVC failed
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from edgeship.errors import DataError


def _dvc(workdir: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ)
    # The stage command (`edgeship data prepare`) must run from this same installation.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class Reproduction:
    """`dvc repro <stage>` (a no-op when nothing changed), started now; `result()` waits for it."""

    def __init__(self, workdir: Path, stage: str = "prepare", timeout_s: float = 1800):
        self.workdir, self.stage, self.timeout_s = Path(workdir), stage, timeout_s
        if not (self.workdir / ".dvc").is_dir():
            raise DataError(f"{self.workdir} is not a DVC project; run `dvc init` there (or `dvc init --no-scm` "
                            f"outside git) so data preparation is versioned")
        if not (self.workdir / "dvc.yaml").is_file():
            raise DataError(f"{self.workdir}/dvc.yaml is missing; copy it from the edgeship repository")
        self._record = self.workdir / ".edgeship" / "cache" / f"dvc-{stage}.json"
        unchanged = self._record.is_file() and self._record.read_text() == fingerprint(self.workdir, stage)
        self._process = None if unchanged else _dvc(self.workdir, "repro", stage)

    @property
    def skipped(self) -> bool:
        """Nothing DVC looks at changed since its last run here: it was not started."""
        return self._process is None

    def result(self) -> str | None:
        """The stage's output hash once DVC is done; DataError (with DVC's last lines) when it failed."""
        if self._process is None:
            return output_hash(self.workdir, self.stage)
        try:
            stdout, stderr = self._process.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.communicate()
            raise DataError(f"`dvc repro {self.stage}` ran past {self.timeout_s:g} s; see `dvc repro {self.stage}` "
                            f"in {self.workdir}") from None
        if self._process.returncode != 0:
            self._record.unlink(missing_ok=True)
            message = (stderr or stdout).strip().splitlines()
            raise DataError(f"`dvc repro {self.stage}` failed:\n" + "\n".join(message[-15:]))
        self._record.parent.mkdir(parents=True, exist_ok=True)
        self._record.write_text(fingerprint(self.workdir, self.stage))
        return output_hash(self.workdir, self.stage)

    def cancel(self) -> None:
        """Stop DVC if it is still running (the release failed before it needed the data)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.communicate()


def reproduce(workdir: Path, stage: str = "prepare") -> str | None:
    """Run `dvc repro <stage>` (a no-op when nothing changed) and return the stage's output hash."""
    return Reproduction(workdir, stage).result()


def fingerprint(workdir: Path, stage: str = "prepare") -> str:
    """What DVC decides staleness from, cheaply: dvc.yaml, dvc.lock, the params.yaml sections the stage names, and
    a stat of every file the stage reads or writes (its paths as dvc.lock resolved them). Any change makes DVC run."""
    workdir = Path(workdir)
    entry = _locked_stage(workdir, stage)
    files = {name: hashlib.sha256((workdir / name).read_bytes()).hexdigest() if (workdir / name).is_file() else None
             for name in ("dvc.yaml", "dvc.lock")}
    try:
        params = yaml.safe_load((workdir / "params.yaml").read_text()) or {}
        tracked = {name: params.get(name) for name in entry.get("params", {}).get("params.yaml", {})}
    except (OSError, yaml.YAMLError):
        tracked = None  # DVC will say what is wrong with it
    paths = [item.get("path") for key in ("deps", "outs") for item in entry.get(key, []) if item.get("path")]
    stats = {}
    for path in paths:
        root = workdir / path
        for member in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if member.is_dir():
                continue
            try:
                info = member.stat()
                stats[str(member.relative_to(workdir))] = [info.st_size, info.st_mtime_ns, info.st_ino]
            except OSError:
                stats[str(member.relative_to(workdir))] = None
    return json.dumps({"stage": stage, "files": files, "params": tracked, "paths": paths, "stats": stats},
                      sort_keys=True, default=str)


def _locked_stage(workdir: Path, stage: str) -> dict:
    lock = Path(workdir) / "dvc.lock"
    if not lock.is_file():
        return {}
    return (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(stage, {})


def output_hash(workdir: Path, stage: str = "prepare") -> str | None:
    """The md5 of the stage's first output as recorded in dvc.lock (None when not locked yet)."""
    outs = _locked_stage(workdir, stage).get("outs", [])
    return outs[0].get("md5") if outs else None
