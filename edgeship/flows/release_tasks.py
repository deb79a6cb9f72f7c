"""The release flow's Prefect tasks: thin wrappers that run a stage and log it to MLflow.

Each task calls a plain, typed stage function (edgeship.tasks.*), reports progress,
and logs metrics and artifacts to the release's MLflow run. Tasks take and
return small records and paths, never tensors.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from edgeship.config import Params
from edgeship.flows.retries import SERVICE_CALL
from edgeship.progress import progress
from edgeship.records import (BenchmarkResult, CompileOutcome, CompiledArtifact, GateReport, HostCheck, PreparedData,
                              QuantizedModel, TargetSummary, TrainedModel)
from edgeship.registry.tracking import ReleaseRun
from edgeship.targets import KNOWN_TARGETS


def epoch_logger(run: ReleaseRun, stage: str, total: int):
    """An on_epoch callback that logs `<stage>/<metric>` per epoch and advances the stage's progress row."""
    progress().start(stage, total=total)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        run.log_metrics({f"{stage}/{k}": v for k, v in metrics.items()}, step=epoch)
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if "acc" in k or "loss" in k)
        progress().advance(stage, note=shown)

    return on_epoch


@task(name="prepare-data", cache_policy=NO_CACHE)
def prepare_data(workdir: Path, params: Params, run: ReleaseRun, preparing=None) -> PreparedData:
    """Reproduce the DVC `prepare` stage when stale (`preparing`: the reproduction the flow already started,
    edgeship.tasks.data_version.Reproduction); record the data hash as lineage."""
    from edgeship.tasks import data_version
    from edgeship.tasks.data import read_prepared

    progress().start("data", total=1)
    data_hash = (preparing or data_version.Reproduction(workdir)).result()
    data = read_prepared(workdir / params.data.prepared_dir).model_copy(update={"dvc_hash": data_hash})
    if data.task != params.task:
        from edgeship.errors import DataError

        raise DataError(f"{params.data.prepared_dir} was prepared for task '{data.task}', params.yaml says "
                        f"'{params.task}'; run `dvc repro prepare` (dvc.yaml's prepare stage must list `task` in "
                        f"its params)")
    run.set_tags({"edgeship.data_hash": data_hash or "unlocked", "edgeship.data_classes": len(data.classes),
                  "edgeship.task": params.task,
                  **({"edgeship.data_annotations_sha256": data.annotations_sha256} if data.annotations_sha256 else {})})
    run.log_params({"data.counts": data.counts})
    lock = workdir / "dvc.lock"
    if lock.is_file():
        run.log_artifact(lock, "lineage")
    progress().finish("data", note=f"{sum(data.counts.values())} images, md5 {str(data_hash)[:8]}")
    return data


def pull_field_samples(params: Params, root: Path, run: ReleaseRun) -> None:
    """Pull the devices' newest field samples where params.yaml names a source (`edgeship data field`); an
    unreachable bucket leaves the field split as last pulled, said in a tag and a warning, not a failed release."""
    from edgeship.errors import DataError
    from edgeship.tasks.field_data import pull_configured, source_of

    if source_of(params)[0] is None:
        return
    progress().start("field samples", total=1)
    try:
        report = pull_configured(params, root)
    except DataError as error:
        progress().finish("field samples", note=f"not pulled ({error}); training on the split as last pulled")
        run.set_tags({"edgeship.field_pull": f"failed: {str(error)[:400]}"})
        return
    run.set_tags({"edgeship.field_pull": f"{report.downloaded} new objects, split {report.counts}"})
    progress().finish("field samples", note=f"{report.downloaded} new, split {report.counts}")


