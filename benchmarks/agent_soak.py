"""Soak the device agent: many jobs, sequential then from concurrent clients, with hostile jobs mixed in.

One loopback agent, a tiny model and few iterations per job (the point is the agent, not the model):
1. `--sequential` jobs from one client, then `--concurrent` jobs from `--clients` clients at once
   (the agent queues them: one runs at a time).
2. Every `--hostile-every`th job sends a corrupt model, a wrong sha256 or a malformed form; those must
   be refused with 4xx while the agent stays up. Any other error is a failure.
3. The agent's resident memory (its own process; job processes are gone after each job) is read
   after the warm-up jobs and every 50 jobs after; it must grow by less than 5%. So is its fork-server
   helper's. Open file descriptors, leftover job processes and job directories are checked too.

    .venv/bin/python benchmarks/agent_soak.py                          # 500 + 500 jobs, 8 clients
    .venv/bin/python benchmarks/agent_soak.py --sequential 1000 --concurrent 1000

Prints the figures and writes benchmarks/results/agent_soak.json; exits 1 when a criterion fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import psutil
from onnx import TensorProto, helper, numpy_helper

from edgeship.device.client import AgentClient, local_agent
from edgeship.errors import DeviceJobFailed, DeviceUnreachable
from edgeship.records import BenchmarkRequest

RESULTS = Path(__file__).resolve().parent / "results"
WARMUP_JOBS = 50
RSS_GROWTH_LIMIT = 0.05


def write_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w", "b"], ["y"], transB=1)],
        "soak", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        initializer=[numpy_helper.from_array(rng.standard_normal((10, 64)).astype(np.float32), "w"),
                     numpy_helper.from_array(np.zeros(10, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


class Soak:
    """Sends the jobs and keeps the score."""

    def __init__(self, agent, model: Path, corrupt: Path, request: BenchmarkRequest, hostile_every: int):
        self.agent, self.model, self.corrupt, self.request = agent, model, corrupt, request
        self.hostile_every = hostile_every
        self.counter = itertools.count(1)
        self.lock = threading.Lock()
        self.ok = self.refused = 0
        self.failures: list[str] = []
        self.latencies: list[float] = []
        self.rss: list[tuple[int, float, float | None, int]] = []  # (jobs done, agent MiB, helper MiB, agent fds)
        self.process = psutil.Process(agent.process.pid)

    def job(self, client: AgentClient) -> None:
        number = next(self.counter)
        kind = (number // self.hostile_every) % 3 if self.hostile_every and number % self.hostile_every == 0 else None
        started = time.monotonic()
        try:
            if kind is None:
                result = client.benchmark(self.model, "soak", self.request)
                assert result.status == "ok" and result.iterations == self.request.iterations
                outcome = "ok"
            else:
                outcome = self._hostile(client, kind)
        except (DeviceJobFailed, DeviceUnreachable, AssertionError) as error:
            outcome = f"job {number}: {type(error).__name__}: {error}"
        with self.lock:
            if outcome == "ok":
                self.ok += 1
                self.latencies.append(time.monotonic() - started)
            elif outcome == "refused":
                self.refused += 1
            else:
                self.failures.append(outcome)
            done = self.ok + self.refused + len(self.failures)
            if done == WARMUP_JOBS or (done > WARMUP_JOBS and done % 50 == 0):
                helper = self.helper()
                self.rss.append((done, self.process.memory_info().rss / (1 << 20),
                                 helper.memory_info().rss / (1 << 20) if helper else None, self.process.num_fds()))

    def helper(self) -> psutil.Process | None:
        """The agent's fork-server helper (a direct child that stays between jobs), if it runs one."""
        return next((p for p in self.process.children() if "--fork-server" in p.cmdline()), None)

    def _hostile(self, client: AgentClient, kind: int) -> str:
        """A corrupt model (422), a wrong sha256 (400) or a form without its artifact (422): refused, not fatal."""
        if kind == 0:
            try:
                client.benchmark(self.corrupt, "soak", self.request)
            except DeviceJobFailed as error:
                return "refused" if error.status_code == 422 else f"corrupt model: {error}"
            return "corrupt model: accepted"
        auth = {"Authorization": f"Bearer {self.agent.token}"}
        data = {"sha256": "0" * 64 if kind == 1 else "", "target": "soak", "request": self.request.model_dump_json()}
        files = {"artifact": ("a", self.model.read_bytes())} if kind == 1 else {"other": ("a", b"x")}
        answer = httpx.post(f"{self.agent.url}/jobs/benchmark", headers=auth, data=data, files=files, timeout=120)
        expected = 400 if kind == 1 else 422
        return "refused" if answer.status_code == expected else f"hostile form {kind}: {answer.status_code}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequential", type=int, default=500, help="jobs from one client")
    parser.add_argument("--concurrent", type=int, default=500, help="jobs from --clients clients at once")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=20, help="timed runs per job")
    parser.add_argument("--hostile-every", type=int, default=25, help="every Nth job is hostile (0: none)")
    args = parser.parse_args(argv)

    request = BenchmarkRequest(warmup=2, iterations=args.iterations, sensor_interval_s=0.5)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        work_dir = Path(scratch) / "jobs"
        model = write_model(Path(scratch) / "model.onnx")
        corrupt = Path(scratch) / "corrupt.onnx"
        corrupt.write_bytes(b"\x08\x07 not a model " * 64)
        with local_agent(name="soak", job_timeout_s=120, work_dir=work_dir) as agent:
            soak = Soak(agent, model, corrupt, request, args.hostile_every)
            fds_before = soak.process.num_fds()
            with agent.client(timeout_s=600) as client:
                for _ in range(args.sequential):
                    soak.job(client)
            sequential_s = time.monotonic() - started

            def client_loop(jobs: int) -> None:
                with agent.client(timeout_s=600) as own:
                    for _ in range(jobs):
                        soak.job(own)

            shares = [args.concurrent // args.clients + (i < args.concurrent % args.clients)
                      for i in range(args.clients)]
            with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(client_loop, shares))
            health = httpx.get(f"{agent.url}/health").json()
            fds_after, threads = soak.process.num_fds(), soak.process.num_threads()
            helper = soak.helper()
            children = [p for p in soak.process.children(recursive=True) if helper is None or p.pid != helper.pid]
            leftovers = sorted(p.name for p in work_dir.iterdir())
        elapsed = time.monotonic() - started

    total = args.sequential + args.concurrent
    warm_rss = soak.rss[0][1] if soak.rss else float("nan")
    final_rss = soak.rss[-1][1] if soak.rss else float("nan")
    growth = final_rss / warm_rss - 1
    helper_rss = [r[2] for r in soak.rss if r[2] is not None]
    helper_growth = helper_rss[-1] / helper_rss[0] - 1 if helper_rss else None
    fds_warm = soak.rss[0][3] if soak.rss else fds_before
    latencies = np.array(soak.latencies)
    checks = {
        "every job answered as expected": not soak.failures and soak.ok + soak.refused == total,
        "agent RSS after warm-up grew < 5%": growth < RSS_GROWTH_LIMIT,
        "fork-server helper RSS grew < 5%": helper_growth is None or helper_growth < RSS_GROWTH_LIMIT,
        "no job directory left behind": not leftovers,
        "no job process left running": not children,
        "no file descriptors leaked": fds_after <= fds_warm + 1,
    }
    figures = {
        "jobs": total, "sequential": args.sequential, "concurrent": args.concurrent, "clients": args.clients,
        "ok": soak.ok, "hostile_refused": soak.refused, "failures": soak.failures[:20],
        "failure_count": len(soak.failures), "agent_jobs_started": health["jobs_started"],
        "agent_jobs_failed": health["jobs_failed"], "elapsed_s": elapsed, "sequential_s": sequential_s,
        "jobs_per_s": total / elapsed,
        "client_job_s": {"p50": float(np.percentile(latencies, 50)), "p99": float(np.percentile(latencies, 99)),
                         "max": float(latencies.max())} if len(latencies) else None,
        "agent_rss_mb": {"after_warmup": warm_rss, "final": final_rss, "max": max(r[1] for r in soak.rss),
                         "growth": growth},
        "helper_rss_mb": {"after_warmup": helper_rss[0], "final": helper_rss[-1], "growth": helper_growth}
        if helper_rss else None,
        "series": [{"jobs": r[0], "agent_rss_mb": r[1], "helper_rss_mb": r[2], "agent_fds": r[3]} for r in soak.rss],
        "agent_fds": {"at_start": fds_before, "after_warmup": fds_warm, "final": fds_after}, "agent_threads": threads,
        "checks": checks, "machine": platform.platform(), "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(), "iterations_per_job": args.iterations,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }

    print(f"jobs: {total} ({args.sequential} sequential, {args.concurrent} from {args.clients} concurrent clients; "
          f"every {args.hostile_every}th hostile)")
    print(f"  ok {soak.ok}, hostile refused {soak.refused}, failures {len(soak.failures)}; agent counted "
          f"{health['jobs_started']} started, {health['jobs_failed']} failed")
    print(f"  wall {elapsed:.0f} s ({total / elapsed:.2f} jobs/s); client-side job time p50 "
          f"{figures['client_job_s']['p50']:.3f} s, p99 {figures['client_job_s']['p99']:.3f} s")
    print(f"  agent RSS after {WARMUP_JOBS} jobs {warm_rss:.1f} MiB, final {final_rss:.1f} MiB "
          f"(growth {growth * 100:+.2f}%), max {figures['agent_rss_mb']['max']:.1f} MiB")
    if helper_rss:
        print(f"  fork-server helper RSS after warm-up {helper_rss[0]:.1f} MiB, final {helper_rss[-1]:.1f} MiB "
              f"(growth {helper_growth * 100:+.2f}%)")
    print(f"  agent fds {fds_before} at start, {fds_warm} after warm-up, {fds_after} at the end; threads {threads}; "
          f"leftover job dirs {len(leftovers)}, leftover job processes {len(children)}")
    for name, passed in checks.items():
        print(f"  [{'pass' if passed else 'FAIL'}] {name}")
    for failure in soak.failures[:5]:
        print(f"  failure: {failure}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "agent_soak.json"
    out.write_text(json.dumps(figures, indent=2))
    print(f"wrote {out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
