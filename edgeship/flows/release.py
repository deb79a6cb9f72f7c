"""The release flow: data -> train (or distill) -> prune (optional) -> sensitivity -> precision plan -> QAT -> compile per
target -> host check -> device benchmark -> gate -> register.

Each model stage starts from the previous one's model, and the chain is recorded on the model version
(`edgeship.lineage` and one `edgeship.lineage.<stage>` tag per stage).

Reads like the pipeline it runs; each step is a task in `release_tasks`, each task
a thin wrapper over a plain stage function. Started by `edgeship run`, by a
Prefect deployment on a schedule, or from the Prefect UI with parameters.

    >>> summary = release(params_path="params.yaml", workdir=".")
    >>> summary.passed, summary.model_version
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from prefect import flow, get_run_logger

from edgeship.config import load_params
from edgeship.flows import pruning_tasks, quantization_tasks, release_tasks
from edgeship.flows.caching import ProjectCache
from edgeship.flows.devices import DevicesStarting
from edgeship.flows.fan_out import fan_out
from edgeship.progress import PrefectProgress, listening, reporting
from edgeship.records import ReleaseSummary, TargetSummary
from edgeship.registry.tracking import ReleaseRun
from edgeship.tasks.data_version import Reproduction
from edgeship.tasks.gate import earns_its_place, evaluate_gate, float_sibling, release_passes
from edgeship.tasks import field_data
from edgeship.tasks.kinds import get_task


@flow(name="release", log_prints=True)
def release(params_path: str = "params.yaml", workdir: str = ".", summary_path: str | None = None,
            reason: str | None = None, fresh: bool = False) -> ReleaseSummary:
    """Run the whole release on the project in `workdir`; register a version, alias it when the gates pass.

    `reason` says why this run was started (the rollout controller's drift trigger names the drift it saw).
    Stages whose inputs did not change since an earlier run are reused from the project's cache
    (edgeship.flows.caching); `fresh=True` recomputes every stage.
    """
    root = Path(workdir).resolve()
    params = load_params(root / params_path)
    if str(root) not in sys.path:  # the project's own modules (a model factory) import as they do from a script
        sys.path.insert(0, str(root))
    with contextlib.ExitStack() as started:
        # Slow starts begin first and run while the cache and the MLflow run are set up: DVC (a process of its
        # own, ~2 s even when nothing changed) and the loopback device agents (wanted only at the benchmarks).
        preparing = Reproduction(root)
        started.callback(preparing.cancel)  # a no-op once DVC is done
        devices = DevicesStarting(params.devices, params.benchmark)
        started.callback(devices.close)
        cache = ProjectCache.open(root, fresh)
        run = ReleaseRun.start(params.registry, root, run_name=f"release-{params.project.name}",
                               tags={"edgeship.flow": "release",
                                     **({"edgeship.reason": reason[:5000]} if reason else {})})
        out_dir = root / ".edgeship" / "runs" / run.run_id
        out_dir.mkdir(parents=True, exist_ok=True)
        # Started where no terminal shows progress (a deployment, the Prefect UI): long stages as progress artifacts.
        shown = contextlib.nullcontext() if listening() else reporting(PrefectProgress(prefix="release"))
        try:
            run.log_params(params.model_dump(mode="json"))
            with shown:
                summary = _release(root, params, run, out_dir, cache, preparing, devices)
        except BaseException:
            run.finish("FAILED")
            raise
    run.log_json(summary.model_dump(mode="json"), "release_summary.json")
    run.finish()
    if summary_path:
        (root / summary_path).write_text(summary.model_dump_json(indent=2))
    get_run_logger().info("release %s v%s: %s", summary.model_name, summary.model_version,
                          "PASSED" if summary.passed else "FAILED GATE")
    return summary


def _quantize(params, trained, data, out_dir: Path, run: ReleaseRun, lineage: dict[str, str], cache: ProjectCache):
    """Sensitivity -> mixed-precision plan -> QAT on the plan; PTQ alongside, as the row QAT must beat."""
    plan = None
    if params.sensitivity.enabled:
        report = cache.call(quantization_tasks.analyze_sensitivity, params, trained, data, out_dir, run,
                            on_reuse=lambda _: release_tasks.reused("sensitivity", run))
        plan = cache.call(quantization_tasks.plan_precision, params, trained, data, report, run,
                          on_reuse=lambda _: release_tasks.reused("precision plan", run))
        lineage["plan"] = f"{len(plan.float_layers)} float of {len(plan.layers)} layers ({plan.strategy})"
    quantized = cache.call(quantization_tasks.quantize_on_plan, params, trained, data, plan, out_dir, run,
                           on_reuse=lambda _: release_tasks.reused("qat", run))
    lineage["qat"] = f"{params.qat.epochs} epochs, {len(quantized.float_layers)} float layers"
    baseline = None
    if params.ptq.enabled:
        baseline = cache.call(quantization_tasks.ptq_baseline, params, trained, data, out_dir, run,
                              on_reuse=lambda _: release_tasks.reused("ptq", run))
    quantization_tasks.compare_quantization(trained, baseline, quantized, run)
    return quantized


def _release(root: Path, params, run: ReleaseRun, out_dir: Path, cache: ProjectCache, preparing=None,
             devices=None) -> ReleaseSummary:
    data = release_tasks.prepare_data(root, params, run, preparing)
    lineage: dict[str, str] = {}
    if params.field_data.use and params.task == "classification":  # samples the devices uploaded
        release_tasks.pull_field_samples(params, root, run)
        data = field_data.with_field_split(data, root / params.field_data.dir, out_dir)
        if "field_train" in data.counts:
            lineage["field"] = f"{data.counts['field_train']} train, {data.counts['field_test']} test ({data.dvc_hash})"
    if params.distillation.enabled:
        trained = cache.call(quantization_tasks.distill_model, params, data, out_dir, run,
                             on_reuse=lambda model: release_tasks.reused_model(run, model, "student"))
        lineage["distill"] = f"from {trained.teacher}"
    else:
        trained = cache.call(release_tasks.train_model, params, data, out_dir, run,
                             on_reuse=lambda model: release_tasks.reused_model(run, model))
        lineage["train"] = f"{params.train.epochs} epochs"
    if params.pruning.enabled:
        unpruned = trained
        trained, lineage["prune"] = pruning_tasks.prune(params, trained, data, out_dir, run)
        if trained.checkpoint != unpruned.checkpoint:
            lineage["prune.from"] = unpruned.model_uri or str(unpruned.checkpoint)
    field_accuracy = field_data.field_test_accuracy(trained, data)
    if field_accuracy is not None:  # lab test and field test, reported apart
        run.log_metrics({"field_test_accuracy": field_accuracy})
    quantized = None
    if release_tasks.needs_quantized_model(params.targets):
        quantized = _quantize(params, trained, data, out_dir, run, lineage, cache)

    with fan_out(params.task_runner, len(params.targets), root) as runner:  # threads, or a Dask cluster
        outcomes = release_tasks.compile_targets(params, trained, quantized, data, out_dir, run, cache, runner)
        artifacts = [o.artifact for o in outcomes.values() if o.artifact]

        reference = cache.call(release_tasks.reference_logits, trained, data, out_dir)
        host_checks = {a.target: cache.call(release_tasks.check_on_host, a, data, reference, run,
                                            params.ota.golden_count,
                                            on_reuse=lambda result, a=a: release_tasks.log_host_check(run, a, result))
                       for a in artifacts}

        benchmarks = release_tasks.benchmark_on_devices(artifacts, data, params, run, cache, runner, devices)

    summaries = []
    for target in params.targets:
        outcome = outcomes[target]
        measured = benchmarks.get(target, [])
        on_device = [b.accuracy for b in measured if b.accuracy is not None]
        gate = evaluate_gate(target, params.gate_for(target), trained.test_accuracy, outcome.artifact,
                             host_checks.get(target), measured, device_accuracy=min(on_device, default=None),
                             compile_error=outcome.error, metric=get_task(params.task).metric)
        sibling = float_sibling(target, params.targets)
        if sibling:  # int8 earns its place: smaller and faster than the float target on the same runtime
            gate = earns_its_place(gate, params.gate_for(target), outcome.artifact, measured, sibling,
                                   outcomes[sibling].artifact, benchmarks.get(sibling, []))
        summaries.append(TargetSummary(target=target, artifact=outcome.artifact, host_check=host_checks.get(target),
                                       benchmarks=benchmarks.get(target, []), gate=gate, error=outcome.error))
    gates = [s.gate for s in summaries]
    release_tasks.publish_reports(gates, summaries, trained.test_accuracy, run)

    version = release_tasks.register(params, trained, summaries, run, lineage=lineage)
    passed = release_passes(gates)
    return ReleaseSummary(model_name=params.project.name, model_version=version, run_id=run.run_id,
                          fp32_test_accuracy=trained.test_accuracy, data_hash=data.dvc_hash, targets=summaries,
                          passed=passed, aliases=[params.registry.candidate_alias] if passed else [],
                          task=params.task, fp32_metrics=trained.metrics, fp32_field_test_accuracy=field_accuracy)