@task(name="train", cache_policy=NO_CACHE)
def train_model(params: Params, data: PreparedData, out_dir: Path, run: ReleaseRun) -> TrainedModel:
    """Train the fp32 model; log per-epoch metrics and the model itself (with signature) to MLflow."""
    from edgeship.registry.model_registry import log_torch_model
    from edgeship.tasks.data import load_split
    from edgeship.tasks.kinds import get_task
    from edgeship.tasks.train import load_model

    task = get_task(params.task)
    trained = task.train(data, params, out_dir, on_epoch=epoch_logger(run, "train", params.train.epochs))
    log_fp32_metrics(run, trained)
    example, _ = load_split(data, "test")
    model_uri = log_torch_model(run, load_model(trained), example[:1])
    progress().finish("train", note=f"test {task.metric} {trained.test_accuracy:.4f}")
    return trained.model_copy(update={"mlflow_run_id": run.run_id, "model_uri": model_uri})


@task(name="compile", task_run_name="compile-{target}", cache_policy=NO_CACHE)
def compile_target(target: str, trained: TrainedModel, quantized: QuantizedModel | None, data: PreparedData,
                   out_dir: Path, run: ReleaseRun, options: dict | None = None) -> CompileOutcome:
    """Compile one target; any converter failure is recorded, not raised, so other targets go on.

    Any exception: a converter is third-party code that raises what it likes (TypeError on an
    unsupported op, ImportError for a missing backend); it fails this target's gate, not the release.
    """
    from edgeship.tasks.compile import CompileInputs, get_target

    progress().start(f"compile {target}", total=1)
    try:
        artifact = get_target(target).compile(
            CompileInputs(trained=trained, data=data, output_dir=out_dir / target, quantized=quantized,
                          options=options or {}))
    except Exception as error:  # noqa: BLE001 - see the docstring: one target never stops the others
        run.set_tags({f"edgeship.compile.{target}": f"failed: {str(error)[:4000]}"})
        outcome = CompileOutcome(target=target, error=f"{type(error).__name__}: {error}")
    else:  # the file becomes a logged model at registration, with its measurements and verdict
        run.log_metrics({f"{target}/bytes": float(artifact.bytes)})
        outcome = CompileOutcome(target=target, artifact=artifact)
    progress().finish(f"compile {target}", note=compile_note(outcome))
    return outcome


def compile_note(outcome: CompileOutcome) -> str:
    return f"{outcome.artifact.bytes / 1e3:.0f} kB" if outcome.artifact else f"[red]failed: {outcome.error}"


def compile_targets(params: Params, trained: TrainedModel, quantized: QuantizedModel | None, data: PreparedData,
                    out_dir: Path, run: ReleaseRun, cache, runner=None) -> dict[str, CompileOutcome]:
    """Every target's compile task at once, on `runner` (edgeship.flows.fan_out); reused from `cache` when unchanged.

    A task in another process reports its progress there, so this process shows its rows when the results come.
    """
    from edgeship.flows.fan_out import remote

    futures = {}
    for target in params.targets:
        if remote(runner):
            progress().start(f"compile {target}", total=1)
        futures[target] = cache.submit(compile_target, target, trained, quantized, data, out_dir, run,
                                       params.compile[target].model_dump() if target in params.compile else None,
                                       runner=runner)
    outcomes = {}
    for target, future in futures.items():
        outcome = cache.reused(future, lambda o: reused_compile(run, o))
        if remote(runner):
            progress().finish(f"compile {target}", note=compile_note(outcome))
        outcomes[target] = outcome
    return outcomes


@task(name="reference-logits", cache_policy=NO_CACHE)
def reference_logits(trained: TrainedModel, data: PreparedData, out_dir: Path) -> Path:
    """The fp32 PyTorch logits on the test split, the yardstick for every target's host check."""
    from edgeship.tasks.host_check import reference_logits as compute

    path = out_dir / "reference_logits.npy"
    np.save(path, compute(trained, data))
    return path


