"""What a re-run costs: cold release, warm re-run with nothing changed, re-run after changing only a gate limit.

A fresh project (digits, the repository's params.yaml, or --quick for tiny epochs) released three
times in one process, timing the release flow's wall time and each stage (from the progress each
stage reports); then one warm `edgeship run` as a user types it, process start included.

    .venv/bin/python benchmarks/release_cache.py [--quick]

Prints a table and writes benchmarks/results/release_cache.json (cold_s, warm_s, gate_only_s, warm_cli_s,
stages, targets). Target: the warm re-run takes at most 15% of the cold run's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WARM_LIMIT = 0.15


class StageTimes:
    """A progress sink that records each stage's wall time (a stage reused from the cache only finishes)."""

    def __init__(self):
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def start(self, stage: str, total: int | None = None) -> None:
        with self._lock:
            self.started.setdefault(stage, time.perf_counter())

    def advance(self, stage: str, steps: int = 1, note: str = "") -> None:
        self.start(stage)

    def finish(self, stage: str, note: str = "") -> None:
        with self._lock:
            now = time.perf_counter()
            self.seconds[stage] = round(now - self.started.get(stage, now), 3)


def make_project(directory: Path, quick: bool) -> Path:
    from edgeship.tasks.data import export_digits

    directory.mkdir(parents=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if quick:
        params["train"]["epochs"] = 2
        params["qat"].update(epochs=1, freeze_bn_after_epoch=0, freeze_observers_after_epoch=1)
        params["sensitivity"].update(converse=False, latency=False, max_samples=100)
        params["precision"].update(compare_strategies=False, frontier_steps=0)
        params["benchmark"].update(warmup=5, iterations=50, warmup_until_stable=False)
    (directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / "dvc.yaml", directory / "dvc.yaml")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=directory, check=True)
    export_digits(directory / "data" / "raw")
    return directory


def timed_release(project: Path) -> tuple[float, dict[str, float], bool]:
    from edgeship.flows.release import release
    from edgeship.progress import reporting

    stages = StageTimes()
    start = time.perf_counter()
    with reporting(stages):
        summary = release(workdir=str(project))
    return round(time.perf_counter() - start, 2), stages.seconds, summary.passed


def warm_up_prefect() -> None:
    from prefect import flow

    @flow(name="warm-up")
    def nothing() -> None:
        pass

    nothing()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny epochs and benchmark runs (minutes, not tens)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "release_cache.json")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

    with tempfile.TemporaryDirectory(prefix="edgeship-cache-bench-") as tmp:
        project = make_project(Path(tmp) / "project", args.quick)
        warm_up_prefect()  # Prefect's ephemeral API starts outside the timings
        cold_s, cold, _ = timed_release(project)
        warm_s, warm, _ = timed_release(project)
        params = yaml.safe_load((project / "params.yaml").read_text())
        target = params["targets"][0]
        params["gate"][target]["max_size_mb"] = params["gate"][target].get("max_size_mb", 10) * 2
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        gate_only_s, gate_only, _ = timed_release(project)
        start = time.perf_counter()
        cli = subprocess.run([str(Path(sys.executable).parent / "edgeship"), "run"], cwd=project,
                             capture_output=True, text=True, timeout=1800)
        warm_cli_s = round(time.perf_counter() - start, 2)

    names = list(dict.fromkeys([*cold, *warm, *gate_only]))
    print(f"{'stage':<28} {'cold s':>8} {'warm s':>8} {'gate-only s':>12}")
    for name in names:
        print(f"{name:<28} {cold.get(name, 0):>8.2f} {warm.get(name, 0):>8.2f} {gate_only.get(name, 0):>12.2f}")
    print(f"{'release flow (wall)':<28} {cold_s:>8.2f} {warm_s:>8.2f} {gate_only_s:>12.2f}")
    print(f"warm `edgeship run` (process start included): {warm_cli_s:.2f} s, exit {cli.returncode}")
    ratio = warm_s / cold_s
    result = {
        "config": "quick (tiny epochs)" if args.quick else "params.yaml", "cold_s": cold_s, "warm_s": warm_s,
        "gate_only_s": gate_only_s, "warm_cli_s": warm_cli_s, "warm_cli_exit": cli.returncode,
        "stages": {name: {"cold_s": cold.get(name), "warm_s": warm.get(name), "gate_only_s": gate_only.get(name)}
                   for name in names},
        "targets": {
            "warm_over_cold": {"limit": WARM_LIMIT, "measured": round(ratio, 4), "met": ratio <= WARM_LIMIT},
            # what a user waits for: `edgeship run` again, its process start (imports, Prefect's API) included
            "warm_cli_over_cold": {"limit": WARM_LIMIT, "measured": round(warm_cli_s / cold_s, 4),
                                   "met": warm_cli_s / cold_s <= WARM_LIMIT}},
    }
    for name, entry in result["targets"].items():
        print(f"target {name}: {entry['measured']:.3f} (limit {WARM_LIMIT}): {'met' if entry['met'] else 'NOT met'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
