"""params.yaml: the one config file, read by DVC (`params:`) and by the flows.

Every section is a pydantic model that forbids unknown keys, so a typo stops the
run before any work, with a message naming the key and what is allowed:

    >>> from edgeship.config import load_params
    >>> params = load_params("params.yaml")
    >>> params.train.epochs
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from edgeship.errors import ConfigError
from edgeship.fleet.policy import FleetParams, RolloutParams
from edgeship.targets import KNOWN_TARGETS


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProjectParams(Section):
    name: str = Field(default="digits-classifier", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="registered model name in MLflow")


class DataParams(Section):
    raw_dir: Path = Path("data/raw")
    prepared_dir: Path = Path("data/prepared")
    input_size: int = Field(default=32, ge=8, le=1024)
    channels: Literal[1, 3] = 1
    val_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    test_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    calibration_size: int = Field(default=128, ge=1, description="images taken from train for calibration")
    seed: int = 0


class ModelParams(Section):
    factory: str = Field(default="edgeship.models.zoo:mobilenet_v2",
                         description="import path 'package.module:function' returning a torch.nn.Module")
    kwargs: dict = Field(default_factory=dict)

    @field_validator("factory")
    @classmethod
    def _import_path(cls, value: str) -> str:
        module, sep, attr = value.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"'{value}' is not an import path; write it as 'package.module:function'")
        return value


class TrainParams(Section):
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=0.05, gt=0)
    weight_decay: float = Field(default=4e-5, ge=0)
    augment: bool = Field(default=False, description="random shifts of up to 1/8 of the image (no flips)")
    seed: int = 0


class QatParams(Section):
    epochs: int = Field(default=3, ge=1)
    lr: float = Field(default=0.005, gt=0)
    batch_size: int = Field(default=64, ge=2)
    backend: Literal["x86", "qnnpack", "fbgemm"] = "x86"
    freeze_bn_after_epoch: int = Field(default=1, ge=0, description="BatchNorm statistics freeze from this epoch "
                                                                     "(0-based); the folded BN then uses them")
    freeze_observers_after_epoch: int = Field(default=2, ge=0, description="quantizer ranges freeze from this epoch")
    lr_schedule: Literal["cosine", "step", "constant"] = Field(
        default="cosine", description="per epoch: cosine to zero, step (x0.1 at half way), or constant")
    early_stop_patience: int | None = Field(default=None, ge=1,
                                            description="stop after this many epochs without a better val accuracy")
    calibrate: bool = Field(default=True, description="set quantizer ranges on the calibration split before "
                                                      "the first epoch")
    reduce_range: bool = Field(default=False, description="7-bit activations: only for x86 CPUs without VNNI, "
                                                          "where u8*s8 products can saturate")
    fold_relu6: bool = Field(default=True, description="fold a ReLU6 after an int8 conv into its output quantizer "
                                                       "(one QLinearConv in ONNX Runtime instead of a float Clip)")
    distill_alpha: float = Field(default=0.0, ge=0, le=1, description="weight of distillation from the float "
                                                                      "model's logits during QAT; 0: off")
    distill_temperature: float = Field(default=4.0, gt=0)


class SensitivityParams(Section):
    """Per-layer sensitivity analysis: each layer quantized alone, and everything but it."""

    enabled: bool = Field(default=True, description="run the analysis and plan a mixed precision before QAT")
    max_samples: int | None = Field(default=None, ge=1, description="validation images per evaluation; "
                                                                    "null: the whole split")
    converse: bool = Field(default=True, description="also measure all layers int8 except one")
    latency: bool = Field(default=True, description="measure each layer's int8 and float cost on ONNX Runtime")
    latency_runs: int = Field(default=40, ge=5, description="profiled runs per model when measuring costs")


class PrecisionParams(Section):
    """The accuracy budget of the mixed-precision plan, and layers the user fixes."""

    max_drop_points: float | None = Field(default=None, ge=0, description="largest val accuracy drop vs fp32, in "
                                                                          "percentage points (0.5 when neither "
                                                                          "budget is set)")
    max_drop_relative: float | None = Field(default=None, ge=0, le=1, description="or the largest drop as a "
                                                                                  "fraction of the fp32 accuracy")
    pinned: dict[str, Literal["int8", "float"]] = Field(default_factory=dict,
                                                        description="module name -> precision the plan must keep")
    strategy: Literal["latency_aware", "accuracy_only"] = Field(
        default="latency_aware", description="latency_aware: revert the layer that buys the most accuracy per ms; "
                                             "accuracy_only: the most harmful layer first (as NNCF does)")
    rerank_after: int = Field(default=2, ge=1, description="re-rank after this many reverts that did not help")
    revert_faster_in_float: bool = Field(default=True, description="keep float the layers that run faster in "
                                                                   "float than in int8 on the runtime")
    measure_candidates: bool = Field(default=True, description="measure every candidate plan's latency on ONNX "
                                                               "Runtime, not only predict it")
    compare_strategies: bool = Field(default=True, description="also walk the other strategy, for the frontier plot "
                                                               "and the comparison (does not change the plan)")
    frontier_steps: int = Field(default=6, ge=0, description="reverts past the chosen plan, to draw the "
                                                             "accuracy/latency frontier (does not change the plan)")
    max_evaluations: int | None = Field(default=None, ge=1, description="stop the search after this many "
                                                                        "validation passes (large models); null: none")

    @model_validator(mode="after")
    def _one_budget(self) -> "PrecisionParams":
        if self.max_drop_points is not None and self.max_drop_relative is not None:
            raise ValueError("set one of max_drop_points and max_drop_relative, not both")
        return self

    def allowed_drop(self, fp32_accuracy: float) -> float:
        """The budget as an accuracy fraction (0.005 for half a point)."""
        if self.max_drop_relative is not None:
            return self.max_drop_relative * fp32_accuracy
        return (0.5 if self.max_drop_points is None else self.max_drop_points) / 100.0


class DistillationParams(Section):
    """Train the model from a teacher's softened logits plus the labels (an optional stage)."""

    enabled: bool = False
    teacher: ModelParams | None = Field(default=None, description="a model trained first in the same run")
    teacher_uri: str | None = Field(default=None, description="or an MLflow model URI (models:/name/1, runs:/...)")
    teacher_epochs: int | None = Field(default=None, ge=1, description="teacher training epochs; null: train.epochs")
    temperature: float = Field(default=4.0, gt=0)
    alpha: float = Field(default=0.7, ge=0, le=1, description="weight of the KL term; 1 - alpha weighs the labels")

    @model_validator(mode="after")
    def _one_teacher(self) -> "DistillationParams":
        if self.enabled and (self.teacher is None) == (self.teacher_uri is None):
            raise ValueError("distillation needs exactly one of 'teacher' (a model to train) and 'teacher_uri'")
        return self


