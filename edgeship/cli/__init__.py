"""`edgeship`: the pipeline side's command line, in the order of a release's journey.

    edgeship data digits            # write scikit-learn's digits as an image folder (data/raw)
    edgeship data prepare           # image folder -> train/val/test/calibration splits (DVC's `prepare` stage)
    edgeship data field             # the devices' uploaded field samples -> the field split (data/field, DVC)
    edgeship check                  # validate params.yaml only
    edgeship run --summary release.json
    edgeship status                 # registered versions, gate verdicts, aliases; what each OTA channel ships
    edgeship promote 7 --alias production
    edgeship publish --alias production --rollout 0.1
    edgeship rollout stable --target onnx-int8 --fraction 0.5
    edgeship rollback --channel stable
    edgeship channels | resign | keys ...    # see edgeship/cli/ota.py
    edgeship serve                  # the deployments, on a Prefect server
    edgeship webhook serve          # publish when MLflow says `production` moved
    edgeship fleet collect|status|rollout|pause|resume|abort   # the fleet loop (edgeship/cli/fleet.py)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from edgeship.cli.base import (ParamsOption, WorkdirOption, console, fail, guarded, load_settings, print_json,
                               root_options, stdout)
from edgeship.errors import EdgeshipError, ExitCode, exit_code_for

JOURNEY = ("data", "check", "run", "status", "promote", "publish", "rollback", "serve", "webhook")


class JourneyGroup(TyperGroup):
    """Lists commands in the order a release goes through them (then any others), not alphabetically."""

    def list_commands(self, ctx) -> list[str]:
        names = list(self.commands)
        return sorted(names, key=lambda name: JOURNEY.index(name) if name in JOURNEY else len(JOURNEY))


app = typer.Typer(cls=JourneyGroup, no_args_is_help=True,  # --install-completion / --show-completion: typer's
                  help="Release pipeline for edge ML, from data to devices: `data digits` (or your own image "
                       "folder), `check`, `run` (train, quantize, compile, benchmark, gate, register), `status`, "
                       "`promote`, `publish` (signed OTA), `rollback`; `serve` and `webhook` run the same on a "
                       "Prefect server and publish on promotion.")
data_app = typer.Typer(no_args_is_help=True, help="Data: reference data set and split preparation.")
app.add_typer(data_app, name="data")
webhook_app = typer.Typer(no_args_is_help=True, help="Publish on promotion: the MLflow webhook receiver.")
app.add_typer(webhook_app, name="webhook")
from edgeship.cli.fleet import fleet_app  # noqa: E402 - typer and rich only; the fleet loop's commands

app.add_typer(fleet_app, name="fleet")
app.callback()(root_options)  # --version, -v/--log-level (edgeship/cli/base.py)


@data_app.command("digits")
def data_digits(out: Path = typer.Option(Path("data/raw"), help="image folder to write")) -> None:
    """Write scikit-learn's digits (1,797 8x8 images, 10 classes) as out/<class>/<n>.png."""
    from edgeship.tasks.data import export_digits

    count = export_digits(out)
    console.print(f"wrote {count} images to {out}/<class>/")


@data_app.command("shapes")
def data_shapes(out: Path = typer.Option(Path("data/raw"), help="folder to write (images/ and annotations.json)"),
                count: int = typer.Option(2000, min=3, help="images"),
                size: int = typer.Option(128, min=16, help="image side, pixels"),
                seed: int = typer.Option(0, help="the same seed writes the same bytes")) -> None:
    """Write the reference detection set: RGB images of circles, squares, triangles and crosses, boxes exact (COCO)."""
    from edgeship.tasks.detection.shapes import CLASSES, export_shapes

    written = export_shapes(out, count=count, size=size, seed=seed)
    console.print(f"wrote {written} images of {', '.join(CLASSES)} to {out}/images/ with {out}/annotations.json")


@data_app.command("prepare")
def data_prepare(params: Path = ParamsOption) -> None:
    """Turn the data in params.data.raw_dir (class folders; COCO or YOLO annotations for task: detection) into
    splits in params.data.prepared_dir."""
    from edgeship.config import load_params
    from edgeship.tasks.kinds import get_task

    try:
        settings = load_params(params)
        prepared = get_task(settings.task).prepare(settings.data.raw_dir, settings.data.prepared_dir, settings.data)
    except EdgeshipError as error:
        fail(error)
    console.print(f"prepared {prepared.counts} from {len(prepared.classes)} classes into {prepared.directory}")


