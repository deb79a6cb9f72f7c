"""The device agent: an HTTP service on an edge device that says what it is and benchmarks models.

A pipeline talks to it through `edgeship.device.client.AgentClient`:
1. `GET /health` (no token): is it up, is it busy, how many jobs it has started.
2. `GET /info`: a DeviceInfo record (CPU, memory, runtimes and their versions).
3. `POST /jobs/benchmark`: a multipart form with the file `artifact` and the fields `sha256`,
   `target` and `request` (a BenchmarkRequest as JSON). The agent streams the upload into a private
   directory (size-capped, hashed on the way), checks the hash, then measures the model in a child
   process (`edgeship.device.benchmark`), one job at a time, and answers a BenchmarkResult.

Every endpoint but /health wants `Authorization: Bearer <token>` when the agent has a token.
Start it with the CLI (`edgeship-device agent --name pi4`), or in-process:

    >>> import uvicorn
    >>> uvicorn.run(create_app(AgentSettings(name="pi4", token="...")), host="127.0.0.1", port=8765)
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import importlib.metadata
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import psutil
from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from edgeship.device.benchmark import run_benchmark_job
from edgeship.device.runtimes import available_runtimes
from edgeship.errors import DeviceJobFailed
from edgeship.records import BenchmarkRequest, BenchmarkResult, DeviceInfo

_FIELD_LIMIT = 64 * 1024  # bytes of one non-file form field (sha256, target, request JSON)
_FORM_SLACK = 1 << 20  # bytes of form framing and fields allowed on top of the artifact


class AgentSettings(BaseModel):
    """How one agent runs: its name, its token, and its limits."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    token: str | None = None  # None: no authentication (the CLI allows that on loopback only)
    max_upload_mb: int = Field(default=512, ge=1)
    job_timeout_s: float = Field(default=600, gt=0)
    work_dir: Path | None = None  # where per-job directories go; None: the system temporary directory
    emulated: bool = False  # this agent stands in for the device (QEMU, a container, the host)


def create_app(settings: AgentSettings) -> FastAPI:
    """Build the agent's FastAPI app for `settings`."""
    app = FastAPI(title=f"edgeship device agent ({settings.name})", version=_agent_version())
    if settings.work_dir is not None:
        settings.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    jobs = _JobQueue()
    authorized = Depends(_bearer_check(settings.token))

    @app.get("/health")
    async def health() -> dict:
        """Liveness, without a token: the pipeline polls it before sending work."""
        return {"status": "ok", "name": settings.name, "busy": jobs.lock.locked(), "jobs_started": jobs.started}

    @app.get("/info", dependencies=[authorized], response_model=DeviceInfo)
    async def info() -> DeviceInfo:
        """What this device is: CPU, memory, runtimes."""
        return describe_device(settings)

    @app.post("/jobs/benchmark", dependencies=[authorized], response_model=BenchmarkResult)
    async def benchmark(request: Request) -> BenchmarkResult:
        """Receive an artifact, check its sha256, and measure it with the runtime the request names."""
        job_dir = Path(tempfile.mkdtemp(prefix="edgeship-job-", dir=settings.work_dir))  # mode 0700
        try:
            upload = await _receive_upload(request, job_dir, settings.max_upload_mb)
            job = _check_upload(upload)
            async with jobs.lock:
                jobs.started += 1
                try:
                    measured = await asyncio.to_thread(
                        run_benchmark_job, upload.path, job.runtime, job, settings.job_timeout_s)
                except DeviceJobFailed as error:
                    raise HTTPException(422, detail=str(error)) from None
            return BenchmarkResult(target=upload.fields["target"], device=settings.name, sha256=upload.sha256,
                                   emulated=settings.emulated, **measured)
        finally:
            shutil.rmtree(job_dir, ignore_errors=True)

    return app


