"""The device agent: an HTTP service on an edge device that says what it is and benchmarks models.

A pipeline talks to it through `edgeship.device.client.AgentClient`:
1. `GET /health` (no token): is it up, is it busy, how many jobs wait, started, failed.
2. `GET /info`: a DeviceInfo record (CPU, memory, runtimes and their versions, sensors).
3. `POST /jobs/benchmark`: a multipart form with the file `artifact` and the fields `sha256`,
   `target` and `request` (a BenchmarkRequest as JSON). The agent streams the upload into a private
   directory (size-capped, hashed on the way), checks the hash and the request's `runtime_options`
   (400 for one the runtime's adapter does not take), then measures the model in a child process
   (`edgeship.device.jobs`) while it samples the device's sensors, and answers a BenchmarkResult.
4. `POST /jobs/evaluate`: the same form plus the file `batch` (an .npz of x and y) and the field
   `batch_sha256`, with `request` an EvaluationRequest; answers an EvaluationResult (the predictions).
5. `POST /jobs/tensorrt-build`: the file `artifact` (an ONNX file) and the fields `sha256`, `target`
   and `options` (TensorRTBuildOptions as JSON). The builder runs in a child process; the engine goes
   to this device's engine cache and the answer is its TensorRTBuild record. 501 with the reason where
   TensorRT or an NVIDIA GPU is missing (its /info lists no `tensorrt` then).
   A benchmark or evaluate job then sends the field `engine_sha256` in place of the file `artifact`
   (with `request.runtime` "tensorrt"), and `GET /engines/{engine_sha256}` returns the engine's bytes.
6. `GET /metrics`: Prometheus text (requests, their latency, the job queue; edgeship.device.metrics).

Jobs queue: one runs at a time, and the next upload is not even read while one is measured, so
nothing a second client does disturbs the timing; past `max_queued_jobs` waiting, a job is answered 503.
Each job's process runs under a memory limit (`job_memory_mb`, RLIMIT_AS; by default three quarters of the
device's memory): a model that allocates more fails its job (422), not the device. Every endpoint but /health wants
`Authorization: Bearer <token>` when the agent has a token. Start it with the CLI
(`edgeship-device agent --name pi4`, `--tls-cert/--tls-key` for HTTPS), or in-process:

    >>> import uvicorn
    >>> uvicorn.run(create_app(AgentSettings(name="pi4", token="...")), host="127.0.0.1", port=8765)
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.metadata
import os
import platform
import re
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
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeship.device.fork_server import start_fork_server, stop_fork_server
from edgeship.device.metrics import install_agent_metrics
from edgeship.device.service import supervise
from edgeship.device.jobs import run_benchmark_job, run_evaluation_job, run_tensorrt_build_job, stop_running_jobs
from edgeship.device.runtimes import RuntimeOptionError, available_runtimes, check_runtime_options, unavailable_reason
from edgeship.device.sensors import Sensor, discover_sensors
from edgeship.device.tensorrt_build import EngineCache, cache_root, engine_key, gpu_name
from edgeship.device.upload import Upload, check_fields, check_hashes, check_headers, receive_upload
from edgeship.errors import DeviceJobFailed
from edgeship.files import sha256_of
from edgeship.records import (PROTOCOL, BenchmarkRequest, BenchmarkResult, DeviceInfo, EvaluationRequest,
                              EvaluationResult, TensorRTBuild, TensorRTBuildOptions)

_BUILD_LOG_TAIL = 60  # builder log lines a build record carries
_SHA256 = re.compile(r"[0-9a-f]{64}")
_EVICTED = "an engine used least recently is removed once the cache passes the agent's engine_cache_mb"


class AgentSettings(BaseModel):
    """How one agent runs: its name, its token, and its limits."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    token: str | None = None  # None: no authentication (the CLI allows that on loopback only)
    max_upload_mb: int = Field(default=512, ge=1)
    job_timeout_s: float = Field(default=600, gt=0)
    work_dir: Path | None = None  # where per-job directories go; None: the system temporary directory
    emulated: bool = False  # this agent stands in for the device (QEMU, a container, the host)
    cpus: list[int] | None = None  # emulated profile: every job runs on these CPUs, whatever it asks
    threads: int | None = Field(default=None, ge=1)  # emulated profile: every job uses this many threads
    upload_timeout_s: float = Field(default=300, gt=0)  # a job's upload must arrive within this (it holds the queue)
    sensors: bool = True  # sample temperature, clock, throttling and power during jobs
    sysfs_root: Path = Path("/")  # where the sensors read /sys from (a fake tree in tests)
    power_meter_command: list[str] | None = None  # an external meter: a command printing watts
    tls: bool = False  # served over HTTPS (reported in /info; uvicorn holds the certificate)
    fork_server: bool = True  # start jobs by forking a warm helper (Linux), not by starting Python each time
    engine_cache_dir: Path | None = None  # built TensorRT engines; None: $EDGESHIP_TRT_CACHE_DIR/engines
    engine_cache_mb: int = Field(default=4096, ge=1)  # past this, the engines used least recently are removed
    job_memory_mb: int | None = Field(default=None, ge=64)  # address space per job (RLIMIT_AS); None: the device's
    max_queued_jobs: int = Field(default=8, ge=0)  # jobs waiting for their turn; more are answered 503

    def job_memory_limit_mb(self) -> int:
        """The memory a job may use: the setting, else three quarters of this device's memory (at least 1 GB)."""
        if self.job_memory_mb is not None:
            return self.job_memory_mb
        return max(1024, int(psutil.virtual_memory().total * 0.75) >> 20)