class PruningParams(Section):
    """Structured channel pruning (Torch-Pruning) after training, before sensitivity and QAT: off by default."""

    enabled: bool = False
    importance: Literal["l1", "taylor"] = Field(default="l1", description="l1: weight magnitude; taylor: "
                                                "|weight x gradient| on a few training batches")
    ratio: float = Field(default=0.3, ge=0, lt=1, description="fraction of channels removed (per layer, or over "
                                                              "the whole model with scope: global)")
    search_ratios: list[float] = Field(default_factory=list, description="candidate ratios: each is pruned, "
                                       "fine-tuned and timed; the fastest within max_drop_points wins (empty: ratio)")
    max_drop_points: float = Field(default=1.0, ge=0, description="val accuracy budget vs the unpruned model, in "
                                                                  "points, after fine-tuning")
    scope: Literal["per_layer", "global"] = Field(default="per_layer", description="per_layer: every layer loses "
                                                  "`ratio`; global: the least important channels model-wide")
    max_layer_ratio: float = Field(default=0.8, gt=0, lt=1, description="global scope: no layer loses more")
    layer_ratios: dict[str, float] = Field(default_factory=dict, description="module name -> its own ratio")
    pinned: list[str] = Field(default_factory=list, description="modules never pruned (the classifier never is)")
    round_to: int | None = Field(default=4, ge=1, description="keep channel counts multiples of this (the "
                                 "nearest, at least one): odd counts run slower on SIMD kernels; null: any count")
    fine_tune_epochs: int = Field(default=3, ge=1)
    fine_tune_lr: float = Field(default=0.01, gt=0)
    distill: bool = Field(default=True, description="fine-tune from the unpruned model's logits as teacher")
    distill_alpha: float = Field(default=0.5, ge=0, le=1)
    distill_temperature: float = Field(default=4.0, gt=0)
    taylor_batches: int = Field(default=4, ge=1, description="training batches whose gradients Taylor uses")
    latency_runs: int = Field(default=100, ge=5, description="timed runs per candidate on ONNX Runtime (1 thread)")

    @field_validator("search_ratios")
    @classmethod
    def _ratios(cls, value: list[float]) -> list[float]:
        bad = [r for r in value if not 0 <= r < 1]
        if bad:
            raise ValueError(f"pruning ratios must be in [0, 1): {bad}")
        return sorted(set(value))

    @field_validator("layer_ratios")
    @classmethod
    def _layer_ratios(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: r for k, r in value.items() if not 0 <= r < 1}
        if bad:
            raise ValueError(f"layer ratios must be in [0, 1): {bad}")
        return value

    def candidates(self) -> list[float]:
        return self.search_ratios or [self.ratio]


