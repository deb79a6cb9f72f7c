"""params.yaml's sections on measuring and judging: benchmark, devices, gate, task_runner."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from edgeship.config.section import Section


class BenchmarkParams(Section):
    warmup: int = Field(default=20, ge=0, description="warm-up runs (the fewest, with warmup_until_stable)")
    iterations: int = Field(default=200, ge=1)
    threads: int = Field(default=1, ge=0, description="0: the runtime's default")
    timeout_s: float = Field(default=300, gt=0, description="one job on one device, upload to answer; "
                                                           "a sustained run's length is added")
    warmup_until_stable: bool = Field(default=True,
                                      description="warm up until the median latency stops moving (else a fixed count)")
    warmup_max: int = Field(default=1000, ge=0, description="most warm-up runs when warming up until stable")
    cpus: list[int] | None = Field(default=None, description="CPU affinity of every job; None: the agent's")
    sustained_s: float | None = Field(
        default=120, ge=0, description="on devices with a URL, time a sustained run this long instead of "
                                       "`iterations` (throttling shows after 90-120 s); 0 or null: off")
    sustained_windows: int = Field(default=10, ge=2, le=1000,
                                   description="slices of a sustained run: drift is the last one's p50 over the first's")
    sensor_interval_s: float = Field(default=1.0, ge=0.05, le=60, description="sensor sampling period")
    evaluate: bool = Field(default=True, description="send the test split; the device's own accuracy gates")
    evaluate_max_samples: int | None = Field(default=None, ge=1, description="cap on the validation batch")
    retries: int = Field(default=2, ge=0, description="retries of a job after a transient failure")
    retry_backoff_s: float = Field(default=2.0, ge=0, description="first retry delay; doubles each retry")
    probe_timeout_s: float = Field(default=10, gt=0, description="GET /info of each device before sending work")
    runtime_options: dict[str, dict[str, bool | int | float | str]] = Field(
        default_factory=dict, description="per runtime, its adapter's options on every device, e.g. "
                                          "litert: {xnnpack: false}; coreml: {compute_units: CPU_AND_NE}")
    tensorrt_build: dict[str, bool | int | str] = Field(
        default_factory=dict, description="how devices build TensorRT engines: workspace_mb, optimization_level, "
                                          "sparse_weights, timing_cache (the precision is the target's)")

    @field_validator("runtime_options")
    @classmethod
    def _options_the_adapters_take(cls, value: dict[str, dict]) -> dict[str, dict]:
        from edgeship.device.runtimes import check_runtime_options

        return {runtime: check_runtime_options(runtime, options) for runtime, options in value.items()}

    @field_validator("tensorrt_build")
    @classmethod
    def _build_options(cls, value: dict) -> dict:
        from edgeship.records import TensorRTBuildOptions

        if "precision" in value:
            raise ValueError("the precision of a TensorRT engine is its target's (tensorrt-fp16, tensorrt-int8); "
                             "remove it here")
        TensorRTBuildOptions(**value)  # unknown keys and bad values fail here, by name
        return value


class EmulationProfile(Section):
    """A host-emulated device: the loopback agent pins its jobs to these CPUs and thread count."""

    threads: int | None = Field(default=None, ge=1)
    cpus: list[int] | None = Field(default=None, min_length=1)


class DeviceParams(Section):
    name: str
    url: str | None = Field(default=None, description="agent URL; empty: the flow starts one on 127.0.0.1")
    token_env: str = Field(default="EDGESHIP_AGENT_TOKEN",
                           description="environment variable holding this device's bearer token")
    tags: list[str] = Field(default_factory=list,
                            description="a job lost with this device is retried on one with the same tags")
    runtimes: list[str] | None = Field(
        default=None, description="runtimes this device must serve; /info lacking one is reported, not skipped")
    emulate: EmulationProfile | None = Field(
        default=None, description="no url: a loopback agent pinned to this profile, its results marked emulated")
    ca_file: Path | None = Field(default=None, description="CA certificate that signed an https agent's certificate")
    sustained_s: float | None = Field(default=None, ge=0,
                                      description="this device's sustained run; null: benchmark.sustained_s "
                                                  "with a URL, off on loopback")

    @model_validator(mode="after")
    def _emulated_devices_are_local(self) -> "DeviceParams":
        if self.emulate is not None and self.url:
            raise ValueError(f"device '{self.name}' has both a url and 'emulate': an emulated profile is a "
                             "loopback agent the flow starts itself; remove one of them")
        return self


class GatePolicy(Section):
    required: bool = True
    max_accuracy_drop: float | None = Field(default=1.0, ge=0, description="points below the fp32 torch model")
    max_map_drop: float | None = Field(default=1.0, ge=0, description="task: detection: mAP@0.5:0.95 points below "
                                                                      "the fp32 torch model")
    p99_latency_ms: float | None = Field(default=None, gt=0)
    max_size_mb: float | None = Field(default=None, gt=0)
    accept_proxy_accuracy: bool = Field(default=False, description="let a proxy's accuracy (e.g. Core ML's torch "
                                        "stand-in on Linux) count; off: only the target's own runtime counts")
    fail_if_slower_than_fp32: bool = Field(default=False, description="int8 targets: fail when the p50 on a device "
                                           "is above the float sibling's there (off: flagged only)")
    fail_if_bigger_than_fp32: bool = Field(default=False, description="int8 targets: fail when the file is bigger "
                                           "than the float sibling's (off: flagged only)")

    @model_validator(mode="after")
    def _sets_a_limit(self) -> "GatePolicy":  # max_map_drop's case: edgeship.config.Params (it knows the task)
        if self.max_accuracy_drop is None and self.p99_latency_ms is None and self.max_size_mb is None:
            raise ValueError("a gate must set at least one of max_accuracy_drop, p99_latency_ms, max_size_mb")
        return self


class TaskRunnerParams(Section):
    """Where the per-target compile and benchmark tasks run (`task_runner:`).

    threads: in the flow's own process (Prefect's thread pool); torch's graph capture holds one process-wide
    lock, so the targets' captures take turns. dask: on a Dask cluster through prefect-dask's DaskTaskRunner,
    each task in a worker process of its own; a LocalCluster started for the run, or the scheduler at
    `address` (its workers need edgeship installed, the project at the same path, and a tracking server).
    """

    kind: Literal["threads", "dask"] = "threads"
    address: str | None = Field(default=None, description="dask: a running scheduler, e.g. tcp://10.0.0.5:8786; "
                                                          "null: a LocalCluster for the run")
    workers: int | None = Field(default=None, ge=1, description="LocalCluster worker processes; null: one per "
                                                                "target, at most the CPU count")

    @model_validator(mode="after")
    def _dask_options_need_dask(self) -> "TaskRunnerParams":
        if self.kind == "threads" and (self.address or self.workers):
            raise ValueError("'address' and 'workers' are Dask options: set kind: dask, or remove them")
        if self.address and self.workers:
            raise ValueError("'workers' sizes a LocalCluster; a cluster at 'address' has its own workers: remove one")
        return self