def create_app(settings: AgentSettings, sensors: list[Sensor] | None = None) -> FastAPI:
    """Build the agent's FastAPI app for `settings`; `sensors` default to those found on this device."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        if settings.fork_server:
            start_fork_server()
        try:
            yield
        finally:
            stop_running_jobs()  # a job must not outlive its agent (uvicorn cancels requests still in flight)
            stop_fork_server()

    app = FastAPI(title=f"edgeship device agent ({settings.name})", version=_agent_version(), lifespan=lifespan)
    if settings.work_dir is not None:
        settings.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if sensors is None:
        sensors = discover_sensors(settings.sysfs_root, meter_command=settings.power_meter_command) \
            if settings.sensors else []
    jobs = _JobQueue()
    authorized = Depends(_bearer_check(settings.token))
    engines = EngineCache(settings.engine_cache_dir or cache_root() / "engines", settings.engine_cache_mb << 20)
    install_agent_metrics(app, jobs, [authorized])  # GET /metrics (token): requests, latency, the job queue
    supervise(app)  # READY=1 and watchdog pings under systemd

    @app.get("/health")
    async def health() -> dict:
        """Liveness, without a token: the pipeline polls it before sending work."""
        return {"status": "ok", "name": settings.name, "busy": jobs.lock.locked(), "queued": jobs.waiting,
                "jobs_started": jobs.started, "jobs_failed": jobs.failed}

    @app.get("/info", dependencies=[authorized], response_model=DeviceInfo)
    async def info() -> DeviceInfo:
        """What this device is: CPU, memory, runtimes, sensors."""
        return describe_device(settings, sensors)

    @app.post("/jobs/benchmark", dependencies=[authorized], response_model=BenchmarkResult)
    async def benchmark(request: Request) -> BenchmarkResult:
        """Receive an artifact, check its sha256, and measure it with the runtime the request names."""
        async with jobs.take(request, settings) as turn:
            upload = await receive_upload(request, turn.directory, settings.max_upload_mb, files=("artifact",))
            job = _apply_profile(_check_upload(upload, BenchmarkRequest), settings)
            model = await _model_file(upload, job.runtime, engines)
            measured = await turn.run(run_benchmark_job, model.path, job.runtime, job,
                                      settings.job_timeout_s, sensors)
            return BenchmarkResult(target=upload.fields["target"], device=settings.name, sha256=model.sha256,
                                   engine_sha256=model.engine_sha256, emulated=settings.emulated, **measured)

    @app.post("/jobs/evaluate", dependencies=[authorized], response_model=EvaluationResult)
    async def evaluate(request: Request) -> EvaluationResult:
        """Receive an artifact and a validation batch (.npz of x, y); answer the model's predictions on it."""
        async with jobs.take(request, settings) as turn:
            upload = await receive_upload(request, turn.directory, settings.max_upload_mb, files=("artifact", "batch"))
            job = _apply_profile(_check_upload(upload, EvaluationRequest), settings)
            model = await _model_file(upload, job.runtime, engines)
            max_batch_bytes = 4 * (settings.max_upload_mb << 20)
            answer = await turn.run(run_evaluation_job, model.path, upload.paths["batch"], job,
                                    settings.job_timeout_s, max_batch_bytes)
            return EvaluationResult(target=upload.fields["target"], device=settings.name, sha256=model.sha256,
                                    batch_sha256=upload.sha256["batch"], emulated=settings.emulated, **answer)

    @app.post("/jobs/tensorrt-build", dependencies=[authorized], response_model=TensorRTBuild)
    async def tensorrt_build(request: Request) -> TensorRTBuild:
        """Receive an ONNX file, check its sha256, and build a TensorRT engine from it (or find the one built before).

        The form is checked first, so a bad one gets its 4xx on any device; then a device without
        TensorRT or an NVIDIA GPU answers 501 with the reason.
        """
        async with jobs.take(request, settings) as turn:
            upload = await receive_upload(request, turn.directory, settings.max_upload_mb, files=("artifact",), optional=())
            options = _check_build_form(upload)
            reason = unavailable_reason("tensorrt")
            if reason is not None:
                raise HTTPException(501, detail=f"{reason}; this device cannot build TensorRT engines (its /info "
                                                "lists no 'tensorrt'): send tensorrt targets to a Jetson or GPU agent")
            onnx_sha256 = upload.sha256["artifact"]
            # An engine is tied to the ONNX, the options, TensorRT and the GPU: that is its key.
            key = engine_key(onnx_sha256, options.model_dump(), available_runtimes()["tensorrt"], gpu_name())
            here = {"target": upload.fields["target"], "device": settings.name, "emulated": settings.emulated}
            found = engines.find(key)
            if found is not None:
                return TensorRTBuild.model_validate({**found, **here, "cached": True})
            built = await turn.run(run_tensorrt_build_job, upload.paths["artifact"], turn.directory / "model.engine",
                                   options, settings.job_timeout_s)
            record = TensorRTBuild(onnx_sha256=onnx_sha256, engine_sha256=built["sha256"],
                                   engine_bytes=built["bytes"], precision=built["precision"],
                                   tensorrt_version=built["tensorrt_version"], gpu=built["device"],
                                   build_s=built["build_s"], options=options, log_tail=built["log"][-_BUILD_LOG_TAIL:],
                                   **here)
            # A move across file systems copies: off the event loop, which keeps answering /health.
            await asyncio.to_thread(engines.put, key, built["engine_path"], record.model_dump(mode="json"))
            return record

    @app.get("/engines/{engine_sha256}", dependencies=[authorized])
    async def engine(engine_sha256: str) -> StreamingResponse:
        """The bytes of an engine this device built (its sha256 names it), for the pipeline to store."""
        found = engines.get(engine_sha256.lower())
        if found is None:
            raise HTTPException(404, detail=f"no engine {engine_sha256} in this agent's engine cache: build it with "
                                            f"POST /jobs/tensorrt-build ({_EVICTED})")
        handle = open(found[0], "rb")  # opened now: a later eviction cannot cut the download
        return StreamingResponse(_chunks(handle), media_type="application/octet-stream",
                                 headers={"Content-Length": str(os.fstat(handle.fileno()).st_size),
                                          "X-Engine-Sha256": engine_sha256.lower()})

    return app


