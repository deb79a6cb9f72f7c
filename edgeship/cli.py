"""`edgeship`: the pipeline side's command line.

    edgeship data digits            # write scikit-learn's digits as an image folder (data/raw)
    edgeship data prepare           # image folder -> train/val/test/calibration splits (DVC's `prepare` stage)
    edgeship run --summary release.json
    edgeship promote 7 --alias production
    edgeship publish --alias production --rollout 0.1
    edgeship rollout stable --target onnx-int8 --fraction 0.5
    edgeship rollback --channel stable
    edgeship channels | resign | keys ...    # see edgeship/ota/cli.py
    edgeship check                  # validate params.yaml only
    edgeship fleet collect|status|rollout|pause|resume|abort   # the fleet loop (edgeship/fleet/cli.py)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from edgeship.errors import EdgeshipError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Release pipeline for edge ML.")
data_app = typer.Typer(no_args_is_help=True, help="Data: reference data set and split preparation.")
app.add_typer(data_app, name="data")
webhook_app = typer.Typer(no_args_is_help=True, help="Publish on promotion: the MLflow webhook receiver.")
app.add_typer(webhook_app, name="webhook")
from edgeship.fleet.cli import fleet_app  # noqa: E402 - typer and rich only; the fleet loop's commands

app.add_typer(fleet_app, name="fleet")
console = Console(stderr=True)

ParamsOption = typer.Option(Path("params.yaml"), "--params", "-p", help="params.yaml to read")
WorkdirOption = typer.Option(Path("."), "--workdir", "-C", help="project directory (holds params.yaml, dvc.yaml)")


GATE_FAILED = 3  # exit code: the release ran, a required gate failed (2: bad input; 1: a crash)


def _fail(error: Exception) -> None:
    console.print(f"[bold red]error:[/] {error}")
    raise typer.Exit(code=2)


@data_app.command("digits")
def data_digits(out: Path = typer.Option(Path("data/raw"), help="image folder to write")) -> None:
    """Write scikit-learn's digits (1,797 8x8 images, 10 classes) as out/<class>/<n>.png."""
    from edgeship.tasks.data import export_digits

    count = export_digits(out)
    console.print(f"wrote {count} images to {out}/<class>/")


@data_app.command("prepare")
def data_prepare(params: Path = ParamsOption) -> None:
    """Turn the image folder in params.data.raw_dir into splits in params.data.prepared_dir."""
    from edgeship.config import load_params
    from edgeship.tasks.data import prepare

    try:
        settings = load_params(params)
        prepared = prepare(settings.data.raw_dir, settings.data.prepared_dir, settings.data)
    except EdgeshipError as error:
        _fail(error)
    console.print(f"prepared {prepared.counts} from {len(prepared.classes)} classes into {prepared.directory}")


@app.command("check")
def check(params: Path = ParamsOption) -> None:
    """Validate params.yaml and print the resolved config."""
    from edgeship.config import load_params

    try:
        settings = load_params(params)
    except EdgeshipError as error:
        _fail(error)
    console.print_json(settings.model_dump_json())


def _quiet_prefect() -> None:
    # The rich display is the CLI's output; Prefect's own log lines would interleave with it.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no phoning home from the ephemeral API
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


@app.command("run")
def run(params: Path = ParamsOption, workdir: Path = WorkdirOption,
        summary: Optional[Path] = typer.Option(None, help="also write the release summary as JSON here")) -> None:
    """Run the whole release: data, train, QAT, compile, host check, benchmark, gate, register."""
    from edgeship.config import load_params

    try:
        load_params(workdir / params)  # fail on a bad config before anything starts
    except EdgeshipError as error:
        _fail(error)
    _quiet_prefect()
    from edgeship.flows.release import release
    from edgeship.progress import RichProgress, reporting

    try:
        with RichProgress(console) as display, reporting(display):
            result = release(params_path=str(params), workdir=str(workdir),
                             summary_path=str(summary.resolve()) if summary else None)
    except EdgeshipError as error:
        _fail(error)
    _print_summary(result)
    raise typer.Exit(code=0 if result.passed else GATE_FAILED)