@dataclass
class _JobQueue:
    """One job at a time: requests wait on the lock while the server keeps answering others."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    started: int = 0


def _bearer_check(token: str | None):
    """A FastAPI dependency that lets a request through only with `Authorization: Bearer <token>`."""
    expected = token.encode() if token else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise HTTPException(
                401, headers={"WWW-Authenticate": 'Bearer realm="edgeship-agent"'},
                detail="missing or wrong bearer token: send 'Authorization: Bearer <token>' with the token "
                       "the agent was started with (its --token-env variable)")

    return check


# --- the upload -------------------------------------------------------------------------------------


@dataclass
class _Upload:
    path: Path
    sha256: str
    bytes: int
    fields: dict[str, str]


class _UploadTooLarge(Exception):
    pass


class _BadForm(Exception):
    pass


async def _receive_upload(request: Request, job_dir: Path, max_upload_mb: int) -> _Upload:
    """Stream a multipart form into `job_dir`: the `artifact` part to a file (hashed as it arrives), the rest to memory."""
    limit = max_upload_mb << 20
    too_large = HTTPException(413, detail=f"the artifact is larger than this agent accepts ({max_upload_mb} MB); "
                                          "restart the agent with a larger --max-upload-mb")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + _FORM_SLACK:
        raise too_large

    content_type, options = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise HTTPException(415, detail="send the job as multipart/form-data with the file 'artifact' "
                                        "and the fields 'sha256', 'target' and 'request'")
    path = job_dir / "artifact"  # never a client-supplied name
    received = 0
    with open(path, "wb") as artifact:
        form = _FormReader(options[b"boundary"], artifact, limit)
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit + _FORM_SLACK:  # Content-Length can be absent (chunked) or wrong
                    raise _UploadTooLarge
                form.feed(chunk)
            form.finish()
        except _UploadTooLarge:
            raise too_large from None
        except _BadForm as error:
            raise HTTPException(422, detail=f"the job form is malformed: {error}") from None
    return _Upload(path=path, sha256=form.digest.hexdigest(), bytes=form.artifact_bytes, fields=form.fields)


class _FormReader:
    """Feeds a multipart/form-data body through python-multipart's streaming parser."""

    def __init__(self, boundary: bytes, artifact: BinaryIO, limit: int):
        self.fields: dict[str, str] = {}
        self.digest = hashlib.sha256()
        self.artifact_bytes = 0
        self._artifact, self._limit = artifact, limit
        self._seen_artifact = False
        self._header_name, self._header_value = bytearray(), bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._part: str | None = None
        self._value = bytearray()
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        })

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except MultipartParseError as error:
            raise _BadForm(str(error)) from None

    def finish(self) -> None:
        try:
            self._parser.finalize()
        except MultipartParseError as error:
            raise _BadForm(str(error)) from None
        if not self._seen_artifact:
            raise _BadForm("it has no file part named 'artifact'")

    def _part_begin(self) -> None:
        self._headers, self._part, self._value = {}, None, bytearray()

    def _header_end(self) -> None:
        self._headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        name = options.get(b"name", b"").decode(errors="replace")
        if not name:
            raise _BadForm("a part has no name in its Content-Disposition header")
        if name in self.fields or (name == "artifact" and self._seen_artifact):
            raise _BadForm(f"the field '{name}' is sent twice")
        self._part = name
        self._seen_artifact |= name == "artifact"

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part == "artifact":
            self.artifact_bytes += end - start
            if self.artifact_bytes > self._limit:
                raise _UploadTooLarge
            self._artifact.write(data[start:end])
            self.digest.update(data[start:end])
        else:
            self._value.extend(data[start:end])
            if len(self._value) > _FIELD_LIMIT:
                raise _BadForm(f"the field '{self._part}' is longer than {_FIELD_LIMIT} bytes")

    def _part_end(self) -> None:
        if self._part and self._part != "artifact":
            self.fields[self._part] = self._value.decode(errors="replace")


def _check_upload(upload: _Upload) -> BenchmarkRequest:
    """Validate the form's fields against the upload; nothing runs unless all of it holds."""
    missing = [name for name in ("sha256", "target", "request") if name not in upload.fields]
    if missing:
        raise HTTPException(422, detail=f"the job form lacks the field(s) {missing}")
    try:
        job = BenchmarkRequest.model_validate_json(upload.fields["request"])
    except ValidationError as error:
        raise HTTPException(422, detail=f"the field 'request' is not a valid BenchmarkRequest: {error}") from None
    installed = available_runtimes()
    if job.runtime not in installed:
        raise HTTPException(400, detail=f"runtime '{job.runtime}' is not available on this device; "
                                        f"it has {sorted(installed) or 'none'}: pick a device that serves this target")
    expected = upload.fields["sha256"].strip().lower()
    if expected != upload.sha256:
        raise HTTPException(400, detail=f"sha256 mismatch: expected {expected} (the 'sha256' field), got "
                                        f"{upload.sha256} from the {upload.bytes} bytes received; "
                                        "the upload was cut or the wrong file was sent; send it again")
    return job


# --- /info ------------------------------------------------------------------------------------------


def describe_device(settings: AgentSettings) -> DeviceInfo:
    """What this machine is, as `GET /info` reports it."""
    return DeviceInfo(
        name=settings.name,
        hostname=socket.gethostname(),
        os=platform.system(),
        platform=platform.platform(),
        machine=platform.machine(),
        cpu_model=_cpu_model(),
        cpu_count=os.cpu_count() or 1,
        memory_total_mb=round(psutil.virtual_memory().total / (1 << 20), 1),
        runtimes=available_runtimes(),
        python_version=platform.python_version(),
        agent_version=_agent_version(),
        max_upload_mb=settings.max_upload_mb,
        emulated=settings.emulated,
    )


def _cpu_model() -> str:
    """The CPU's marketing name where the OS tells it (x86 'model name', a Raspberry Pi's 'Model')."""
    if sys.platform.startswith("linux"):
        found: dict[str, str] = {}
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                for line in cpuinfo:
                    key, _, value = line.partition(":")
                    found.setdefault(key.strip(), value.strip())
        except OSError:
            pass
        for key in ("model name", "Model", "Hardware", "cpu model"):
            if found.get(key):
                return found[key]
    elif sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def _agent_version() -> str:
    try:
        return importlib.metadata.version("edgeship")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