class CompileOptions(Section):
    """One target's converter choices (`compile: {tflite-int8: {route: tf, io: uint8}}`)."""

    route: Literal["auto", "litert-torch", "tf"] = Field(
        default="auto", description="LiteRT targets: litert-torch; tf: ONNX -> onnx2tf -> TFLiteConverter "
                                    "(.venv/tf-converter); auto: litert-torch, TensorFlow's converter when it fails")
    io: Literal["int8", "uint8", "float32"] | None = Field(
        default=None, description="tflite-int8 input/output type on the tf route (uint8 for the Coral Edge TPU); "
                                  "null: int8")


class PtqParams(Section):
    """The post-training-quantization baseline: ONNX Runtime static QDQ quantization of the fp32 model."""

    enabled: bool = True
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True


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
    p99_latency_ms: float | None = Field(default=None, gt=0)
    max_size_mb: float | None = Field(default=None, gt=0)
    accept_proxy_accuracy: bool = Field(default=False, description="let a proxy's accuracy (e.g. Core ML's torch "
                                        "stand-in on Linux) count; off: only the target's own runtime counts")
    fail_if_slower_than_fp32: bool = Field(default=False, description="int8 targets: fail when the p50 on a device "
                                           "is above the float sibling's there (off: flagged only)")
    fail_if_bigger_than_fp32: bool = Field(default=False, description="int8 targets: fail when the file is bigger "
                                           "than the float sibling's (off: flagged only)")

    @model_validator(mode="after")
    def _sets_a_limit(self) -> "GatePolicy":
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


