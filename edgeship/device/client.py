"""The pipeline's side of a device agent: ask what a device is, send it an artifact to benchmark.

    >>> with AgentClient("http://pi4.local:8765", token=os.environ["EDGESHIP_AGENT_TOKEN"]) as agent:
    ...     agent.info().cpu_model
    ...     result = agent.benchmark("build/model.onnx", "onnx-fp32", BenchmarkRequest(iterations=200))

A TensorRT target's ONNX is built into an engine on the device first; later jobs name the engine:

    >>> build = agent.build_tensorrt_engine("build/model_int8_static.onnx", "tensorrt-int8",
    ...                                     TensorRTBuildOptions(precision="int8"))
    >>> agent.fetch_engine(build.engine_sha256, Path("build/engines/model.engine"))
    >>> agent.benchmark(None, "tensorrt-int8", BenchmarkRequest(runtime="tensorrt"), engine_sha256=build.engine_sha256)

With no device at hand, `local_agent()` starts a real agent on 127.0.0.1 for as long as a `with` lasts:

    >>> with local_agent(name="local") as agent:
    ...     agent.client().benchmark("build/model.onnx", "onnx-fp32")

An agent that does not answer (or answers something that is not an agent's answer) raises
DeviceUnreachable; one that answers with an error raises DeviceJobFailed carrying the agent's own
explanation. Both carry `transient`: whether sending the same job again may succeed (a connection
that broke, a 5xx, a timeout) or not (a wrong token, a model the runtime refuses); the pipeline
retries only transient failures.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from pydantic import BaseModel, ValidationError

from edgeship.errors import AgentProtocolMismatch, DeviceJobFailed, DeviceUnreachable
from edgeship.files import sha256_of
from edgeship.records import wire
from edgeship.records import (BenchmarkRequest, BenchmarkResult, DeviceInfo, EvaluationRequest, EvaluationResult,
                              TensorRTBuild, TensorRTBuildOptions)

TOKEN_ENV = "EDGESHIP_AGENT_TOKEN"
_CONNECT_TIMEOUT_S = 10.0
_HINTS = {
    401: "give the client the token the agent was started with (the agent's --token-env variable)",
    413: "the artifact is over the agent's --max-upload-mb",
    501: "this device cannot run that job; its /info lists the runtimes it serves",
}
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


class AgentClient:
    """An HTTP client for one device agent."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 600.0,
                 ca_file: str | Path | None = None):
        """`timeout_s` bounds each request, a whole benchmark job included; connecting gets at most 10 s.

        `ca_file`: the CA certificate that signed an https agent's certificate (default: the system's CAs).
        """
        self.url = url.rstrip("/")
        self.ca_file = str(ca_file) if ca_file else None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, _CONNECT_TIMEOUT_S))
        verify = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, verify=verify)

    def health(self) -> dict:
        """The agent's /health answer: {"status": "ok", "name", "busy", "jobs_started"}."""
        return self._call("GET", "/health").json()

    def info(self) -> DeviceInfo:
        """What the device is: CPU, memory, runtimes and their versions, and the wire protocol it speaks.

        Raises:
            DeviceUnreachable: the agent did not answer, or answered something that is not a DeviceInfo.
            AgentProtocolMismatch: the agent speaks a protocol this pipeline cannot use (not transient).
        """
        info = _parse(DeviceInfo, self._call("GET", "/info"), self.url)
        _check_protocol(info, self.url)
        return info

    def benchmark(self, path: str | Path | None, target: str, request: BenchmarkRequest | None = None,
                  runtime: str | None = None, *, engine_sha256: str | None = None) -> BenchmarkResult:
        """Send a compiled artifact to the agent and return what it measured.

        Args:
            path: the artifact file; its sha256 goes along so the agent can check what arrived.
                None with `engine_sha256`.
            target: the compile target's name, echoed in the result.
            request: warm-up, iterations, threads and runtime options (defaults: BenchmarkRequest()).
            runtime: overrides `request.runtime` (e.g. the CompiledArtifact's runtime).
            engine_sha256: measure this TensorRT engine from the agent's engine cache instead of
                uploading a file (`build_tensorrt_engine` answers it); the runtime becomes "tensorrt".

        Raises:
            DeviceUnreachable: the agent did not answer, or the connection broke during the job.
            DeviceJobFailed: the agent refused the job or the runtime failed on the model.
        """
        request = _for_runtime(request or BenchmarkRequest(), runtime, engine_sha256)
        fields = {"target": target, "request": request.model_dump_json()}
        with _model_part(path, engine_sha256, fields) as files:
            answer = self._call("POST", "/jobs/benchmark", data=fields, files=files)
        return _parse(BenchmarkResult, answer, self.url)

    def evaluate(self, path: str | Path | None, target: str, batch: str | Path,
                 request: EvaluationRequest | None = None, runtime: str | None = None, *,
                 engine_sha256: str | None = None) -> EvaluationResult:
        """Send an artifact (or name a cached engine) and a validation batch (.npz of x and y); return the predictions.

        Raises:
            DeviceUnreachable: the agent did not answer, or the connection broke during the job.
            DeviceJobFailed: the agent refused the job, or the runtime failed on the model or the batch.
        """
        request = _for_runtime(request or EvaluationRequest(), runtime, engine_sha256)
        fields = {"batch_sha256": sha256_of(batch), "target": target, "request": request.model_dump_json()}
        with _model_part(path, engine_sha256, fields) as files, open(batch, "rb") as samples:
            answer = self._call("POST", "/jobs/evaluate", data=fields,
                                files={**files, "batch": ("batch.npz", samples, "application/octet-stream")})
        return _parse(EvaluationResult, answer, self.url)

    def build_tensorrt_engine(self, path: str | Path, target: str,
                              options: TensorRTBuildOptions | None = None) -> TensorRTBuild:
        """Have the device build a TensorRT engine from an ONNX file (or find the one it built before).

        The engine stays in the agent's engine cache: pass its `engine_sha256` to `benchmark` and
        `evaluate`, and fetch its bytes with `fetch_engine`.

        Raises:
            DeviceUnreachable: the agent did not answer, or the connection broke during the build.
            DeviceJobFailed: 501 where the device has no TensorRT or NVIDIA GPU; 422 with TensorRT's
                own words where the parser or the builder failed.
        """
        fields = {"sha256": sha256_of(path), "target": target,
                  "options": (options or TensorRTBuildOptions()).model_dump_json()}
        with open(path, "rb") as onnx_file:
            answer = self._call("POST", "/jobs/tensorrt-build", data=fields,
                                files={"artifact": ("model.onnx", onnx_file, "application/octet-stream")})
        return _parse(TensorRTBuild, answer, self.url)

    def fetch_engine(self, engine_sha256: str, destination: str | Path) -> Path:
        """Download an engine the device built to `destination` (checked against its sha256); return the path.

        Raises:
            DeviceUnreachable: the agent did not answer, or the download broke.
            DeviceJobFailed: the agent has no such engine (404), or the bytes do not hash to `engine_sha256`.
        """
        destination = Path(destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        scratch = destination.with_name(f".{destination.name}.part")
        digest = hashlib.sha256()
        endpoint = f"/engines/{engine_sha256}"
        try:
            with self._stream("GET", endpoint) as answer, open(scratch, "wb") as out:
                for chunk in answer.iter_bytes(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except BaseException:  # a broken download leaves nothing behind
            scratch.unlink(missing_ok=True)
            raise
        if digest.hexdigest() != engine_sha256:
            scratch.unlink(missing_ok=True)
            raise _mark(DeviceJobFailed(f"the engine downloaded from {self.url}{endpoint} hashes to "
                                        f"{digest.hexdigest()}, not {engine_sha256}; fetch it again"), transient=True)
        os.replace(scratch, destination)
        return destination

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @contextlib.contextmanager
    def _stream(self, method: str, endpoint: str) -> Iterator[httpx.Response]:
        """A streamed answer (its body not read yet); errors as `_call` raises them."""
        with self._errors(method, endpoint), self._http.stream(method, endpoint) as answer:
            if answer.is_error:
                answer.read()
                self._check(method, endpoint, answer)
            yield answer

    def _call(self, method: str, endpoint: str, **kwargs) -> httpx.Response:
        with self._errors(method, endpoint):
            answer = self._http.request(method, endpoint, **kwargs)
        return self._check(method, endpoint, answer)

    @contextlib.contextmanager
    def _errors(self, method: str, endpoint: str) -> Iterator[None]:
        """httpx's failures to connect or answer, as DeviceUnreachable."""
        try:
            yield
        except httpx.TimeoutException as error:
            raise _mark(DeviceUnreachable(
                f"device agent at {self.url} did not answer {method} {endpoint} in time ({type(error).__name__}); "
                "check that the device is on and not overloaded, or raise the client's timeout"),
                transient=True, timed_out=True) from None
        except httpx.TransportError as error:
            raise _mark(DeviceUnreachable(
                f"cannot reach the device agent at {self.url} ({error or type(error).__name__}); check that "
                "`edgeship-device agent` runs there, the host and port in the device inventory, and the network"),
                transient=True) from None

    def _check(self, method: str, endpoint: str, answer: httpx.Response) -> httpx.Response:
        """The answer, or DeviceJobFailed with the agent's explanation for an error status."""
        if answer.is_error:
            hint = _HINTS.get(answer.status_code, "")
            raise _mark(DeviceJobFailed(f"device agent at {self.url} answered {method} {endpoint} with "
                                        f"{answer.status_code}: {_detail(answer)}" + (f" ({hint})" if hint else "")),
                        transient=answer.status_code in _TRANSIENT_STATUS, status_code=answer.status_code)
        return answer


def _for_runtime(request, runtime: str | None, engine_sha256: str | None):
    """The request with its runtime set: as given, or "tensorrt" for a cached engine."""
    runtime = "tensorrt" if engine_sha256 and runtime is None else runtime
    return request.model_copy(update={"runtime": runtime}) if runtime is not None else request


@contextlib.contextmanager
def _model_part(path: str | Path | None, engine_sha256: str | None, fields: dict) -> Iterator[dict]:
    """The job form's model: the file `artifact` (its sha256 added to `fields`), or the field `engine_sha256`."""
    if (path is None) == (engine_sha256 is None):
        raise ValueError("give the artifact's path or an engine_sha256, not both nor neither")
    if engine_sha256 is not None:
        yield {"engine_sha256": (None, engine_sha256)}  # a part without a filename: a field, still multipart
        return
    fields["sha256"] = sha256_of(path)
    with open(path, "rb") as artifact:
        yield {"artifact": ("artifact", artifact, "application/octet-stream")}


def _mark(error: Exception, transient: bool, timed_out: bool = False, status_code: int | None = None):
    """Tag an error with what the pipeline needs to decide on a retry."""
    error.transient, error.timed_out, error.status_code = transient, timed_out, status_code
    return error


def _parse(record: type[BaseModel], answer: httpx.Response, url: str):
    """The answer as `record`; an answer that is not one is a device misbehaving, not a result."""
    try:
        return record.model_validate_json(answer.content)
    except ValidationError as error:
        raise _mark(DeviceUnreachable(
            f"the service at {url} answered {answer.request.method} {answer.request.url.path} with something "
            f"that is not a {record.__name__} ({error.error_count()} problem(s), starting "
            f"{answer.content[:80]!r}); is an edgeship agent of a matching version listening there?"),
            transient=True) from None


def _check_protocol(info: DeviceInfo, url: str) -> None:
    """AgentProtocolMismatch unless the agent's protocol is one this pipeline speaks."""
    who = f"agent '{info.name}' at {url} (edgeship {info.agent_version})"
    if info.protocol < wire.MIN_AGENT_PROTOCOL:
        raise _mark(AgentProtocolMismatch(
            f"{who} speaks protocol {info.protocol}, this pipeline needs {wire.MIN_AGENT_PROTOCOL}: upgrade the "
            f"agent (pip install -U 'edgeship[device]' on the device, then restart `edgeship-device agent`)"),
            transient=False)
    if info.protocol > wire.PROTOCOL:
        raise _mark(AgentProtocolMismatch(
            f"{who} speaks protocol {info.protocol}, this pipeline speaks up to {wire.PROTOCOL}: upgrade the "
            f"pipeline (pip install -U edgeship here), or run an agent of this pipeline's release"), transient=False)


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
    """A running agent on loopback, started by `local_agent` or `local_agents`."""

    url: str
    token: str
    name: str
    process: subprocess.Popen
    ca_file: str | None = None  # for an https agent: the certificate clients should trust

    def client(self, timeout_s: float = 600.0) -> AgentClient:
        """A client for this agent, holding its token."""
        return AgentClient(self.url, self.token, timeout_s=timeout_s, ca_file=self.ca_file)


@contextlib.contextmanager
def local_agent(name: str = "local", token: str | None = None, port: int | None = None, *,
                max_upload_mb: int = 512, job_timeout_s: float = 600, work_dir: str | Path | None = None,
                startup_timeout_s: float = 30, emulated: bool = False, cpus: list[int] | None = None,
                threads: int | None = None, tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                sysfs_root: str | Path | None = None, upload_timeout_s: float | None = None) -> Iterator[LocalAgent]:
    """Start `edgeship-device agent` on 127.0.0.1 in a subprocess; stop it when the `with` ends.

    The token (random unless given) reaches the agent through the EDGESHIP_AGENT_TOKEN variable,
    never the command line, so other users cannot read it from the process list. `emulated`,
    `cpus` and `threads` make it a host-emulated device profile; `tls_cert`/`tls_key` serve HTTPS
    (the certificate must name 127.0.0.1; clients trust it as their CA).

    Raises:
        DeviceUnreachable: the agent exited or did not answer /health within `startup_timeout_s`
            (the message carries its stderr).
    """
    options = dict(locals())  # exactly this function's keyword arguments
    with local_agents([options]) as agents:
        yield agents[0]


@contextlib.contextmanager
def local_agents(specs: list[dict]) -> Iterator[list[LocalAgent]]:
    """Start several loopback agents at once (each spec: `local_agent`'s keyword arguments); stop them all after."""
    with contextlib.ExitStack() as stack:
        started = []
        for spec in specs:
            log = stack.enter_context(tempfile.TemporaryFile())
            agent = _spawn(log=log, **spec)
            stack.callback(_stop, agent.process)
            started.append((agent, log, spec.get("startup_timeout_s", 30)))
        for agent, log, timeout_s in started:
            _wait_until_healthy(agent, log, timeout_s)
        yield [agent for agent, _, _ in started]


def _spawn(name: str = "local", token: str | None = None, port: int | None = None, *, log,
           max_upload_mb: int = 512, job_timeout_s: float = 600, work_dir: str | Path | None = None,
           startup_timeout_s: float = 30, emulated: bool = False, cpus: list[int] | None = None,
           threads: int | None = None, tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
           sysfs_root: str | Path | None = None, upload_timeout_s: float | None = None) -> LocalAgent:
    token = token or secrets.token_urlsafe(32)
    port = port or _free_port()
    command = [sys.executable, "-m", "edgeship.device.cli", "agent", "--host", "127.0.0.1", "--port", str(port),
               "--name", name, "--token-env", TOKEN_ENV, "--max-upload-mb", str(max_upload_mb),
               "--job-timeout-s", str(job_timeout_s)]
    if work_dir is not None:
        command += ["--work-dir", str(work_dir)]
    if emulated:
        command += ["--emulated"]
    if cpus:
        command += ["--cpus", ",".join(map(str, cpus))]
    if threads:
        command += ["--threads", str(threads)]
    if tls_cert is not None:
        command += ["--tls-cert", str(tls_cert), "--tls-key", str(tls_key)]
    if sysfs_root is not None:
        command += ["--sysfs-root", str(sysfs_root)]
    if upload_timeout_s is not None:
        command += ["--upload-timeout-s", str(upload_timeout_s)]
    env = {**os.environ, TOKEN_ENV: token}
    # A file, not a pipe: nobody reads the agent's log while it runs, and a full pipe would block it.
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    scheme = "https" if tls_cert is not None else "http"
    return LocalAgent(url=f"{scheme}://127.0.0.1:{port}", token=token, name=name, process=process,
                      ca_file=str(tls_cert) if tls_cert is not None else None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_healthy(agent: LocalAgent, log, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    verify = ssl.create_default_context(cafile=agent.ca_file) if agent.ca_file else True
    # One client for every poll: each new one loads the CA bundle (~0.1 s of CPU the starting agent needs).
    with httpx.Client(timeout=1.0, verify=verify) as client:
        while time.monotonic() < deadline:
            if agent.process.poll() is not None:
                raise DeviceUnreachable(f"the local agent exited with status {agent.process.returncode} while "
                                        f"starting:\n{_read_log(log)}")
            try:
                if client.get(f"{agent.url}/health").status_code == 200:
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
