"""Benchmark stage: send each compiled artifact to the benchmark devices and collect what it measured.

The workflow:
1. `connected_devices` resolves the inventory (params.yaml `devices:`): remote agents by URL, with
   the token from each device's environment variable; a device without a URL is a loopback agent
   started here (pinned to its `emulate` profile, and labelled emulated, when it has one).
2. `BenchmarkDevices.probe` asks every device's /info (retried): its runtimes, CPUs and sensors.
3. `BenchmarkDevices.plan` pairs each artifact with every device whose runtimes serve it, one job per pair. A
   target no device serves, or that a device should serve by the inventory but does not, becomes a
   "not measured" result: the gate fails closed on it.
4. `BenchmarkDevices.run(job)` runs one job, never two at once on a device (a lock per device, and the agent
   queues too), retried with backoff after transient failures. A device lost for good hands the job
   to a device with the same tags; with none left, the result is "not measured". With a validation
   batch, the device also runs it and its accuracy fills the result. A TensorRT artifact (an ONNX
   file) is first built into an engine on the device (`POST /jobs/tensorrt-build`); the engine is
   fetched to sit beside the artifact (`engines/`, the result's `engine_path`), then measured and
   evaluated by its sha256. A failed build is a "failed" result with the builder's words.
5. `benchmark_artifacts` fans the jobs out on threads; the release flow submits the same jobs as Prefect
   tasks instead (`edgeship.flows.release_tasks.benchmark_on_devices`).

    >>> with connected_devices(params.devices, params.benchmark) as devices:
    ...     results = benchmark_artifacts(artifacts, BenchmarkDevices(devices, params.benchmark), batch)
    >>> results["onnx-int8"][0].latency_ms.p99

Nothing here raises for a device's sake: a result says what happened, and why.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path


from edgeship.config import BenchmarkParams, DeviceParams
from edgeship.errors import DeviceJobFailed, DeviceUnreachable
from edgeship.files import sha256_of
from edgeship.records import (BenchmarkRequest, BenchmarkResult, CompiledArtifact, DeviceInfo, EvaluationRequest,
                              PreparedData, TensorRTBuild, TensorRTBuildOptions)

NO_DEVICE = "no-device"  # the device named by a result for a target that no device in the inventory serves


@dataclass(frozen=True)
class DeviceEndpoint:
    """A device agent ready to take jobs."""

    name: str
    url: str
    token: str | None
    tags: tuple[str, ...] = ()
    runtimes: tuple[str, ...] | None = None  # what the inventory says it must serve (None: whatever it reports)
    ca_file: str | None = None
    sustained_s: float | None = None  # this device's sustained run (None: a fixed iteration count)
    token_env: str | None = None  # where the token came from, for messages


@dataclass(frozen=True)
class BenchmarkJob:
    """One artifact for one device of the inventory (which may hand it to a same-tag device)."""

    artifact: CompiledArtifact
    device: str


@dataclass(frozen=True)
class ValidationBatch:
    """The validation samples sent to devices for on-device accuracy: an .npz of x and y."""

    path: Path
    sha256: str
    samples: int
    task: str = "classification"  # who scores the device's answers (edgeship.tasks.kinds)
    truth: Path | None = None  # detection: the prepared split holding the batch's boxes (not sent to devices)


@contextlib.contextmanager
def connected_devices(devices: list[DeviceParams], params: BenchmarkParams | None = None
                      ) -> Iterator[list[DeviceEndpoint]]:
    """Resolve the inventory: start loopback agents for devices without a URL (all at once), read tokens from env."""
    from edgeship.device.client import local_agents

    params = params or BenchmarkParams()
    local = [d for d in devices if not d.url]
    specs = [{"name": d.name, "job_timeout_s": params.timeout_s + (d.sustained_s or 0),
              "emulated": d.emulate is not None,
              "cpus": d.emulate.cpus if d.emulate else None, "threads": d.emulate.threads if d.emulate else None}
             for d in local]
    with local_agents(specs) as agents:
        started = {agent.name: agent for agent in agents}
        endpoints = []
        for device in devices:
            common = {"name": device.name, "tags": tuple(device.tags),
                      "runtimes": tuple(device.runtimes) if device.runtimes is not None else None,
                      "sustained_s": _sustained_s(device, params)}
            if device.url:
                endpoints.append(DeviceEndpoint(url=device.url, token=os.environ.get(device.token_env),
                                                ca_file=str(device.ca_file) if device.ca_file else None,
                                                token_env=device.token_env, **common))
            else:
                agent = started[device.name]
                endpoints.append(DeviceEndpoint(url=agent.url, token=agent.token, **common))
        yield endpoints


def _sustained_s(device: DeviceParams, params: BenchmarkParams) -> float | None:
    """A device's own setting wins; else real devices (with a URL) run params.sustained_s, loopback ones none."""
    if device.sustained_s is not None:
        return device.sustained_s or None
    return (params.sustained_s or None) if device.url else None