@data_app.command("field")
def data_field(params: Path = ParamsOption,
               source: Optional[str] = typer.Option(None, help="s3://bucket/prefix (default: params.yaml's "
                                                               "field_data.source, else the channel's upload_url)"),
               channel: Optional[str] = typer.Option(None, help="whose field_samples.upload_url (default: ota.channel)")
               ) -> None:
    """Pull the field samples the devices uploaded into the field split (field_data.dir), DVC-tracked."""
    from edgeship.config import load_params
    from edgeship.tasks.field_data import pull_configured

    try:
        settings = load_params(params)
        report = pull_configured(settings, Path("."), channel, source)
    except EdgeshipError as error:
        fail(error)
    console.print(f"pulled {report.downloaded} new objects from {report.source}: field split {report.counts} from "
                  f"{report.devices} devices into {settings.field_data.dir} ({report.dvc})")


@app.command("check")
def check(params: Path = ParamsOption) -> None:
    """Validate params.yaml and print the resolved config as JSON (stdout: `edgeship check > params.json`)."""
    print_json(load_settings(Path("."), params))


@app.command("run")
def run(params: Path = ParamsOption, workdir: Path = WorkdirOption,
        summary: Optional[Path] = typer.Option(None, help="also write the release summary as JSON here (-: stdout)"),
        fresh: bool = typer.Option(False, "--fresh", help="recompute every stage, reusing nothing from earlier "
                                                         "runs (.edgeship/cache)")) -> None:
    """Run the whole release: data, train, QAT, compile, host check, benchmark, gate, register.

    Progress goes to stderr, the final table to stdout (with `--summary -`: the JSON on stdout, the table on stderr).

    Library warnings and runtime logs go to the run's log (.edgeship/runs/<run id>/release.log, also in MLflow).

    Unchanged stages are reused. Exit code 0: every required gate passed; 3: a gate failed; 2: bad input.
    """
    settings = load_settings(workdir, params)  # fail on a bad config before anything starts
    import time

    from edgeship.cli.startup import PrefectApiInBackground
    from edgeship.console import library_output_to

    log_path = workdir.resolve() / ".edgeship" / "logs" / f"release-{time.strftime('%Y%m%d-%H%M%S')}.log"
    crash = None
    with library_output_to(log_path, console):  # first: the API's server process writes to the log too
        api = PrefectApiInBackground()  # starts while the pipeline imports
        try:
            result = _release_with_progress(params, workdir, None if summary == Path("-") else summary, fresh, api,
                                            settings)
        except EdgeshipError as error:
            crash = error
        except Exception as error:  # a bug: its traceback is in the log, the terminal gets one line
            import traceback

            traceback.print_exc()
            crash = error
    if crash is not None:
        _fail_with_log(crash, log_path)
    log_path = _file_log_with_run(log_path, settings, workdir, result.run_id)
    if summary == Path("-"):
        _print_summary(result, console)
        print_json(result)
    else:
        _print_summary(result, stdout())
    console.print(f"[dim]log: {log_path}[/]", soft_wrap=True)  # a path to copy: never folded
    raise typer.Exit(code=ExitCode.OK if result.passed else ExitCode.REFUSED)


def _release_with_progress(params: Path, workdir: Path, summary: Optional[Path], fresh: bool, api=None,
                           settings=None):
    from edgeship.flows.release import release
    from edgeship.progress import RichProgress, reporting

    if api is not None:  # while Prefect's API starts: open what every release needs, then wait for it
        from edgeship.cli.startup import preload

        preload(settings, workdir)
        api.ready()
    with RichProgress(console) as display, reporting(display):
        return release(params_path=str(params), workdir=str(workdir),
                       summary_path=str(summary.resolve()) if summary else None, fresh=fresh)


