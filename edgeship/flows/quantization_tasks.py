"""The release flow's quantization tasks: distillation, sensitivity, precision plan, QAT on the plan, PTQ baseline.

Thin Prefect wrappers, like `release_tasks`: each calls a plain stage function
(edgeship.tasks.distill / sensitivity / precision_plan / qat / ptq), reports
progress, logs metrics, JSON and figures to the release's MLflow run (under
`quantization/`), and publishes tables as Prefect artifacts. Records and paths go
in and out, never tensors.

    trained = distill_model(params, data, out_dir, run)          # or release_tasks.train_model
    report = analyze_sensitivity(params, trained, data, out_dir, run)
    plan = plan_precision(params, trained, data, report, run)
    quantized = quantize_on_plan(params, trained, data, plan, out_dir, run)
    baseline = ptq_baseline(params, trained, data, out_dir, run)
    compare_quantization(trained, baseline, quantized, run)
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from edgeship.config import Params
from edgeship.flows.release_tasks import epoch_logger
from edgeship.progress import progress
from edgeship.records import PrecisionPlan, PreparedData, QuantizedModel, SensitivityReport, TrainedModel
from edgeship.registry.tracking import ReleaseRun

PREFIX = "quantization"


@task(name="distillation", cache_policy=NO_CACHE)
def distill_model(params: Params, data: PreparedData, out_dir: Path, run: ReleaseRun) -> TrainedModel:
    """Train the teacher (or load it from MLflow), then the model from it; logged as a run nested in the release.

    The distilled model is logged to the release run as its fp32 model, like the `train` task does.
    """
    from edgeship.registry.model_registry import log_torch_model
    from edgeship.tasks.data import load_split
    from edgeship.tasks.distill import agreement, distill, load_teacher
    from edgeship.tasks.train import evaluate, load_model, train

    settings = params.distillation
    child = run.nested("distillation", {"edgeship.stage": "distillation"})
    try:
        child.log_params({"distillation": settings.model_dump(mode="json"), "model": params.model.model_dump(),
                          "train": params.train.model_dump()})
        if settings.teacher_uri:
            teacher_model, teacher_name = load_teacher(settings.teacher_uri, run.tracking_uri), settings.teacher_uri
        else:
            epochs = settings.teacher_epochs or params.train.epochs
            teacher_train = params.train.model_copy(update={"epochs": epochs})
            teacher = train(data, settings.teacher, teacher_train, Path(out_dir) / "teacher",
                            on_epoch=epoch_logger(child, "teacher", epochs))
            teacher_model, teacher_name = load_model(teacher), settings.teacher.factory
            child.log_metrics({"teacher/best_val_accuracy": teacher.val_accuracy})
            progress().finish("teacher", note=f"test acc {teacher.test_accuracy:.4f}")
        x_test, y_test = load_split(data, "test")
        child.log_metrics({"teacher/test_accuracy": evaluate(teacher_model, x_test, y_test)})
        student = distill(data, params.model, params.train, settings, teacher_model, Path(out_dir),
                          on_epoch=epoch_logger(child, "student", params.train.epochs), teacher_name=teacher_name)
        child.log_metrics({"student/best_val_accuracy": student.val_accuracy,
                           "student/test_accuracy": student.test_accuracy,
                           "student/teacher_agreement": agreement(load_model(student), teacher_model, x_test)})
        child.finish()
    except BaseException:
        child.finish("FAILED")
        raise
    run.log_metrics({"fp32/val_accuracy": student.val_accuracy, "fp32/test_accuracy": student.test_accuracy})
    run.set_tags({"edgeship.distillation_run": child.run_id, "edgeship.teacher": teacher_name})
    model_uri = log_torch_model(run, load_model(student), x_test[:1])
    progress().finish("student", note=f"test acc {student.test_accuracy:.4f} (distilled)")
    return student.model_copy(update={"mlflow_run_id": run.run_id, "model_uri": model_uri})


@task(name="sensitivity-analysis", cache_policy=NO_CACHE)
def analyze_sensitivity(params: Params, trained: TrainedModel, data: PreparedData, out_dir: Path,
                        run: ReleaseRun) -> SensitivityReport:
    """Per-layer sensitivity and ONNX Runtime costs: a table and a bar chart in MLflow and Prefect."""
    from prefect.artifacts import create_table_artifact

    from edgeship.flows.figures import show_figure
    from edgeship.tasks.sensitivity import analyze_sensitivity as analyze
    from edgeship.tasks.sensitivity import sensitivity_figure, sensitivity_rows

    stage = "sensitivity"
    progress().start(stage, total=None)
    report = analyze(trained, data, params.sensitivity, params.qat, Path(out_dir) / "sensitivity",
                     on_layer=lambda done, total, layer: progress().advance(stage, note=f"{done}/{total} {layer}"))
    rows = sensitivity_rows(report)
    run.log_json(report.model_dump(mode="json"), f"{PREFIX}/sensitivity.json")
    show_figure(sensitivity_figure(report), run, f"{PREFIX}/sensitivity.png", key="sensitivity-chart",
                description="Val accuracy drop with only that layer int8, most sensitive first")
    run.log_metrics({f"{stage}/fp32_val_accuracy": report.fp32_val_accuracy,
                     f"{stage}/int8_val_accuracy": report.int8_val_accuracy,
                     f"{stage}/int8_sqnr_db": report.int8_sqnr_db,
                     f"{stage}/int8_latency_ms": report.int8_latency_ms,
                     f"{stage}/fp32_latency_ms": report.fp32_latency_ms})
    create_table_artifact(rows, key="sensitivity",
                          description="Per-layer int8 sensitivity, most sensitive first: val accuracy drop and "
                                      "logits SQNR with only that layer int8; ONNX Runtime ms in int8, in float, "
                                      "and the cost of keeping only it float")
    progress().finish(stage, note=f"most sensitive: {', '.join(report.ranking()[:3])}")
    return report


@task(name="precision-plan", cache_policy=NO_CACHE)
def plan_precision(params: Params, trained: TrainedModel, data: PreparedData, report: SensitivityReport,
                   run: ReleaseRun) -> PrecisionPlan:
    """The mixed-precision plan for the accuracy budget; the plan (JSON) and the Pareto plot go to MLflow."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from edgeship.flows.figures import show_figure
    from edgeship.tasks.precision_plan import pareto_figure, plan_rows
    from edgeship.tasks.precision_plan import plan_precision as plan_for

    stage = "precision plan"
    progress().start(stage, total=None)
    plan = plan_for(trained, data, report, params.precision, params.qat, max_samples=params.sensitivity.max_samples,
                    latency_runs=params.sensitivity.latency_runs,
                    on_step=lambda c: progress().advance(stage, note=f"{len(c.float_layers)} float, "
                                                                     f"val {c.val_accuracy:.4f}"))
    run.log_json(plan.model_dump(mode="json"), f"{PREFIX}/precision_plan.json")
    show_figure(pareto_figure(plan), run, f"{PREFIX}/pareto.png", key="precision-plan-pareto",
                description="Accuracy against latency of every plan the search evaluated, and the frontier")
    run.log_metrics({"plan/float_layers": float(len(plan.float_layers)),
                     "plan/int8_layers": float(len(plan.int8_layers)),
                     "plan/predicted_val_accuracy": plan.predicted_val_accuracy,
                     "plan/predicted_latency_ms": plan.predicted_latency_ms,
                     "plan/measured_latency_ms": plan.measured_latency_ms,
                     "plan/meets_budget": float(plan.meets_budget)})
    create_table_artifact(plan_rows(plan), key="precision-plan-candidates",
                          description="Every plan the search evaluated (both strategies): float layers, simulated "
                                      "val accuracy, predicted and measured ONNX Runtime latency")
    create_markdown_artifact(render_plan(plan), key="precision-plan", description="The mixed-precision plan")
    note = f"{len(plan.float_layers)} float of {len(plan.layers)}"
    if not plan.meets_budget:
        note += " [red](over budget)"
    progress().finish(stage, note=note)
    return plan


