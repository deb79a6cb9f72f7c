"""The release flow's pruning task: the ratio search as a run nested in the release, its table, plot and choice.

A thin Prefect wrapper, like `quantization_tasks`: it calls `edgeship.tasks.prune_search.search_pruning`,
logs each candidate (ratio, params, MACs, size, val/test accuracy, ONNX Runtime latency) to a nested MLflow
run, and to the release run the plot (`pruning/pruning.png`), the table and the chosen architecture
(`pruning/report.json`), and a Prefect table and markdown artifact. The chosen model is logged as the
release's fp32 model: sensitivity, the plan, QAT and every target start from it.

    pruned, lineage = prune(params, trained, data, out_dir, run)    # after train_model / distill_model
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from edgeship.config import Params
from edgeship.flows.release_tasks import epoch_logger
from edgeship.progress import progress
from edgeship.records import PreparedData, PruningReport, TrainedModel
from edgeship.registry.tracking import ReleaseRun

PREFIX = "pruning"


@task(name="pruning", cache_policy=NO_CACHE)
def prune(params: Params, trained: TrainedModel, data: PreparedData, out_dir: Path, run: ReleaseRun
          ) -> tuple[TrainedModel, str]:
    """Search the pruning ratio and log it; return the chosen model (the unpruned one when none kept the budget)
    and a line saying what was pruned, for the model version's lineage."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from edgeship.flows.figures import show_figure
    from edgeship.registry.model_registry import log_torch_model
    from edgeship.tasks.data import load_split
    from edgeship.tasks.prune_search import pruning_figure, pruning_rows, search_pruning
    from edgeship.tasks.train import load_model

    settings = params.pruning
    child = run.nested("pruning", {"edgeship.stage": "pruning"})
    stage = "pruning"
    progress().start(stage, total=len(settings.candidates()) + 1)

    def on_candidate(candidate) -> None:
        step = int(round(100 * candidate.ratio))
        child.log_metrics({"val_accuracy": candidate.val_accuracy, "test_accuracy": candidate.test_accuracy,
                           "latency_ms": candidate.latency_ms, "macs": float(candidate.macs),
                           "params": float(candidate.params), "bytes": float(candidate.bytes)}, step=step)
        progress().advance(stage, note=f"ratio {candidate.ratio:g}: val {candidate.val_accuracy:.4f}, "
                                       f"{candidate.latency_ms or 0:.3f} ms")

    try:
        child.log_params({"pruning": settings.model_dump(mode="json")})
        report = search_pruning(trained, data, settings, params.train, Path(out_dir) / "pruning",
                                on_candidate=on_candidate,
                                on_epoch=epoch_logger(child, "fine-tune", settings.fine_tune_epochs))
        child.finish()
    except BaseException:
        child.finish("FAILED")
        raise
    rows = pruning_rows(report)
    run.log_json(report.model_dump(mode="json", exclude={"model"}), f"{PREFIX}/report.json")
    run.log_json(rows, f"{PREFIX}/candidates.json")
    show_figure(pruning_figure(report), run, f"{PREFIX}/pruning.png", key="pruning-chart",
                description="Accuracy, latency, size and MACs per pruning ratio")
    chosen = report.chosen
    run.log_metrics({"pruning/chosen_ratio": report.chosen_ratio, "pruning/meets_budget": float(report.meets_budget),
                     "pruning/speedup": chosen.speedup, "pruning/macs": float(chosen.macs),
                     "pruning/params": float(chosen.params),
                     "pruning/val_drop_points": 100 * (report.baseline.val_accuracy - chosen.val_accuracy)})
    run.set_tags({"edgeship.pruning_run": child.run_id, "edgeship.pruning": lineage(report)})
    create_table_artifact(rows, key="pruning-candidates",
                          description="Each pruning ratio after fine-tuning: params, MACs, size, val/test accuracy, "
                                      "ONNX Runtime fp32 latency (1 thread) and speedup over the unpruned model")
    create_markdown_artifact(render_report(report), key="pruning", description="The pruning search's choice")
    if not report.meets_budget:
        progress().finish(stage, note=f"[red]no ratio within {settings.max_drop_points} points: unpruned")
        return trained, lineage(report)
    model = report.model.model_copy(update={"mlflow_run_id": run.run_id})
    run.log_metrics({"fp32/val_accuracy": model.val_accuracy, "fp32/test_accuracy": model.test_accuracy})
    model_uri = log_torch_model(run, load_model(model), load_split(data, "test")[0][:1])
    progress().finish(stage, note=f"ratio {report.chosen_ratio:g}: {chosen.speedup or 0:.2f}x, "
                                  f"test acc {model.test_accuracy:.4f}")
    return model.model_copy(update={"model_uri": model_uri}), lineage(report)


def lineage(report: PruningReport) -> str:
    """One line for the model version's tags: what was pruned, how, and what it cost."""
    if not report.meets_budget:
        return f"none ({report.importance}: no ratio kept {report.allowed_drop_points} points)"
    chosen = report.chosen
    return (f"{report.importance} {report.scope} ratio {report.chosen_ratio:g}: MACs {chosen.macs} of "
            f"{report.baseline.macs}, val {chosen.val_accuracy:.4f} vs {report.baseline.val_accuracy:.4f}")


def render_report(report: PruningReport) -> str:
    lines = [f"# Pruning ({report.importance}, {report.scope})", "",
             f"- budget: at most {report.allowed_drop_points:g} val points below the unpruned model "
             f"({100 * report.baseline.val_accuracy:.2f}%) -> **{'met' if report.meets_budget else 'NOT met'}**",
             f"- chosen ratio: {report.chosen_ratio:g}" + ("" if report.meets_budget else " (the unpruned model)")]
    if report.architecture:
        lines += ["", "| module | pruned shape |", "| --- | --- |"]
        lines += [f"| {name} | {', '.join(f'{k}={v}' for k, v in attrs.items())} |"
                  for name, attrs in report.architecture.items()]
    return "\n".join(lines) + "\n"