@task(name="host-check", task_run_name="host-check-{artifact.target}", cache_policy=NO_CACHE)
def check_on_host(artifact: CompiledArtifact, data: PreparedData, reference: Path, run: ReleaseRun,
                  golden_count: int = 8) -> HostCheck:
    """Load the artifact in its own runtime here and measure accuracy and agreement with fp32.

    Also keeps `golden_count` test images and this runtime's outputs for them as the release's
    golden vectors (golden.npz beside the file, logged with the target's model at registration): what a device
    must reproduce before it installs the file.
    """
    from edgeship.tasks.data import load_split
    from edgeship.tasks.host_check import host_check

    result = host_check(artifact, data, np.load(reference))
    if result.error is None and not result.proxy and golden_count:
        from edgeship.ota.golden import write_golden

        images, _ = load_split(data, "test")
        write_golden(artifact, images[:golden_count], artifact.path.parent / "golden.npz")
    log_host_check(run, artifact, result)
    return result


def log_host_check(run: ReleaseRun, artifact: CompiledArtifact, result: HostCheck) -> None:
    """The host check's metrics (a reused check logs them again, into this run)."""
    target = artifact.target
    run.log_metrics({f"{target}/host_accuracy": result.accuracy, f"{target}/top1_agreement": result.top1_agreement,
                     f"{target}/max_abs_logit_diff": result.max_abs_logit_diff,
                     **{f"{target}/host_{k}": v for k, v in result.metrics.items()}})


@task(name="benchmark", task_run_name="benchmark-{artifact.target}-on-{device}", cache_policy=NO_CACHE,
      tags=["device-benchmark"])
def benchmark_on_device(artifact: CompiledArtifact, device: str, pool, params: Params, run: ReleaseRun,
                        batch=None) -> BenchmarkResult:
    """One benchmark job (and on-device evaluation, given a batch) for one device of the inventory.

    `pool` (edgeship.tasks.benchmark.BenchmarkDevices) runs it: one job at a time per device, retries, and a
    same-tag device in place of a lost one.
    """
    from edgeship.tasks.benchmark import BenchmarkJob

    stage = f"bench {artifact.target} @ {device}"
    progress().start(stage, total=1)
    result = pool.run(BenchmarkJob(artifact, device), batch)
    log_benchmark(run, result)
    progress().finish(stage, note=benchmark_note(result))
    return result


def benchmark_note(result: BenchmarkResult) -> str:
    if result.status == "ok" and result.latency_ms:
        where = result.device + (f" for {result.substitute_for}" if result.substitute_for else "")
        accuracy = f", acc {result.accuracy:.4f}" if result.accuracy is not None else ""
        return f"{where}: p50 {result.latency_ms.p50:.3f} ms, p99 {result.latency_ms.p99:.3f} ms{accuracy}"
    return f"[red]{result.device}: {result.status}: {result.error}"


def log_benchmark(run: ReleaseRun, result: BenchmarkResult, figures: bool = True) -> None:
    """A device's measurement as metrics (`<target>/<device>/p99_ms`, ...), figures and JSON.

    Figures: the latency histogram, and latency per window over the run with the device's sensors
    (a measurement reused from the cache has its figures in the run that measured it).
    """
    from edgeship.flows.figures import artifact_key, show_figure
    from edgeship.reports import FIGURE_LOCK, latency_histogram_figure, timeline_figure

    base = f"benchmarks/{result.target}/{result.device}"
    if result.status == "ok" and result.latency_ms:
        prefix = f"{result.target}/{result.device}"
        latency, sensors = result.latency_ms, result.sensors
        run.log_metrics({
            f"{prefix}/p50_ms": latency.p50, f"{prefix}/p90_ms": latency.p90, f"{prefix}/p95_ms": latency.p95,
            f"{prefix}/p99_ms": latency.p99, f"{prefix}/p999_ms": latency.p999, f"{prefix}/max_ms": latency.max,
            f"{prefix}/mean_ms": latency.mean, f"{prefix}/std_ms": latency.std,
            f"{prefix}/throughput_ips": result.throughput_ips, f"{prefix}/load_ms": result.load_ms,
            f"{prefix}/first_inference_ms": result.first_inference_ms, f"{prefix}/peak_rss_mb": result.peak_rss_mb,
            f"{prefix}/load_rss_delta_mb": result.load_rss_delta_mb, f"{prefix}/accuracy": result.accuracy,
            f"{prefix}/drift_ratio": result.drift_ratio, f"{prefix}/io_conversion_ms": result.io_conversion_ms,
            f"{prefix}/power_w": sensors.power_w if sensors else None,
            f"{prefix}/energy_per_inference_mj": sensors.energy_per_inference_mj if sensors else None,
            f"{prefix}/throttled": float(sensors.throttled) if sensors and sensors.throttled is not None else None,
        })
        for name, draw, what in (("latency_histogram", latency_histogram_figure, "latency histogram"),
                                 ("timeline", timeline_figure, "latency and sensors over the sustained run")
                                 ) if figures else ():
            with FIGURE_LOCK:
                figure = draw(result)
                if figure is not None:
                    show_figure(figure, run, f"{base}/{name}.png", artifact_key(name, result.target, result.device),
                                f"{result.target} on {result.device}: {what}")
    if result.engine_path:  # a TensorRT engine built on the device: an artifact like any other
        run.log_artifact(Path(result.engine_path), base)
    run.log_json(result.model_dump(mode="json"), f"{base}.json")