@task(name="quantization-aware-training", cache_policy=NO_CACHE)
def quantize_on_plan(params: Params, trained: TrainedModel, data: PreparedData, plan: PrecisionPlan | None,
                     out_dir: Path, run: ReleaseRun) -> QuantizedModel:
    """QAT on the plan (every layer int8 without one), exported as QDQ ONNX with float islands; logs the
    integer and float kernel counts ONNX Runtime runs after its graph optimization."""
    from edgeship.tasks.qat import quantization_aware_train

    layers = dict(plan.layers) if plan else dict(params.precision.pinned)  # a plan has honoured the pins already
    quantized = quantization_aware_train(trained, data, params.qat, out_dir, plan=layers,
                                         on_epoch=epoch_logger(run, "qat", params.qat.epochs))
    run.log_metrics({"qat/val_accuracy": quantized.val_accuracy, "qat/test_accuracy": quantized.test_accuracy,
                     "qat/onnx_val_accuracy": quantized.onnx_val_accuracy,
                     "qat/onnx_test_accuracy": quantized.onnx_test_accuracy,
                     "qat/integer_ops": float(sum(quantized.integer_ops.values())),
                     "qat/float_compute_ops": float(sum(quantized.float_ops.values())),
                     "qat/float_layers": float(list(quantized.layer_precisions.values()).count("float")),
                     "qat/epochs_run": float(quantized.epochs_run or 0)})
    run.log_json(quantized.integer_ops, "qat/integer_ops.json")
    run.log_json({"integer_ops": quantized.integer_ops, "float_ops": quantized.float_ops,
                  "layer_precisions": quantized.layer_precisions, "float_layers": quantized.float_layers},
                 f"{PREFIX}/qat_ops.json")
    progress().finish("qat", note=f"ORT test acc {quantized.onnx_test_accuracy:.4f}, "
                                  f"{sum(quantized.integer_ops.values())} int8 kernels")
    return quantized