class RegistryParams(Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_location: str | None = Field(default="mlartifacts",
                                          description="artifact root for a new experiment (local path or URI)")
    experiment: str = "edgeship-release"
    candidate_alias: str = "candidate"


class FallbackParams(Section):
    """A small, separately registered model every device keeps installed (per target it has an artifact for)."""

    model_name: str = Field(description="its registered model name, e.g. digits-tiny")
    alias: str | None = "production"
    version: str | None = None  # pin a version instead of the alias


class OtaParams(Section):
    repository: str = Field(default="ota-repo", description="local directory or s3://bucket/prefix")
    keystore: Path = Path(".edgeship/keys")
    channel: str = "stable"
    s3_endpoint_url: str | None = None
    metadata_expiry_days: int = Field(default=30, ge=1, description="targets metadata lifetime")
    snapshot_expiry_days: float = Field(default=7, gt=0)
    timestamp_expiry_hours: float = Field(default=24, gt=0, description="the freeze window: re-sign before it")
    resign_every_hours: float = Field(default=6, gt=0, description="schedule of the publish/resign deployment")
    fallback: FallbackParams | None = None
    golden_count: int = Field(default=8, ge=0, le=256, description="golden vectors signed with each release")
    golden_atol: float = Field(default=0.05, ge=0, description="int8 kernels differ a little across CPUs; "
                               "the top-1 class must match exactly")
    golden_rtol: float = Field(default=0.05, ge=0)


class Params(Section):
    """The whole of params.yaml."""

    project: ProjectParams = ProjectParams()
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    qat: QatParams = QatParams()
    sensitivity: SensitivityParams = SensitivityParams()
    precision: PrecisionParams = PrecisionParams()
    distillation: DistillationParams = DistillationParams()
    pruning: PruningParams = PruningParams()
    ptq: PtqParams = PtqParams()
    targets: list[str] = Field(default_factory=lambda: ["onnx-fp32", "onnx-int8"], min_length=1)
    benchmark: BenchmarkParams = BenchmarkParams()
    devices: list[DeviceParams] = Field(default_factory=lambda: [DeviceParams(name="local")])
    gate: dict[str, GatePolicy] = Field(default_factory=dict)
    compile: dict[str, CompileOptions] = Field(default_factory=dict)
    task_runner: TaskRunnerParams = TaskRunnerParams()
    registry: RegistryParams = RegistryParams()
    ota: OtaParams = OtaParams()
    fleet: FleetParams = FleetParams()        # telemetry broker and fleet store (edgeship/fleet/policy.py)
    rollout: RolloutParams = RolloutParams()  # per-channel rollout policy

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, targets: list[str]) -> list[str]:
        unknown = [t for t in targets if t not in KNOWN_TARGETS]
        if unknown:
            raise ValueError(f"unknown target(s) {unknown}; known targets: {sorted(KNOWN_TARGETS)}")
        if len(set(targets)) != len(targets):
            raise ValueError(f"targets are listed twice: {targets}")
        return targets

    @field_validator("devices")
    @classmethod
    def _unique_devices(cls, devices: list[DeviceParams]) -> list[DeviceParams]:
        names = [d.name for d in devices]
        if len(set(names)) != len(names):
            raise ValueError(f"device names must be unique: {names}")
        return devices

    @field_validator("gate")
    @classmethod
    def _gates_name_selected_targets(cls, gate: dict[str, GatePolicy], info: ValidationInfo
                                     ) -> dict[str, GatePolicy]:
        targets = info.data.get("targets") or []
        stray = sorted(set(gate) - set(targets))
        if stray:
            raise ValueError(f"names target(s) {stray} that are not in 'targets' {targets}")
        return gate

    @field_validator("compile")
    @classmethod
    def _compile_options_name_litert_targets(cls, options: dict[str, CompileOptions], info: ValidationInfo
                                             ) -> dict[str, CompileOptions]:
        stray = sorted(t for t in options if not t.startswith("tflite-"))
        if stray:
            raise ValueError(f"compile options are for the LiteRT targets (tflite-*) only; remove {stray}")
        bad_io = sorted(t for t, o in options.items() if o.io and (t != "tflite-int8" or o.route == "litert-torch"))
        if bad_io:
            raise ValueError(f"'io' applies to tflite-int8 on the tf (or auto) route only; remove it from {bad_io}")
        return options

    def gate_for(self, target: str) -> GatePolicy:
        """The gate policy of a target (the default policy when params.yaml sets none)."""
        return self.gate.get(target, GatePolicy())


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"{source} is not valid:"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  - '{key}': unknown key; remove it or fix its spelling")
        else:
            given = item.get("input")
            shown = "" if isinstance(given, dict) else f" (given: {given!r})"
            lines.append(f"  - '{key}': {item['msg']}{shown}")
    return "\n".join(lines)


def parse_params(raw: dict | None, source: str = "params") -> Params:
    """Validate a mapping as params; raise ConfigError naming each bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a mapping of sections (project, data, train, ...), got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe(error, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found; run from the project root or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    return parse_params(raw, source=str(path))
