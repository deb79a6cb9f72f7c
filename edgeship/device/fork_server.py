"""A warm helper process that forks one fresh child per device job (Linux), instead of starting Python each time.

Started by the agent (`start_fork_server`); `edgeship.device.jobs` hands it each job while it
runs, and falls back to a spawned process when it is busy or gone. The helper itself runs as
`python -m edgeship.device.fork_server --fork-server` (the flag names it in `ps`). No torch, TensorFlow, MLflow or Prefect here.

    >>> start_fork_server()
    True
    >>> running_server().run(job, timeout_s=60, what="benchmark of model.onnx")
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from edgeship.device.job_process import TIMEOUT_HINT, child_env, read_answer, run_job
from edgeship.errors import DeviceJobFailed


class ForkServerUnavailable(Exception):
    """The fork server is busy with another caller's job, or gone: run the job in a spawned process."""


class ForkServer:
    """A warm helper process that has imported numpy and the runtimes and forks one fresh child per job.

    Starting Python and importing numpy and a runtime takes about 0.5 s on an x86 host and seconds on a
    Raspberry Pi; a forked child starts in milliseconds, each time from the same pristine state (the
    helper never loads a model, so no runtime thread pool exists when it forks). Each child runs in a
    session of its own, like a spawned one, so a timeout kills it and anything it started.
    One job at a time: a second caller gets a fresh process instead. Linux only.
    """

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._messages: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._current: int | None = None
        self._ready = False

    def start(self) -> None:
        """Start the helper (and have it import what children need)."""
        self._messages = queue.Queue()
        self._ready = False  # until the helper says it has imported what children need
        self._process = subprocess.Popen([sys.executable, "-m", "edgeship.device.fork_server", "--fork-server"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         env=child_env(), text=True, bufsize=1)
        threading.Thread(target=self._read, args=(self._process, self._messages), daemon=True,
                         name="edgeship-fork-server").start()

    def stop(self) -> None:
        """End the helper: closing its stdin ends its loop."""
        process, self._process = self._process, None
        if process is None:
            return
        self.kill_current()
        with contextlib.suppress(OSError):
            process.stdin.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill_current(self) -> int:
        """Kill the job being run now, if any; return how many were killed."""
        pid = self._current
        if pid is None:
            return 0
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        return 1

    def run(self, job: dict, timeout_s: float, what: str, hint: str = TIMEOUT_HINT) -> dict:
        """Run one job in a forked child; what `edgeship.device.job_process.spawn_job` returns or raises.

        Raises:
            DeviceJobFailed: as for a spawned child.
            ForkServerUnavailable: busy, or the helper is gone (it is restarted for the next job).
        """
        if not self._lock.acquire(blocking=False):
            raise ForkServerUnavailable
        try:
            if self._process is None or self._process.poll() is not None:
                self.start()
            scratch = Path(tempfile.mkdtemp(prefix="edgeship-fork-"))  # mode 0700
            try:
                return self._run(job, timeout_s, what, scratch, hint)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        finally:
            self._current = None
            self._lock.release()

    def _run(self, job: dict, timeout_s: float, what: str, scratch: Path, hint: str) -> dict:
        answer, stderr = scratch / "answer.json", scratch / "stderr.txt"
        try:
            self._process.stdin.write(json.dumps({"job": job, "answer": str(answer), "stderr": str(stderr)}) + "\n")
            self._process.stdin.flush()
        except OSError:
            self._abandon()
            raise ForkServerUnavailable from None
        try:  # a helper still importing (a slow or emulated CPU: 10 s and more) is waited for, within the job's time
            ready = self._ready or self._next(lambda m: m.get("ready"), timeout_s)
            self._ready = bool(ready)
            started = ready and self._next(lambda m: "returncode" not in m, 10.0)
        except queue.Empty:
            started = None
        if not started:
            self._abandon()
            raise ForkServerUnavailable
        pid = self._current = started["pid"]
        is_exit = lambda m: m.get("pid") == pid and "returncode" in m  # noqa: E731
        try:
            finished = self._next(is_exit, timeout_s)
        except queue.Empty:
            self.kill_current()
            with contextlib.suppress(queue.Empty):
                self._next(is_exit, 10.0)
            raise DeviceJobFailed(f"{what} ran past its {timeout_s:g} s timeout and was stopped; {hint}") from None
        if not finished:  # the helper died under the job
            self.kill_current()
            self._abandon()
            raise DeviceJobFailed(f"{what} lost its fork server mid-job; send the job again")
        return read_answer(finished["returncode"], answer.read_bytes() if answer.exists() else b"",
                            stderr.read_bytes() if stderr.exists() else b"")

    def _next(self, wanted, timeout_s: float) -> dict | None:
        """The next message `wanted` accepts (stale ones from a timed-out job are skipped); None: the helper died."""
        deadline = time.monotonic() + timeout_s
        while True:
            message = self._messages.get(timeout=max(0.0, deadline - time.monotonic()))
            if message is None or wanted(message):
                return message

    def _abandon(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    @staticmethod
    def _read(process: subprocess.Popen, messages: queue.Queue) -> None:
        for line in process.stdout:
            with contextlib.suppress(ValueError):
                messages.put(json.loads(line))
        messages.put(None)


_fork_server: ForkServer | None = None


def running_server() -> ForkServer | None:
    """The fork server this process started, if any."""
    return _fork_server


def start_fork_server() -> bool:
    """Run later jobs of this process in children forked from a warm helper (Linux); False where it cannot."""
    global _fork_server
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return False  # macOS: forking after importing system frameworks is unsafe
    if _fork_server is None:
        server = ForkServer()
        server.start()
        _fork_server = server
    return True


def stop_fork_server() -> None:
    """Stop the helper; later jobs spawn fresh processes."""
    global _fork_server
    server, _fork_server = _fork_server, None
    if server is not None:
        server.stop()


def _serve_forks() -> int:
    """Helper side: import what a job needs, then fork one child per job line on stdin until EOF."""
    for name in ("onnxruntime", "psutil"):  # what every job imports; never create a session here
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    reply = sys.stdout
    reply.write(json.dumps({"ready": True}) + "\n")
    reply.flush()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.setsid()  # a session of its own: a timeout kills it with all it started
                with open(request["stderr"], "wb") as log, open(os.devnull, "rb") as nothing:
                    os.dup2(nothing.fileno(), 0)
                    os.dup2(log.fileno(), 1)  # never the protocol pipe
                    os.dup2(log.fileno(), 2)
                answer, status = run_job(request["job"])
                with open(request["answer"], "w") as out:
                    json.dump(answer, out)
            finally:
                os._exit(status)
        reply.write(json.dumps({"pid": pid}) + "\n")
        reply.flush()
        _, raw = os.waitpid(pid, 0)
        code = -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)
        reply.write(json.dumps({"pid": pid, "returncode": code}) + "\n")
        reply.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_serve_forks())