@task(name="ptq-baseline", cache_policy=NO_CACHE)
def ptq_baseline(params: Params, trained: TrainedModel, data: PreparedData, out_dir: Path, run: ReleaseRun
                 ) -> QuantizedModel | None:
    """ONNX Runtime static quantization of the fp32 model: the comparison row for QAT. A failure is logged, not
    raised (the baseline is evidence, not a release artifact)."""
    from edgeship.errors import EdgeshipError
    from edgeship.tasks.ptq import post_training_quantize

    progress().start("ptq", total=1)
    try:
        baseline = post_training_quantize(trained, data, params.ptq, Path(out_dir) / "ptq")
    except EdgeshipError as error:
        run.set_tags({"edgeship.ptq": f"failed: {str(error)[:4000]}"})
        progress().finish("ptq", note=f"[red]failed: {error}")
        return None
    run.log_metrics({"ptq/val_accuracy": baseline.val_accuracy, "ptq/test_accuracy": baseline.test_accuracy,
                     "ptq/integer_ops": float(sum(baseline.integer_ops.values())),
                     "ptq/bytes": float(Path(baseline.onnx_path).stat().st_size)})
    progress().finish("ptq", note=f"ORT test acc {baseline.test_accuracy:.4f}")
    return baseline


@task(name="quantization-comparison", cache_policy=NO_CACHE)
def compare_quantization(trained: TrainedModel, baseline: QuantizedModel | None, quantized: QuantizedModel | None,
                         run: ReleaseRun) -> list[dict]:
    """fp32 / PTQ / QAT side by side (test accuracy, size, kernels), as a Prefect table and MLflow JSON."""
    from prefect.artifacts import create_table_artifact

    rows = comparison_rows(trained, baseline, quantized)
    run.log_json(rows, f"{PREFIX}/comparison.json")
    create_table_artifact(rows, key="quantization-comparison",
                          description="What QAT bought: fp32, the PTQ baseline and QAT on the plan, on the test split")
    return rows


def comparison_rows(trained: TrainedModel, baseline: QuantizedModel | None, quantized: QuantizedModel | None
                    ) -> list[dict]:
    rows = [{"model": "fp32 (PyTorch)", "test_accuracy": round(trained.test_accuracy, 4),
             "drop_pts": 0.0, "bytes": Path(trained.checkpoint).stat().st_size, "integer_kernels": 0}]
    for name, model in (("PTQ (ONNX Runtime static)", baseline), ("QAT on the plan", quantized)):
        if model is None:
            continue
        accuracy = model.onnx_test_accuracy if model.onnx_test_accuracy is not None else model.test_accuracy
        rows.append({"model": name, "test_accuracy": round(accuracy, 4),
                     "drop_pts": round(100 * (trained.test_accuracy - accuracy), 2),
                     "bytes": Path(model.onnx_path).stat().st_size,
                     "integer_kernels": sum(model.integer_ops.values())})
    return rows


def render_plan(plan: PrecisionPlan) -> str:
    """The plan as markdown: budget, verdict, predicted numbers, float layers."""
    latency = plan.measured_latency_ms if plan.measured_latency_ms is not None else plan.predicted_latency_ms
    lines = [f"# Mixed-precision plan ({plan.strategy})", "",
             f"- budget: at most {100 * plan.allowed_drop:.2f} points below fp32 val "
             f"{100 * plan.fp32_val_accuracy:.2f}% -> **{'met' if plan.meets_budget else 'NOT met'}**",
             f"- predicted val accuracy (simulated int8, before QAT): {100 * plan.predicted_val_accuracy:.2f}%",
             f"- int8 layers: {len(plan.int8_layers)}, float layers: {len(plan.float_layers)}"]
    if latency is not None:
        lines.append(f"- latency on ONNX Runtime (1 thread): {latency:.4f} ms (all int8 {plan.int8_latency_ms:.4f} ms, "
                     f"fp32 {plan.fp32_latency_ms:.4f} ms)")
    if plan.float_layers:
        lines += ["", "| float layer |", "| --- |"] + [f"| {name} |" for name in plan.float_layers]
    return "\n".join(lines) + "\n"