def _fail_with_log(error: Exception, log_path: Path) -> None:
    """The error once, with its fix (EdgeshipError) or as a crash (anything else); details are in the log."""
    if isinstance(error, EdgeshipError):
        console.print(f"[bold red]error:[/] {error}")
        console.print(f"[dim]log: {log_path}[/]", soft_wrap=True)  # a path to copy: never folded
    else:
        console.print(f"[bold red]crashed:[/] {type(error).__name__}: {error}\n[dim]traceback: {log_path}[/]",
                      soft_wrap=True)
    raise typer.Exit(code=exit_code_for(error))


def _file_log_with_run(log_path: Path, settings, workdir: Path, run_id: str | None) -> Path:
    """Move the log into the run's directory and attach it to the MLflow run; return where it is now."""
    if not run_id:
        return log_path
    target = workdir.resolve() / ".edgeship" / "runs" / run_id / "release.log"
    target.parent.mkdir(parents=True, exist_ok=True)
    log_path.replace(target)
    try:
        from edgeship.registry.tracking import ReleaseRun, tracking_uri_for

        ReleaseRun(run_id, tracking_uri_for(settings.registry, workdir.resolve())).log_artifact(target, "logs")
    except Exception as error:  # the release is done; a log that did not upload is only mentioned
        console.print(f"[yellow]the log stays local ({error})[/]")
    return target


def _print_summary(summary, out) -> None:
    from edgeship.console import print_table

    metric = "mAP@0.5:0.95" if summary.task == "detection" else "accuracy"
    rows = []
    for target in summary.targets:
        size = f"{target.artifact.bytes / 1e3:.0f} kB" if target.artifact else "—"
        accuracy = target.host_check.accuracy if target.host_check else None
        for bench in target.benchmarks or [None]:
            latency = bench.latency_ms if bench else None
            failed = [f"{c.name}: {c.reason or c.measured}" for c in target.gate.checks if c.fails_gate]
            rows.append([target.target, size, f"{accuracy:.4f}" if accuracy is not None else "—",
                         bench.device if bench else "—", f"{latency.p50:.3f}" if latency else "—",
                         f"{latency.p99:.3f}" if latency else "—", _verdict(target.gate, failed)])
    print_table(out, ["target", "size", metric, "device", "p50 ms", "p99 ms", "gate"], rows,
                f"{summary.model_name} v{summary.model_version}  (fp32 test {metric} {summary.fp32_test_accuracy:.4f})")
    verdict = "[green]PASSED: alias " + ", ".join(summary.aliases) if summary.passed else "[red]FAILED the gate"
    out.print(f"release {verdict}[/]  (MLflow run {summary.run_id})")


@app.command("status")
def status(params: Path = ParamsOption, workdir: Path = WorkdirOption,
           as_json: bool = typer.Option(False, "--json", help="print the status as JSON instead of tables")) -> None:
    """Registered versions with gate verdicts and aliases; each OTA channel with what it ships per target."""
    from edgeship.status import project_status, render

    report = guarded(project_status, load_settings(workdir, params), workdir.resolve())
    if as_json:
        print_json(report)
    else:
        render(report, stdout())


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
        fail(EdgeshipError("PREFECT_API_URL is not set; start a server (infra/local-stack.sh start) and "
                            "export PREFECT_API_URL=http://127.0.0.1:4200/api"))
    prefect.serve(*deployments(workdir, cron or None, str(params)))


def _webhook_secret(secret_env: str) -> str:
    secret = os.environ.get(secret_env)
    if not secret:
        fail(EdgeshipError(f"${secret_env} is empty; set it to the secret shared with the MLflow webhook "
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

    from edgeship.flows.webhook import (DeliveryStore, WatchedAlias, create_app, publish_in_process,
                                        publish_via_deployment)

    settings = load_settings(workdir, params)
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
        fail(EdgeshipError("webhooks need an MLflow server with a SQL backend; export MLFLOW_TRACKING_URI="
                            "http://HOST:PORT (infra/local-stack.sh start starts one)"))
    console.print(f"webhook {register_webhook(tracking, url, _webhook_secret(secret_env))} -> {url}")


from edgeship.cli.ota import register as _register_ota  # noqa: E402  (the field side's commands)

_register_ota(app)


def main() -> None:
    """Console script entry point."""
    sys.exit(app())


if __name__ == "__main__":
    main()
