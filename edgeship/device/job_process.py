"""One device job in a process of its own: the child's entry point, and how a parent starts, reads and kills it.

The child (`python -m edgeship.device.job_process`, or a child forked by
`edgeship.device.fork_server`) reads one job as JSON, runs it (`run_job`: measure,
evaluate, or a TensorRT build) and writes {"result": ...} or {"error": ...}. A model that
crashes the runtime, a runtime error, or a job past its timeout ends only the child; the
parent turns its exit into the answer or a DeviceJobFailed with the runtime's own words
(`read_answer`). No torch, TensorFlow, MLflow or Prefect here: this runs on the device.

    >>> spawn_job({"kind": "benchmark", "path": "/abs/model.onnx", "runtime": "onnxruntime",
    ...            "request": BenchmarkRequest().model_dump()}, timeout_s=60, what="benchmark")["result"]
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from edgeship.device.evaluate import evaluate
from edgeship.device.measure import measure
from edgeship.errors import DeviceJobFailed, EdgeshipError
from edgeship.records import BenchmarkRequest, EvaluationRequest, TensorRTBuildOptions

TIMEOUT_HINT = "ask for fewer iterations or a shorter duration, or raise the agent's --job-timeout-s"
_STDERR_TAIL = 2000  # characters of a crashed child's stderr kept in the error message
_RUNNING: set[subprocess.Popen] = set()  # job processes alive now, so a stopping agent can end them
_RUNNING_LOCK = threading.Lock()


def spawn_job(job: dict, timeout_s: float, what: str, hint: str = TIMEOUT_HINT) -> dict:
    """Run one job in a freshly started `python -m edgeship.device.job_process`; its answer.

    Raises:
        DeviceJobFailed: the job failed (the runtime's words), the child crashed, or it ran past `timeout_s`.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "edgeship.device.job_process"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=child_env(), start_new_session=True,  # own process group: a timeout kills all of it
    )
    with _RUNNING_LOCK:
        _RUNNING.add(process)
    try:
        stdout, stderr = process.communicate(json.dumps(job).encode(), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(process)
        process.communicate()
        raise DeviceJobFailed(f"{what} ran past its {timeout_s:g} s timeout and was stopped; {hint}") from None
    finally:
        if process.poll() is None:  # interrupted while waiting: leave nothing running
            kill_group(process)
            process.wait()
        with _RUNNING_LOCK:
            _RUNNING.discard(process)
    return read_answer(process.returncode, stdout, stderr)


def stop_spawned_jobs() -> int:
    """Kill every spawned job process still running; return how many."""
    with _RUNNING_LOCK:
        running = [p for p in _RUNNING if p.poll() is None]
    for process in running:
        kill_group(process)
    return len(running)


def child_env() -> dict[str, str]:
    """This environment, with edgeship importable in the child even when run from a source checkout."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def read_answer(returncode: int, stdout: bytes, stderr: bytes) -> dict:
    """Turn the child's exit status and JSON answer into its answer or a DeviceJobFailed."""
    try:
        answer = json.loads(stdout.decode() or "null")
    except ValueError:
        answer = None
    if isinstance(answer, dict):
        if returncode == 0 and isinstance(answer.get("result"), dict):
            return answer
        if answer.get("error"):
            raise DeviceJobFailed(str(answer["error"]))
    tail = stderr.decode(errors="replace")[-_STDERR_TAIL:].strip()
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        raise DeviceJobFailed(
            f"the job's process was killed by {name}: the runtime (or builder) crashed on this model "
            f"(or ran out of memory); check the model with the runtime on a host first. stderr: {tail or '(empty)'}"
        )
    raise DeviceJobFailed(f"the job's process exited with status {returncode} without a result. "
                          f"stderr: {tail or '(empty)'}")


def _main() -> int:
    """Child side: read one job as JSON on stdin, write {"result": ...} or {"error": ...} on stdout."""
    answer_stream = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    # Whatever else writes to stdout (runtime logs, a model's custom op) goes to stderr,
    # so it cannot corrupt the answer.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        job = json.load(sys.stdin)
    except ValueError as error:
        answer, status = {"error": f"the job is not JSON: {error}"}, 1
    else:
        answer, status = run_job(job)
    with answer_stream:
        json.dump(answer, answer_stream)
    return status


def run_job(job: dict) -> tuple[dict, int]:
    """Run one job (under its memory limit, when it names one); return ({"result": ...} or {"error": ...}, exit
    status)."""
    runtime = "the runtime"
    memory_mb = job.get("memory_mb")
    runtimes = (job.get("runtime"), (job.get("request") or {}).get("runtime"))
    if job.get("kind") == "tensorrt-build" or "tensorrt" in runtimes:
        memory_mb = None  # CUDA reserves far more address space than it uses: RLIMIT_AS would stop it starting
    try:
        limit_memory(memory_mb)
        if job.get("kind") == "evaluate":
            request = EvaluationRequest.model_validate(job["request"])
            runtime = request.runtime
            answer = {"result": evaluate(job["path"], job["batch"], request, int(job["max_batch_bytes"]))}
        elif job.get("kind") == "tensorrt-build":
            from edgeship.device.tensorrt_build import build_engine

            runtime = "the TensorRT builder"
            options = TensorRTBuildOptions.model_validate(job["options"])
            answer = {"result": build_engine(job["path"], job["engine"], options.precision,
                                             workspace_mb=options.workspace_mb,
                                             optimization_level=options.optimization_level,
                                             sparse_weights=options.sparse_weights,
                                             use_timing_cache=options.timing_cache)}
        else:
            runtime = job["runtime"]
            measured = measure(job["path"], runtime, BenchmarkRequest.model_validate(job["request"]))
            answer = {"result": measured.fields, "window": [measured.timed_start, measured.timed_end]}
        return answer, 0
    except Exception as error:  # EdgeshipError says it all; else a runtime's own exception type
        text = str(error) if isinstance(error, EdgeshipError) else \
            f"{runtime} failed on this model: {type(error).__name__}: {error}"
        if memory_mb and (isinstance(error, MemoryError) or "alloc" in str(error).lower()):
            text += (f" (the job's memory limit is {memory_mb} MB: the agent's --job-memory-mb; a model that needs "
                     f"more does not fit this device)")
        return {"error": text}, 1


def limit_memory(memory_mb: int | None) -> None:
    """Cap this process's address space (RLIMIT_AS) at `memory_mb`; nothing where the OS has no such limit."""
    if not memory_mb:
        return
    try:
        import resource
    except ImportError:  # not POSIX
        return
    limit = int(memory_mb) << 20
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard < 0 else min(limit, hard),) * 2)


if __name__ == "__main__":
    sys.exit(_main())