def _print_summary(summary) -> None:
    table = Table(title=f"{summary.model_name} v{summary.model_version}  (fp32 test accuracy "
                        f"{summary.fp32_test_accuracy:.4f})")
    for column in ("target", "size", "accuracy", "device", "p50 ms", "p99 ms", "gate"):
        table.add_column(column)
    for target in summary.targets:
        size = f"{target.artifact.bytes / 1e3:.0f} kB" if target.artifact else "—"
        accuracy = target.host_check.accuracy if target.host_check else None
        for bench in target.benchmarks or [None]:
            latency = bench.latency_ms if bench else None
            failed = [f"{c.name}: {c.reason or c.measured}" for c in target.gate.checks if not c.passed]
            table.add_row(target.target, size, f"{accuracy:.4f}" if accuracy is not None else "—",
                          bench.device if bench else "—", f"{latency.p50:.3f}" if latency else "—",
                          f"{latency.p99:.3f}" if latency else "—",
                          _verdict(target.gate, failed))
    Console().print(table)
    verdict = "[green]PASSED: alias " + ", ".join(summary.aliases) if summary.passed else "[red]FAILED the gate"
    Console().print(f"release {verdict}[/]  (MLflow run {summary.run_id})")


def _verdict(gate, failed: list[str]) -> str:
    from edgeship.tasks.gate import flags

    if not gate.passed:
        return "[red]FAIL " + "; ".join(failed)
    notes = flags(gate)  # int8 bigger or slower than its float sibling: passed, but worth saying
    return "[yellow]pass, flagged: " + "; ".join(notes) if notes else "[green]pass"


@app.command("serve")
def serve(workdir: Path = WorkdirOption, params: Path = ParamsOption,
          cron: Optional[str] = typer.Option("0 3 * * 1", help="retraining schedule (cron); '' for none")) -> None:
    """Register the release/publish/rollback deployments with the Prefect server and run them here."""
    import prefect

    from edgeship.flows.deployments import deployments

    if not os.environ.get("PREFECT_API_URL"):
        _fail(EdgeshipError("PREFECT_API_URL is not set; start a server (infra/local-stack.sh start) and "
                            "export PREFECT_API_URL=http://127.0.0.1:4200/api"))
    prefect.serve(*deployments(workdir, cron or None, str(params)))


def _webhook_secret(secret_env: str) -> str:
    secret = os.environ.get(secret_env)
    if not secret:
        _fail(EdgeshipError(f"${secret_env} is empty; set it to the secret shared with the MLflow webhook "
                            f"(e.g. export {secret_env}=$(openssl rand -hex 32))"))
    return secret


@webhook_app.command("serve")
def webhook_serve(params: Path = ParamsOption, workdir: Path = WorkdirOption,
                  host: str = typer.Option("127.0.0.1"), port: int = typer.Option(8787),
                  alias: str = typer.Option("production", help="alias whose creation publishes"),
                  deployment: Optional[str] = typer.Option(None, help="run this Prefect deployment (e.g. "
                                                           "publish/publish) instead of publishing in-process"),
                  secret_env: str = typer.Option("EDGESHIP_WEBHOOK_SECRET", help="env var holding the secret")
                  ) -> None:
    """Receive MLflow's signed alias deliveries and publish the promoted version."""
    import uvicorn

    from edgeship.config import load_params
    from edgeship.flows.webhook import (DeliveryStore, WatchedAlias, create_app, publish_in_process,
                                        publish_via_deployment)

    try:
        settings = load_params(workdir / params)
    except EdgeshipError as error:
        _fail(error)
    watched = WatchedAlias(settings.project.name, alias, _webhook_secret(secret_env))
    handler = publish_via_deployment(deployment) if deployment else publish_in_process(workdir, str(params))
    store = DeliveryStore(workdir / ".edgeship" / "webhook-deliveries.sqlite")  # survives restarts
    uvicorn.run(create_app(watched, handler, store), host=host, port=port, log_level="info")


@webhook_app.command("register")
def webhook_register(url: str = typer.Option(..., help="this receiver's URL, e.g. http://127.0.0.1:8787/webhooks/mlflow"),
                     secret_env: str = typer.Option("EDGESHIP_WEBHOOK_SECRET")) -> None:
    """Create the webhook in the MLflow server named by MLFLOW_TRACKING_URI."""
    from edgeship.flows.webhook import register_webhook

    tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not tracking.startswith("http"):
        _fail(EdgeshipError("webhooks need an MLflow server with a SQL backend; export MLFLOW_TRACKING_URI="
                            "http://HOST:PORT (infra/local-stack.sh start starts one)"))
    console.print(f"webhook {register_webhook(tracking, url, _webhook_secret(secret_env))} -> {url}")


from edgeship.ota.cli import register as _register_ota  # noqa: E402  (after _fail/_quiet_prefect exist)

_register_ota(app, _fail, _quiet_prefect)


def main() -> None:
    """Console script entry point."""
    sys.exit(app())


if __name__ == "__main__":
    main()
