"""After the README's quick start in a fresh clone: did the release pass, and is the clone as a user expects?

    python3 .ci/check_quick_start.py release.json

Checks the summary `edgeship run --summary` wrote (a version registered and aliased `candidate`, every
target compiled, measured and gated), and that `git status` shows nothing a user would not commit or
ignore: everything the quick start writes is git-ignored, except dvc.lock, which DVC updates when the
data differs from the committed lineage and which the user then commits.
Standard library only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

COMMITTABLE = {"dvc.lock"}  # modified by `dvc repro` when the data is not the committed reference data


def problems(summary: dict, status: str) -> list[str]:
    found = []
    if not summary.get("passed"):
        found.append("the release did not pass its gates")
    if not summary.get("model_version"):
        found.append("no model version was registered")
    if "candidate" not in summary.get("aliases", []):
        found.append(f"the version is not aliased candidate: {summary.get('aliases')}")
    if not summary.get("targets"):
        found.append("the summary lists no targets")
    for target in summary.get("targets", []):
        name = target.get("target")
        if not target.get("artifact"):
            found.append(f"{name}: not compiled ({target.get('error')})")
        if not any(bench.get("status") == "ok" for bench in target.get("benchmarks") or []):
            found.append(f"{name}: no benchmark measured it")
        checks = (target.get("gate") or {}).get("checks") or []
        # An advisory check (int8 vs its float sibling) may fail (passed: false, advisory: true) in a passing gate.
        if not checks or not all(check.get("passed") or check.get("advisory") for check in checks):
            found.append(f"{name}: its gate failed")
    for line in status.splitlines():
        path = line[3:].strip()
        if not (line.startswith(" M ") and path in COMMITTABLE):
            found.append(f"git status after the quick start shows '{line}': git-ignore it or stop writing it")
    return found


if __name__ == "__main__":
    summary = json.loads(Path(sys.argv[1]).read_text())
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], check=True,
                            capture_output=True, text=True).stdout
    print(status or "git status: clean")
    found = problems(summary, status)
    for problem in found:
        print(f"quick start: {problem}", file=sys.stderr)
    sys.exit(1 if found else 0)