def benchmark_request(params: BenchmarkParams, runtime: str, sustained_s: float | None = None) -> BenchmarkRequest:
    """The job a device is sent for `runtime` under `params` (a sustained run when `sustained_s` is set)."""
    return BenchmarkRequest(runtime=runtime, warmup=params.warmup, warmup_until_stable=params.warmup_until_stable,
                            warmup_max=params.warmup_max, iterations=params.iterations, duration_s=sustained_s,
                            windows=params.sustained_windows, threads=params.threads, cpus=params.cpus,
                            sensor_interval_s=params.sensor_interval_s,
                            runtime_options=params.runtime_options.get(runtime, {}))


def tensorrt_build_options(params: BenchmarkParams, artifact: CompiledArtifact) -> TensorRTBuildOptions:
    """How devices build `artifact`'s engine: its target's precision, params.yaml's `benchmark.tensorrt_build`."""
    precision = {"int8": "int8", "mixed": "int8", "fp32": "fp32"}.get(artifact.precision, "fp16")
    return TensorRTBuildOptions(precision=precision, **params.tensorrt_build)


def validation_batch(data: PreparedData, directory: Path, params: BenchmarkParams | None = None) -> ValidationBatch:
    """Write the test split as the .npz a device evaluates (capped at params.evaluate_max_samples); the task
    decides what goes in it (classification: images and labels; detection: images only, boxes stay here)."""
    from edgeship.tasks.kinds import task_of

    path = Path(directory) / "validation.npz"
    limit = params.evaluate_max_samples if params is not None else None
    samples = task_of(data).validation_batch(data, path, limit)
    return ValidationBatch(path=path, sha256=sha256_of(path), samples=samples, task=data.task,
                           truth=data.split_path("test"))


class _Lost(Exception):
    """A device stopped answering for good (after retries)."""


