"""The per-target fan-out on the flow's thread pool vs a Dask LocalCluster (prefect-dask), side by side in one run.

A fresh quick-start project (digits, the repository's params.yaml: four targets) released from scratch
(`fresh=True`) once per task runner, alternating, in one process. Per release: the whole flow's wall time,
the compile fan-out's wall time (first compile row started to last finished, from the progress each stage
reports; on Dask the LocalCluster's start is inside it, as a run pays it) and the benchmark fan-out's.

    .venv/bin/python benchmarks/fan_out.py [--repeats 1] [--quick]

Prints a table and writes benchmarks/results/fan_out.json (runs with the machine's load average, medians, targets). Target: Dask's compile
fan-out at least 10% faster than the thread pool's on this machine, the bar for making it the default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from release_cache import REPO, StageTimes, make_project, warm_up_prefect  # noqa: E402

KINDS = ("threads", "dask")
DEFAULT_BAR = 0.9  # dask / threads compile fan-out wall time at most this to be worth the default


def span(stages: dict[str, tuple[float, float]], prefix: str) -> float | None:
    rows = [times for name, times in stages.items() if name.startswith(prefix)]
    return round(max(end for _, end in rows) - min(start for start, _ in rows), 2) if rows else None


class StageSpans(StageTimes):
    """StageTimes that also keeps when each stage started and finished (for a fan-out's span)."""

    def __init__(self):
        super().__init__()
        self.spans: dict[str, tuple[float, float]] = {}

    def finish(self, stage: str, note: str = "") -> None:
        super().finish(stage, note)
        now = time.perf_counter()
        self.spans[stage] = (self.started.get(stage, now), now)


def timed_release(project: Path, kind: str) -> dict:
    from edgeship.flows.release import release
    from edgeship.progress import reporting

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["task_runner"] = {"kind": kind}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = StageSpans()
    load = os.getloadavg()[0]  # other work on the machine: a shared machine's numbers move with it
    start = time.perf_counter()
    with reporting(stages):
        summary = release(workdir=str(project), fresh=True)
    return {"kind": kind, "release_s": round(time.perf_counter() - start, 2), "compile_s": span(stages.spans, "compile "),
            "benchmark_s": span(stages.spans, "bench "), "passed": summary.passed,
            "load_1m_before": round(load, 2), "load_1m_after": round(os.getloadavg()[0], 2),
            "compiled": {t.target: t.artifact.sha256 if t.artifact else t.error for t in summary.targets}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="releases per task runner, alternating")
    parser.add_argument("--quick", action="store_true", help="tiny epochs (the fan-out itself is unchanged)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fan_out.json")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

    runs = []
    with tempfile.TemporaryDirectory(prefix="edgeship-fan-out-bench-") as tmp:
        project = make_project(Path(tmp) / "project", args.quick)
        warm_up_prefect()  # Prefect's ephemeral API starts outside the timings
        for _ in range(args.repeats):
            for kind in KINDS:
                runs.append(timed_release(project, kind))
                print(json.dumps(runs[-1]), flush=True)

    medians = {kind: {key: statistics.median(r[key] for r in runs if r["kind"] == kind)
                      for key in ("release_s", "compile_s", "benchmark_s")} for kind in KINDS}
    print(f"\n{'task runner':<12} {'compile fan-out s':>18} {'benchmark fan-out s':>20} {'release s':>10}")
    for kind in KINDS:
        m = medians[kind]
        print(f"{kind:<12} {m['compile_s']:>18.2f} {m['benchmark_s']:>20.2f} {m['release_s']:>10.2f}")
    ratio = medians["dask"]["compile_s"] / medians["threads"]["compile_s"]
    same = all(r["compiled"] == runs[0]["compiled"] for r in runs)
    result = {
        "config": ("quick (tiny epochs)" if args.quick else "params.yaml") + f", {os.cpu_count()} CPUs",
        "repeats": args.repeats, "runs": runs, "medians": medians,
        "targets": {
            "dask_compile_over_threads": {"limit": DEFAULT_BAR, "measured": round(ratio, 3), "met": ratio <= DEFAULT_BAR,
                                          "note": "met: Dask would be worth making the default here"},
            "same_artifacts": {"measured": same, "met": same,
                               "note": "every run compiled byte-identical artifacts (sha256), whichever runner"}},
    }
    for name, entry in result["targets"].items():
        print(f"target {name}: {entry['measured']} (limit {entry.get('limit', '-')}): "
              f"{'met' if entry['met'] else 'NOT met'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