def _chunks(handle: BinaryIO, size: int = 1 << 20):
    with handle:
        while chunk := handle.read(size):
            yield chunk


@dataclass
class _JobQueue:
    """One job at a time, in arrival order: a job's upload is read only once the job before it is done,
    while the server keeps answering /health and /info."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: int = 0
    started: int = 0
    failed: int = 0

    @contextlib.asynccontextmanager
    async def take(self, request: Request, settings: AgentSettings):
        """Wait for this job's turn; give it a private directory (mode 0700), removed afterwards.

        Until the job starts running, its upload must arrive within the upload timeout: a stalled
        client cannot hold the queue.
        """
        check_headers(request, settings.max_upload_mb)  # refused at once, without queueing
        if self.waiting >= settings.max_queued_jobs and self.lock.locked():
            raise HTTPException(503, headers={"Retry-After": "30"},
                                detail=f"{self.waiting} jobs are already waiting on this device (its limit, "
                                       f"--max-queued-jobs); send this one again later or to another device")
        self.waiting += 1
        try:
            await self.lock.acquire()
        finally:
            self.waiting -= 1
        job_dir = Path(tempfile.mkdtemp(prefix="edgeship-job-", dir=settings.work_dir))
        try:
            async with asyncio.timeout(settings.upload_timeout_s) as deadline:
                yield _Turn(self, job_dir, deadline, settings.job_memory_limit_mb())
        except TimeoutError:
            raise HTTPException(408, detail=f"the job's upload did not arrive within {settings.upload_timeout_s:g} s; "
                                            "send it again (a slow link: raise the agent's --upload-timeout-s)"
                                ) from None
        finally:
            shutil.rmtree(job_dir, ignore_errors=True)
            self.lock.release()


@dataclass
class _Turn:
    """The job whose turn it is."""

    queue: _JobQueue
    directory: Path
    deadline: asyncio.Timeout
    memory_mb: int

    async def run(self, job, *args):
        """Run a blocking job function in a thread (no upload deadline now), its process under the job memory
        limit; its failure is a 422 with its words."""
        self.deadline.reschedule(None)
        self.queue.started += 1
        try:
            return await asyncio.to_thread(job, *args, memory_mb=self.memory_mb)
        except DeviceJobFailed as error:
            self.queue.failed += 1
            raise HTTPException(422, detail=str(error)) from None


def _apply_profile(job, settings: AgentSettings):
    """An emulated profile's CPUs and threads replace whatever the job asked for."""
    update = {key: value for key, value in (("cpus", settings.cpus), ("threads", settings.threads))
              if value is not None}
    return job.model_copy(update=update) if update else job


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