class BenchmarkDevices:
    """The devices of one benchmark stage: what each serves, one job at a time on each, which are lost.

    Thread-safe: jobs run from many threads (or Prefect task workers) at once.
    """

    def __init__(self, devices: list[DeviceEndpoint], params: BenchmarkParams, sleep: Callable[[float], None]
                 = time.sleep, engine_dir: Path | None = None):
        """`engine_dir`: where engines built on devices are stored; None: `engines/` beside each artifact."""
        self.devices = {device.name: device for device in devices}
        self.params = params
        self.engine_dir = engine_dir
        self.info: dict[str, DeviceInfo] = {}
        self.lost: dict[str, str] = {}  # device -> why it was given up on
        self._locks = {name: threading.Lock() for name in self.devices}
        self._guard = threading.Lock()
        self._sleep = sleep

    def __getstate__(self) -> dict:
        """What a benchmark task in another process (a Dask worker) needs: devices, params, what was probed.

        Locks do not travel: that process keeps its own per device, and the agent runs one job at a time anyway.
        """
        return {k: v for k, v in self.__dict__.items() if k not in ("_locks", "_guard")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _guard=threading.Lock(), _locks={name: threading.Lock() for name in state["devices"]})

    # --- probing and planning ---

    def probe(self) -> None:
        """Ask every device's /info at once (retried); a device that never answers is lost from the start."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(self.devices))) as pool:
            outcomes = dict(zip(self.devices, pool.map(self._probe_one, self.devices.values())))
        for name, outcome in outcomes.items():
            if isinstance(outcome, DeviceInfo):
                self.info[name] = outcome
            else:
                self.lost[name] = outcome

    def _probe_one(self, device: DeviceEndpoint) -> DeviceInfo | str:
        from edgeship.device.client import AgentClient

        with AgentClient(device.url, device.token, timeout_s=self.params.probe_timeout_s,
                         ca_file=device.ca_file) as client:
            outcome, _ = self._attempt(client, client.info)
        if isinstance(outcome, DeviceInfo):
            return outcome
        reason = f"its /info failed: {outcome}"
        if device.token is None and device.token_env and getattr(outcome, "status_code", None) == 401:
            reason += f" (${device.token_env} is not set here)"
        return reason

    def serves(self, name: str, runtime: str) -> bool:
        """Whether a device that answered /info has `runtime`."""
        info = self.info.get(name)
        return info is not None and runtime in info.runtimes

    def plan(self, artifacts: list[CompiledArtifact]) -> tuple[list[BenchmarkJob], list[BenchmarkResult]]:
        """Jobs for every (artifact, device that serves it), devices interleaved; and the results of what cannot run.

        A device that did not answer /info still gets the jobs its inventory runtimes (or, without
        them, every target) name: it is lost, so they go to a device with the same tags or fail closed.
        """
        per_device: dict[str, list[BenchmarkJob]] = {name: [] for name in self.devices}
        unserved: list[BenchmarkResult] = []
        for artifact in artifacts:
            planned = False
            for name, device in self.devices.items():
                expected = device.runtimes is None or artifact.runtime in device.runtimes
                if self.serves(name, artifact.runtime) or (name not in self.info and expected):
                    per_device[name].append(BenchmarkJob(artifact, name))
                    planned = True
                elif name in self.info and device.runtimes and artifact.runtime in device.runtimes:
                    unserved.append(_unmeasured(
                        artifact, name, f"the inventory says {name} serves runtime '{artifact.runtime}', but its "
                        f"agent reports only {sorted(self.info[name].runtimes)}: install the runtime there or "
                        "fix that device's `runtimes` in params.yaml"))
                    planned = True
            if not planned:
                offered = {n: sorted(i.runtimes) for n, i in self.info.items()}
                unserved.append(_unmeasured(
                    artifact, NO_DEVICE, f"no device in the inventory serves runtime '{artifact.runtime}' "
                    f"(devices and their runtimes: {offered or 'none answered'}); add one under `devices:` "
                    "in params.yaml"))
        rounds = max((len(jobs) for jobs in per_device.values()), default=0)
        # Round-robin over devices, so that whoever takes jobs in order keeps every device busy.
        jobs = [queue[i] for i in range(rounds) for queue in per_device.values() if i < len(queue)]
        return jobs, unserved

    # --- running ---

    def run(self, job: BenchmarkJob, batch: ValidationBatch | None = None) -> BenchmarkResult:
        """Run one job: on its device, else on a same-tag device when its device is lost, else "not measured"."""
        tried = []
        for name in self._candidates(job):
            with self._guard:
                why = self.lost.get(name)
            if why is None:
                try:
                    result = self._run_on(name, job, batch)
                except _Lost as lost:
                    why = str(lost)
                else:
                    if name != job.device:
                        note = f"measured on {name} in place of {job.device}, which was lost ({self.lost[job.device]})"
                        result = result.model_copy(update={"substitute_for": job.device,
                                                           "notes": [*result.notes, note]})
                    return result
            tried.append(f"{name}: {why}")
        tags = self.devices[job.device].tags
        others = f"no other device with the tags {list(tags)} could take it" if tags else \
            "it has no tags, so no other device may stand in for it"
        return _unmeasured(job.artifact, job.device, f"device {job.device} was lost and {others}. "
                                                     + "; ".join(tried))

    def _candidates(self, job: BenchmarkJob) -> Iterator[str]:
        yield job.device
        tags = set(self.devices[job.device].tags)
        if not tags:
            return
        for name, device in self.devices.items():
            if name != job.device and set(device.tags) == tags and self.serves(name, job.artifact.runtime):
                yield name

    def _run_on(self, name: str, job: BenchmarkJob, batch: ValidationBatch | None) -> BenchmarkResult:
        """Benchmark (and evaluate) on one device, holding its lock; raise _Lost when it stops answering."""
        from edgeship.device.client import AgentClient

        device, artifact = self.devices[name], job.artifact
        request = benchmark_request(self.params, artifact.runtime, device.sustained_s).model_copy(
            update={"postprocess": artifact.postprocess})  # a detector is timed with its NMS where it runs on the CPU
        timeout_s = _client_timeout(self.params.timeout_s + (device.sustained_s or 0))
        with self._locks[name], AgentClient(device.url, device.token, timeout_s=timeout_s,
                                            ca_file=device.ca_file) as client:
            with self._guard:
                if name in self.lost:  # lost while this job waited for it
                    raise _Lost(self.lost[name])
            path, model, engine, attempts = artifact.path, {}, {}, 0
            if artifact.runtime == "tensorrt":  # build the engine on the device; measure that engine
                built, attempts = self._attempt(client, lambda: client.build_tensorrt_engine(
                    artifact.path, artifact.target, tensorrt_build_options(self.params, artifact)), name)
                if not isinstance(built, TensorRTBuild):
                    return _unmeasured(artifact, name, f"the TensorRT engine build on {name} failed: {built}",
                                       status="failed", attempts=attempts)
                path, model = None, {"engine_sha256": built.engine_sha256}
                engine = {"build": built, **model, **self._store_engine(client, name, artifact, built)}
            outcome, more = self._attempt(
                client, lambda: client.benchmark(path, artifact.target, request, **model), name)
            attempts += more
            if not isinstance(outcome, BenchmarkResult):
                failed = _unmeasured(artifact, name, str(outcome), status="failed", attempts=attempts)
                return failed.model_copy(update=_with_notes(failed, engine))
            result = outcome.model_copy(update={"attempts": attempts, **_with_notes(outcome, engine)})
            if batch is None:
                return result
            evaluation_request = EvaluationRequest(runtime=artifact.runtime, cpus=self.params.cpus,
                                                   runtime_options=request.runtime_options,
                                                   postprocess=artifact.postprocess)
            outcome, more = self._attempt(
                client, lambda: client.evaluate(path, artifact.target, batch.path, evaluation_request, **model), name)
            update = {"attempts": attempts + more}
            if isinstance(outcome, Exception):
                update.update(status="failed", error=f"on-device evaluation failed: {outcome}")
            else:
                update.update(_device_score(outcome, batch))
            return result.model_copy(update=update)

    def _store_engine(self, client, name: str, artifact: CompiledArtifact, built: TensorRTBuild) -> dict:
        """Fetch the engine a device built, to store it like any artifact; result fields (`engine_path`, or a note)."""
        folder = self.engine_dir or Path(artifact.path).parent / "engines"
        device = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
        destination = folder / f"{artifact.target}.{device}.{built.engine_sha256[:16]}.engine"
        if destination.is_file() and sha256_of(destination) == built.engine_sha256:
            return {"engine_path": str(destination)}
        fetched, _ = self._attempt(client, lambda: client.fetch_engine(built.engine_sha256, destination))
        if isinstance(fetched, Exception):
            return {"notes": [f"the engine {built.engine_sha256[:16]} measured here could not be fetched from "
                              f"{name}, so it is not stored with the release: {fetched}"]}
        return {"engine_path": str(fetched)}

    def _attempt(self, client, call: Callable, device: str | None = None):
        """Call with retries and doubling backoff after transient failures.

        Returns (the answer, or the non-transient error, attempts). When every attempt failed
        transiently: marks `device` lost and raises _Lost (without a device: returns the last error).
        A job that timed out on an agent that still answers /health is a slow job, not a lost
        device: its error comes back at once.
        """
        error: Exception | None = None
        attempts = 0
        for attempt in range(self.params.retries + 1):
            if attempt:
                self._sleep(self.params.retry_backoff_s * 2 ** (attempt - 1))
            attempts += 1
            try:
                return call(), attempts
            except (DeviceUnreachable, DeviceJobFailed) as failure:
                error = failure
                if not getattr(failure, "transient", False):
                    return failure, attempts
                if getattr(failure, "timed_out", False) and _answers_health(client, self.params.probe_timeout_s):
                    _wait_until_idle(client, self.params.timeout_s, self.params.probe_timeout_s)
                    return failure, attempts
        if device is None:
            return error, attempts
        reason = f"{attempts} attempt(s) failed; the last: {error}"
        with self._guard:
            self.lost.setdefault(device, reason)
        raise _Lost(reason)



def benchmark_artifacts(artifacts: list[CompiledArtifact], devices: BenchmarkDevices,
                        batch: ValidationBatch | None = None) -> dict[str, list[BenchmarkResult]]:
    """Every artifact on every device that serves it, in parallel across devices, one job at a time on each."""
    if not devices.info and not devices.lost:
        devices.probe()
    jobs, unserved = devices.plan(artifacts)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(jobs), 64))) as pool:
        futures = [pool.submit(devices.run, job, batch) for job in jobs]
        return collect_results(artifacts, unserved, [future.result() for future in futures], list(devices.devices))


def collect_results(artifacts: list[CompiledArtifact], unserved: list[BenchmarkResult],
                    measured: list[BenchmarkResult], inventory: list[str] | None = None
                    ) -> dict[str, list[BenchmarkResult]]:
    """Results per target, what could not run included, in `inventory` order (a stand-in at its lost device's place)."""
    place = {name: i for i, name in enumerate(inventory or [])}
    results: dict[str, list[BenchmarkResult]] = {a.target: [] for a in artifacts}
    for result in sorted([*measured, *unserved],
                         key=lambda r: place.get(r.substitute_for or r.device, len(place))):
        results.setdefault(result.target, []).append(result)
    return results


def _device_score(outcome, batch: ValidationBatch) -> dict:
    """BenchmarkResult fields from a device's evaluate answer: the task's metric as `accuracy`, its others in
    `metrics`; a failed result when the task cannot score the answer."""
    from edgeship.tasks.kinds import get_task

    task = get_task(batch.task)
    scored = task.score_device(outcome, batch)
    if isinstance(scored, str):
        return {"status": "failed", "error": scored}
    others = {k: v for k, v in scored.items() if k != task.metric}
    return {"accuracy": scored[task.metric], "accuracy_samples": batch.samples, "metrics": others}


def _with_notes(result: BenchmarkResult, update: dict) -> dict:
    """`update` for `result`, its notes appended to the result's own."""
    return {**update, "notes": [*result.notes, *update.get("notes", [])]}


def _unmeasured(artifact: CompiledArtifact, device: str, error: str, status: str = "not_measured",
                attempts: int = 0) -> BenchmarkResult:
    return BenchmarkResult(target=artifact.target, device=device, runtime=artifact.runtime, sha256=artifact.sha256,
                           status=status, error=error, attempts=attempts)


def _client_timeout(job_timeout_s: float) -> float:
    """A little longer than the agent's own job timeout, so its clean "ran past its timeout" answer arrives first."""
    return job_timeout_s + min(30.0, 2.0 + 0.1 * job_timeout_s)


def _answers_health(client, timeout_s: float) -> bool:
    from edgeship.device.client import AgentClient

    with AgentClient(client.url, timeout_s=timeout_s, ca_file=client.ca_file) as probe:
        try:
            probe.health()
            return True
        except (DeviceUnreachable, DeviceJobFailed):
            return False


def _wait_until_idle(client, limit_s: float, timeout_s: float) -> None:
    """After a client-side timeout: let the agent finish (or kill) that job before this device gets another."""
    from edgeship.device.client import AgentClient

    deadline = time.monotonic() + limit_s
    with AgentClient(client.url, timeout_s=timeout_s, ca_file=client.ca_file) as probe:
        while time.monotonic() < deadline:
            try:
                if not probe.health().get("busy"):
                    return
            except (DeviceUnreachable, DeviceJobFailed):
                return
            time.sleep(0.5)


