"""The pipeline's side of a device agent: ask what a device is, send it an artifact to benchmark.

    >>> with AgentClient("http://pi4.local:8765", token=os.environ["EDGESHIP_AGENT_TOKEN"]) as agent:
    ...     agent.info().cpu_model
    ...     result = agent.benchmark("build/model.onnx", "onnx-fp32", BenchmarkRequest(iterations=200))

With no device at hand, `local_agent()` starts a real agent on 127.0.0.1 for as long as a `with` lasts:

    >>> with local_agent(name="local") as agent:
    ...     agent.client().benchmark("build/model.onnx", "onnx-fp32")

An agent that does not answer raises DeviceUnreachable; one that answers with an error raises
DeviceJobFailed carrying the agent's own explanation.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from edgeship.errors import DeviceJobFailed, DeviceUnreachable
from edgeship.files import sha256_of
from edgeship.records import BenchmarkRequest, BenchmarkResult, DeviceInfo

TOKEN_ENV = "EDGESHIP_AGENT_TOKEN"
_CONNECT_TIMEOUT_S = 10.0
_HINTS = {
    401: "give the client the token the agent was started with (the agent's --token-env variable)",
    413: "the artifact is over the agent's --max-upload-mb",
}


class AgentClient:
    """An HTTP client for one device agent."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 600.0):
        """`timeout_s` bounds each request, a whole benchmark job included; connecting gets at most 10 s."""
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, _CONNECT_TIMEOUT_S))
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def health(self) -> dict:
        """The agent's /health answer: {"status": "ok", "name", "busy", "jobs_started"}."""
        return self._call("GET", "/health").json()

    def info(self) -> DeviceInfo:
        """What the device is: CPU, memory, runtimes and their versions."""
        return DeviceInfo.model_validate(self._call("GET", "/info").json())

    def benchmark(self, path: str | Path, target: str, request: BenchmarkRequest | None = None,
                  runtime: str | None = None) -> BenchmarkResult:
        """Send a compiled artifact to the agent and return what it measured.

        Args:
            path: the artifact file; its sha256 goes along so the agent can check what arrived.
            target: the compile target's name, echoed in the result.
            request: warm-up, iterations and threads (defaults: BenchmarkRequest()).
            runtime: overrides `request.runtime` (e.g. the CompiledArtifact's runtime).

        Raises:
            DeviceUnreachable: the agent did not answer, or the connection broke during the job.
            DeviceJobFailed: the agent refused the job or the runtime failed on the model.
        """
        request = request or BenchmarkRequest()
        if runtime is not None:
            request = request.model_copy(update={"runtime": runtime})
        fields = {"sha256": sha256_of(path), "target": target, "request": request.model_dump_json()}
        with open(path, "rb") as artifact:
            answer = self._call("POST", "/jobs/benchmark", data=fields,
                                files={"artifact": ("artifact", artifact, "application/octet-stream")})
        return BenchmarkResult.model_validate(answer.json())

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _call(self, method: str, endpoint: str, **kwargs) -> httpx.Response:
        try:
            answer = self._http.request(method, endpoint, **kwargs)
        except httpx.TimeoutException as error:
            raise DeviceUnreachable(
                f"device agent at {self.url} did not answer {method} {endpoint} in time ({type(error).__name__}); "
                "check that the device is on and not overloaded, or raise the client's timeout") from None
        except httpx.TransportError as error:
            raise DeviceUnreachable(
                f"cannot reach the device agent at {self.url} ({error or type(error).__name__}); check that "
                "`edgeship-device agent` runs there, the host and port in the device inventory, and the network"
            ) from None
        if answer.is_error:
            hint = _HINTS.get(answer.status_code, "")
            raise DeviceJobFailed(f"device agent at {self.url} answered {method} {endpoint} with "
                                  f"{answer.status_code}: {_detail(answer)}" + (f" ({hint})" if hint else ""))
        return answer


def _detail(answer: httpx.Response) -> str:
    """FastAPI's {"detail": ...} when there is one, else the body's start."""
    try:
        detail = answer.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail else (answer.text[:500] or answer.reason_phrase)


# --- a local agent ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalAgent:
    """A running agent on loopback, started by `local_agent`."""

    url: str
    token: str
    name: str
    process: subprocess.Popen

    def client(self, timeout_s: float = 600.0) -> AgentClient:
        """A client for this agent, holding its token."""
        return AgentClient(self.url, self.token, timeout_s=timeout_s)


@contextlib.contextmanager
def local_agent(name: str = "local", token: str | None = None, port: int | None = None, *,
                max_upload_mb: int = 512, job_timeout_s: float = 600, work_dir: str | Path | None = None,
                startup_timeout_s: float = 30) -> Iterator[LocalAgent]:
    """Start `edgeship-device agent` on 127.0.0.1 in a subprocess; stop it when the `with` ends.

    The token (random unless given) reaches the agent through the EDGESHIP_AGENT_TOKEN variable,
    never the command line, so other users cannot read it from the process list.

    Raises:
        DeviceUnreachable: the agent exited or did not answer /health within `startup_timeout_s`
            (the message carries its stderr).
    """
    token = token or secrets.token_urlsafe(32)
    port = port or _free_port()
    command = [sys.executable, "-m", "edgeship.device.cli", "agent", "--host", "127.0.0.1", "--port", str(port),
               "--name", name, "--token-env", TOKEN_ENV, "--max-upload-mb", str(max_upload_mb),
               "--job-timeout-s", str(job_timeout_s)]
    if work_dir is not None:
        command += ["--work-dir", str(work_dir)]
    env = {**os.environ, TOKEN_ENV: token}
    # A file, not a pipe: nobody reads the agent's log while it runs, and a full pipe would block it.
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            agent = LocalAgent(url=f"http://127.0.0.1:{port}", token=token, name=name, process=process)
            _wait_until_healthy(agent, log, startup_timeout_s)
            yield agent
        finally:
            _stop(process)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_healthy(agent: LocalAgent, log, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if agent.process.poll() is not None:
            raise DeviceUnreachable(f"the local agent exited with status {agent.process.returncode} while "
                                    f"starting:\n{_read_log(log)}")
        try:
            if httpx.get(f"{agent.url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise DeviceUnreachable(f"the local agent at {agent.url} did not answer /health within {timeout_s:g} s:\n"
                            f"{_read_log(log)}")


def _read_log(log) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-4000:].strip() or "(no output)"


def _stop(process: subprocess.Popen) -> None:
    """Ask the agent to stop (uvicorn shuts down on SIGTERM); kill it if it has not within 5 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