def benchmark_on_devices(artifacts: list[CompiledArtifact], data: PreparedData, params: Params, run: ReleaseRun,
                         cache=None, runner=None, devices=None) -> dict[str, list[BenchmarkResult]]:
    """Every artifact on every device that serves it: one Prefect task per (artifact, device), all submitted
    at once (to `runner`, edgeship.flows.fan_out; None: the flow's own); the pool of benchmark devices keeps
    each device to one job at a time (the agent queues jobs from other processes too). On-device accuracy on
    the test split. With a `cache` (edgeship.flows.caching.ProjectCache), a measurement of the same artifact
    on the same device with the same benchmark params is reused. `devices` (edgeship.flows.devices.DevicesStarting):
    the devices the flow started connecting earlier; None: connected here."""
    import tempfile

    from edgeship.flows.fan_out import remote, submit
    from edgeship.tasks.benchmark import BenchmarkDevices, collect_results, connected_devices, validation_batch

    with tempfile.TemporaryDirectory(prefix="edgeship-batch-") as scratch, contextlib.ExitStack() as stack:
        devices = devices.endpoints() if devices is not None else stack.enter_context(
            connected_devices(params.devices, params.benchmark))
        batch = validation_batch(data, Path(scratch), params.benchmark) if params.benchmark.evaluate else None
        pool = BenchmarkDevices(devices, params.benchmark)
        pool.probe()
        jobs, unserved = pool.plan(artifacts)
        for result in unserved:
            log_benchmark(run, result)
        task = cache.task(benchmark_on_device) if cache else benchmark_on_device
        futures = []
        for job in jobs:
            if remote(runner):
                progress().start(f"bench {job.artifact.target} @ {job.device}", total=1)
            futures.append(submit(runner, task, job.artifact, job.device, pool, params, run, batch))
        measured = []
        for job, future in zip(jobs, futures):
            try:
                result = (cache.reused(future, lambda result: reused_benchmark(run, result)) if cache
                          else future.result())
            except Exception as error:  # a bug, not a device: still a result, so the gate fails closed
                result = BenchmarkResult(target=job.artifact.target, device=job.device, runtime=job.artifact.runtime,
                                         sha256=job.artifact.sha256, status="failed",
                                         error=f"{type(error).__name__}: {error}")
            if remote(runner):
                progress().finish(f"bench {job.artifact.target} @ {job.device}", note=benchmark_note(result))
            measured.append(result)
        return collect_results(artifacts, unserved, measured, list(pool.devices))


# --- a stage's result reused from the cache: what this run's MLflow run and progress display still need --


def reused(stage: str, run: ReleaseRun, note: str = "") -> None:
    """Show the stage as done from the cache, and say so in the run's tags."""
    progress().finish(stage, note=f"[dim]cached[/]{'  ' + note if note else ''}")
    run.set_tags({"edgeship.cached." + re.sub(r"[^A-Za-z0-9_.-]+", "_", stage): "true"})  # bench_onnx-int8_local