def _check_upload(upload: Upload, kind: type[BenchmarkRequest] | type[EvaluationRequest]):
    """Validate the form's fields against the upload; nothing runs unless all of it holds."""
    if "artifact" not in upload.paths and "engine_sha256" not in upload.fields:
        raise HTTPException(422, detail="the job form has neither the file 'artifact' nor the field "
                                        "'engine_sha256' (an engine this agent built)")
    check_fields(upload, "request")
    try:
        job = kind.model_validate_json(upload.fields["request"])
    except ValidationError as error:
        raise HTTPException(422, detail=f"the field 'request' is not a valid {kind.__name__}: {error}") from None
    installed = available_runtimes()
    if job.runtime not in installed:
        raise HTTPException(400, detail=f"runtime '{job.runtime}' is not available on this device; "
                                        f"it has {sorted(installed) or 'none'}: pick a device that serves this target")
    try:
        options = check_runtime_options(job.runtime, job.runtime_options)
    except RuntimeOptionError as error:
        raise HTTPException(400, detail=f"{error}; fix `runtime_options` in the request (params.yaml: "
                                        f"benchmark.runtime_options.{job.runtime})") from None
    check_hashes(upload)
    return job.model_copy(update={"runtime_options": options})


def _check_build_form(upload: Upload) -> TensorRTBuildOptions:
    """Validate a build job's form (fields, options, the ONNX's sha256); its build options."""
    check_fields(upload, "options")
    try:
        options = TensorRTBuildOptions.model_validate_json(upload.fields["options"])
    except ValidationError as error:
        allowed = ", ".join(TensorRTBuildOptions.model_fields)
        raise HTTPException(422, detail=f"the field 'options' is not valid TensorRT build options (it takes "
                                        f"{allowed}): {error}") from None
    check_hashes(upload)
    return options


@dataclass(frozen=True)
class _ModelFile:
    path: Path
    sha256: str  # the artifact the pipeline sent (for an engine: the ONNX it was built from)
    engine_sha256: str | None = None


async def _model_file(upload: Upload, runtime: str, engines: EngineCache) -> _ModelFile:
    """The file a job runs: its uploaded artifact, or the cached engine its `engine_sha256` names."""
    if "artifact" in upload.paths:
        return _ModelFile(upload.paths["artifact"], upload.sha256["artifact"])
    wanted = upload.fields["engine_sha256"].strip().lower()
    if not _SHA256.fullmatch(wanted):
        raise HTTPException(400, detail=f"'engine_sha256' must be 64 hex digits, got {wanted[:80]!r}")
    if runtime != "tensorrt":
        raise HTTPException(400, detail=f"'engine_sha256' names a TensorRT engine, but the request's runtime is "
                                        f"'{runtime}': set it to 'tensorrt', or send the file 'artifact'")
    found = engines.get(wanted)
    if found is None:
        raise HTTPException(404, detail=f"no engine {wanted} in this agent's engine cache: build it first with "
                                        f"POST /jobs/tensorrt-build ({_EVICTED})")
    path, build = found
    if await asyncio.to_thread(sha256_of, path) != wanted:  # a cache file damaged on disk: never measure it
        engines.remove(wanted)
        raise HTTPException(404, detail=f"the cached engine {wanted} is damaged on disk and was removed; build it "
                                        "again with POST /jobs/tensorrt-build")
    return _ModelFile(path, build["onnx_sha256"], wanted)


# --- /info ------------------------------------------------------------------------------------------


def describe_device(settings: AgentSettings, sensors: list[Sensor] | None = None) -> DeviceInfo:
    """What this machine is, as `GET /info` reports it."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else settings.cpus
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
        cpus=settings.cpus or cpus,
        threads=settings.threads,
        sensors=[sensor.info() for sensor in sensors or []],
        tls=settings.tls,
        protocol=PROTOCOL,
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