def log_fp32_metrics(run: ReleaseRun, trained: TrainedModel) -> None:
    """fp32/val_<metric>, fp32/test_<metric> (accuracy, or a detector's map) and the task's other test metrics."""
    from edgeship.tasks.kinds import task_of

    metric = task_of(trained).metric
    run.log_metrics({f"fp32/val_{metric}": trained.val_accuracy, f"fp32/test_{metric}": trained.test_accuracy,
                     **{f"fp32/test_{k}": v for k, v in trained.metrics.items()}})


def reused_model(run: ReleaseRun, trained: TrainedModel, stage: str = "train") -> None:
    """The fp32 model comes from an earlier run (its model URI, checkpoint and epoch history are there)."""
    log_fp32_metrics(run, trained)
    run.set_tags({"edgeship.model_from_run": trained.mlflow_run_id or "unknown"})
    reused(stage, run, f"test acc {trained.test_accuracy:.4f} (run {str(trained.mlflow_run_id)[:8]})")


def reused_compile(run: ReleaseRun, outcome: CompileOutcome) -> None:
    """A reused artifact's size goes into this run too (registration logs its file as this run's model)."""
    if outcome.artifact:
        run.log_metrics({f"{outcome.target}/bytes": float(outcome.artifact.bytes)})
    reused(f"compile {outcome.target}", run, compile_note(outcome))


def reused_benchmark(run: ReleaseRun, result: BenchmarkResult) -> None:
    log_benchmark(run, result, figures=False)
    note = f"p99 {result.latency_ms.p99:.3f} ms" if result.status == "ok" and result.latency_ms else result.status
    reused(f"bench {result.target} @ {result.substitute_for or result.device}", run, note)


def needs_quantized_model(targets: list[str]) -> bool:
    return any(KNOWN_TARGETS[t].precision in ("int8", "mixed") for t in targets)


@task(name="publish-reports", cache_policy=NO_CACHE, **SERVICE_CALL)
def publish_reports(gates: list[GateReport], summaries, fp32_accuracy: float, run: ReleaseRun) -> str:
    """The gate table and accuracy/latency plot, as Prefect artifacts and MLflow artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from edgeship.flows.figures import show_figure
    from edgeship.reports import accuracy_latency_figure, target_rows
    from edgeship.tasks.gate import render_markdown

    markdown = render_markdown(gates)
    run.log_text(markdown, "gate/gate_report.md")
    run.log_json([g.model_dump(mode="json") for g in gates], "gate/gate_report.json")
    create_markdown_artifact(markdown, key="gate-report", description="Gate verdict per target and check")
    create_table_artifact(target_rows(summaries), key="release-targets",
                          description="Per target and device: size, accuracy, latency")
    show_figure(accuracy_latency_figure(summaries, fp32_accuracy), run, "reports/accuracy_vs_latency.png",
                key="accuracy-vs-latency", description="Accuracy on each target's runtime against its worst-device "
                                                       "p99 latency (green: gate passed)")
    return markdown


@task(name="register", cache_policy=NO_CACHE, **SERVICE_CALL)
def register(params: Params, trained: TrainedModel, summaries: list[TargetSummary], run: ReleaseRun,
             lineage: dict[str, str] | None = None) -> str:
    """Register the model version with its verdicts and lineage (the stages its model went through, in order),
    each compiled target as a model of the run with its measurements; alias it `candidate` when the gates pass."""
    from edgeship.registry.model_registry import register_release
    from edgeship.tasks.kinds import get_task

    tags = {}
    if lineage:
        tags = {"edgeship.lineage": " -> ".join(k for k in lineage if "." not in k),
                **{f"edgeship.lineage.{stage}": detail for stage, detail in lineage.items()}}
    metric = get_task(params.task).metric
    progress().start("register")
    version = register_release(run, params.project.name, trained.model_uri, summaries,
                               alias=params.registry.candidate_alias,
                               metrics={f"fp32_test_{metric}": trained.test_accuracy,
                                        **{f"fp32_test_{k}": v for k, v in trained.metrics.items()}}, tags=tags)
    progress().finish("register", note=f"{params.project.name} v{version}")
    return version
