"""`edgeship fleet ...`: collect telemetry, show the fleet, run the rollout controller, steer by hand.

    edgeship fleet collect [--member a]     # subscribe and store (starts an in-process broker if none is configured)
    edgeship fleet status                   # per version and device class: p50/p95/p99, shadow agreement, drift
    edgeship fleet rollout [--dry-run]      # one controller pass (what the `rollout` deployment runs)
    edgeship fleet controller               # passes when telemetry arrives or a soak ends (a service)
    edgeship fleet replay                   # rebuild the rollups from the raw records
    edgeship fleet prune                    # drop raw records and rollups past their retention
    edgeship fleet loadgen --devices 10000 --rate 2000 --for 60   # simulated fleet telemetry
    edgeship fleet pause --target onnx-int8 --reason "holiday freeze"
    edgeship fleet resume --target onnx-int8
    edgeship fleet abort --target onnx-int8 --reason "customer report"
"""

from __future__ import annotations

import signal
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Optional

import typer
from edgeship.cli.base import (ChannelOption, ParamsOption, WorkdirOption, console, fail, guarded, library_noise_logged,
                               load_settings, stdout)
from edgeship.errors import ConfigError, EdgeshipError

fleet_app = typer.Typer(no_args_is_help=True, help="The fleet loop: telemetry, status, rollout control.")


def _store(settings, workdir: Path, check: bool = True):
    from edgeship.fleet.policy import store_url_for
    from edgeship.fleet.store import FleetStore

    return guarded(FleetStore, store_url_for(settings.fleet.store, workdir), bucket_s=settings.fleet.rollup_bucket_s,
                   check=check)


def mqtt_settings(settings, port: int | None = None):
    """MqttSettings from params.yaml's fleet section (a local broker's port when none is configured)."""
    from edgeship.device.telemetry_mqtt import MqttSettings

    broker = settings.fleet.broker
    if broker is None:
        return MqttSettings(host="127.0.0.1", port=port or 1883, fleet=settings.fleet.name)
    return MqttSettings(host=broker.host, port=broker.port, fleet=settings.fleet.name, tls=broker.tls,
                        ca_file=broker.ca_file, cert_file=broker.cert_file, key_file=broker.key_file,
                        username=broker.username, password_env=broker.password_env)


def _local_broker(kind: str, port: int | None):
    if kind == "embedded":
        from edgeship.fleet.embedded_broker import EmbeddedBroker

        return EmbeddedBroker(port=port)
    if kind == "mosquitto":
        from edgeship.fleet.broker import LocalBroker

        return LocalBroker(port=port)
    raise ConfigError(f"--local-broker must be 'embedded' or 'mosquitto', not {kind!r}")


@fleet_app.command("collect")
def collect(params: Path = ParamsOption, workdir: Path = WorkdirOption,
            for_s: Optional[float] = typer.Option(None, "--for", help="stop after this many seconds"),
            port: Optional[int] = typer.Option(None, help="port of the local broker when none is configured"),
            local_broker: str = typer.Option("embedded", help="the local broker when none is configured: "
                                             "'embedded' (amqtt in this process) or 'mosquitto' (a process that "
                                             "also redelivers what was in flight when the collector reconnects)"),
            member: Optional[str] = typer.Option(None, help="this collector's name in the group of collectors "
                                                 "(each its own; default: the host name)")) -> None:
    """Subscribe to every device's telemetry and state topics and store them (until Ctrl-C)."""
    from contextlib import ExitStack

    from edgeship.fleet.collector import Collector, CollectorSettings

    settings = load_settings(workdir, params)
    # SIGTERM (systemd, a test) stops like Ctrl-C, so the local broker is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    options = settings.fleet.collector
    with ExitStack() as stack:
        try:
            embedded = settings.fleet.broker is None and local_broker == "embedded"
            if settings.fleet.broker is None:
                broker = stack.enter_context(_local_broker(local_broker, port))
                console.print(f"no fleet.broker configured: started a local broker ({local_broker}) on "
                              f"127.0.0.1:{broker.port}")
                mqtt = mqtt_settings(settings, broker.port)
            else:
                mqtt = mqtt_settings(settings)
            store = _store(settings, workdir)
            chosen = CollectorSettings(group=None if embedded else options.group,  # amqtt speaks MQTT 3.1.1 only
                                       session_expiry_s=options.session_expiry_s,
                                       receive_maximum=options.receive_maximum, batch_size=options.batch_size,
                                       max_delay_s=options.max_delay_s, **({"member": member} if member else {}))
            collector = stack.enter_context(Collector(mqtt, store, options=chosen))
        except EdgeshipError as error:
            fail(error)
        console.print(f"collecting edgeship/{mqtt.fleet}/devices/+/telemetry from {mqtt.host}:{mqtt.port} "
                      f"into {store.url} as {collector.client_id}"
                      f"{f' (shared group {chosen.group})' if chosen.group else ''}", highlight=False)
        deadline = time.monotonic() + for_s if for_s else None
        prune_every, pruned = 3600.0, time.monotonic()
        try:
            while (deadline is None or time.monotonic() < deadline) and not collector.taken_over.is_set():
                time.sleep(0.2)
                if time.monotonic() - pruned > prune_every:
                    pruned = time.monotonic()
                    store.prune(settings.fleet.retention_days * 86400, settings.fleet.rollup_retention_days * 86400)
        except KeyboardInterrupt:
            pass
        console.print(f"stored {collector.stored} records ({collector.duplicates} duplicates, "
                      f"{collector.rejected} rejected)")


@fleet_app.command("status")
def status(params: Path = ParamsOption, workdir: Path = WorkdirOption, channel: Optional[str] = ChannelOption,
           target: Optional[str] = typer.Option(None, help="one target only"),
           since_s: float = typer.Option(3600.0, "--since", help="telemetry this recent (seconds)")) -> None:
    """The fleet as a table: per version and device class, latency quantiles, shadow agreement, drift, events."""
    from edgeship.console import print_table
    from edgeship.fleet.report import STATUS_COLUMNS, decision_line, status_rows

    settings = load_settings(workdir, params)
    channel = channel or settings.ota.channel
    store = _store(settings, workdir)
    since = datetime.now(timezone.utc) - timedelta(seconds=since_s)
    snapshot = store.snapshot(channel, target, since=since)   # the rollups: one row per device, not every record
    title = (f"fleet: channel {channel}{f' / {target}' if target else ''}, {snapshot.devices} devices, "
             f"{snapshot.records} records in the last {since_s:g} s")
    # 15 columns: at 80 columns (or fewer) one row per metric, one column per version and device class
    print_table(stdout(), STATUS_COLUMNS, [list(row.values()) for row in status_rows(snapshot)], title,
                key_columns=2)
    for d in store.decisions(channel, target, evidence=False)[-5:]:
        stdout().print(f"{d['at']:%Y-%m-%d %H:%M:%S} {decision_line(d)}", highlight=False, markup=False, soft_wrap=True)
    store.close()


@fleet_app.command("rollout")
def rollout(params: Path = ParamsOption, workdir: Path = WorkdirOption, channel: Optional[str] = ChannelOption,
            dry_run: bool = typer.Option(False, "--dry-run", help="decide and record, but change nothing")) -> None:
    """One rollout controller pass over a channel (what the `rollout-controller` deployment runs); a dry run
    decides and records, but changes no channel and starts no retraining."""
    from edgeship.fleet.report import decision_line

    load_settings(workdir, params)
    with library_noise_logged(workdir, "fleet-rollout"):
        from edgeship.flows.rollout import rollout_controller

        decisions = guarded(rollout_controller, params_path=str(params), workdir=str(workdir), channel=channel,
                            apply=not dry_run)
    for d in decisions:
        stdout().print(decision_line(d), highlight=False, markup=False, soft_wrap=True)


def _hand(command: str, params: Path, workdir: Path, channel: str | None, target: str, reason: str) -> None:
    from edgeship.ota.repository import open_repository
    from edgeship.fleet.rollout import hand_command

    settings = load_settings(workdir, params)
    store = _store(settings, workdir)
    try:
        guarded(hand_command, guarded(open_repository, settings.ota, workdir.resolve()), store, command,
                channel or settings.ota.channel, target, reason)
    finally:
        store.close()
    console.print(f"{command}: {channel or settings.ota.channel}/{target} ({reason})")


@fleet_app.command("controller")
def controller(params: Path = ParamsOption, workdir: Path = WorkdirOption, channel: Optional[str] = ChannelOption,
               min_interval_s: float = typer.Option(10.0, "--min-interval", help="at most one pass this often"),
               max_interval_s: float = typer.Option(300.0, "--max-interval", help="a pass at least this often "
                                                    "(with the drift check and fleet metrics)"),
               for_s: Optional[float] = typer.Option(None, "--for", help="stop after this many seconds"),
               dry_run: bool = typer.Option(False, "--dry-run", help="decide and record, but change nothing")) -> None:
    """The rollout controller as a service: a pass when new telemetry arrives or a stage's soak ends."""
    import threading

    from edgeship.flows.publish import one_writer
    from edgeship.fleet.report import decision_line
    from edgeship.fleet.service import ControllerService, controller_pass
    from edgeship.ota.repository import open_repository
    from edgeship.registry.tracking import tracking_uri_for

    settings = load_settings(workdir, params)
    channel = channel or settings.ota.channel
    root = workdir.resolve()
    store = _store(settings, workdir)
    repository = guarded(open_repository, settings.ota, root)
    tracking_uri = tracking_uri_for(settings.registry, root)

    def run_pass(reason: str):
        results = controller_pass(repository, store, channel, settings, reason, tracking_uri, apply=not dry_run,
                                  writer=one_writer)
        for r in results:
            line = decision_line(r.decision.model_dump() | {"applied": r.applied, "base_version": r.base_version}, 2)
            stdout().print(f"[{reason}] {line}", highlight=False, markup=False, soft_wrap=True)
        return results

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if for_s:
        threading.Timer(for_s, stop.set).start()
    service = ControllerService(run_pass, store, channel, settings.rollout.policy_for(channel),
                                min_interval_s=min_interval_s, max_interval_s=max_interval_s)
    try:
        with library_noise_logged(workdir, "fleet-controller"):  # Prefect's concurrency limit, MLflow's client
            service.run(stop)
    except KeyboardInterrupt:
        pass
    finally:
        store.close()
    console.print(f"{len(service.passes)} passes")


@fleet_app.command("replay")
def replay(params: Path = ParamsOption, workdir: Path = WorkdirOption) -> None:
    """Rebuild the rollups from the raw records still kept (stop the collectors first)."""
    settings = load_settings(workdir, params)
    store = _store(settings, workdir, check=False)
    from rich.progress import Progress

    with Progress(console=console) as progress:
        task = progress.add_task("replaying raw records into rollups", total=store.count_records())
        done = store.replay(progress=lambda n: progress.update(task, completed=n))
    store.close()
    console.print(f"replayed {done} records into rollups")


@fleet_app.command("prune")
def prune(params: Path = ParamsOption, workdir: Path = WorkdirOption) -> None:
    """Drop raw records past fleet.retention_days and rollups past fleet.rollup_retention_days."""
    settings = load_settings(workdir, params)
    store = _store(settings, workdir)
    counts = store.prune(settings.fleet.retention_days * 86400, settings.fleet.rollup_retention_days * 86400)
    store.close()
    console.print(", ".join(f"{k}: {v}" for k, v in counts.items()))


@fleet_app.command("loadgen")
def loadgen(params: Path = ParamsOption, workdir: Path = WorkdirOption,
            devices: int = typer.Option(1000, min=1, help="simulated devices"),
            rate: float = typer.Option(100.0, min=0.001, help="records per second"),
            for_s: Optional[float] = typer.Option(None, "--for", help="publish for this many seconds"),
            count: Optional[int] = typer.Option(None, help="publish this many records"),
            candidate_share: float = typer.Option(0.1, min=0, max=1, help="share of devices on the candidate"),
            port: Optional[int] = typer.Option(None, help="broker port when params.yaml names no broker")) -> None:
    """Publish realistic telemetry of N simulated devices over MQTT at a chosen rate (size a broker and store)."""
    from edgeship.fleet.loadgen import FleetLoad, FleetProfile

    if for_s is None and count is None:
        fail(ConfigError("say how much to publish: --for SECONDS or --count RECORDS"))
    settings = load_settings(workdir, params)
    profile = FleetProfile(devices=devices, versions={"base": 1 - candidate_share, "candidate": candidate_share},
                           channel=settings.ota.channel, model_name=settings.project.name)
    with console.status(f"publishing {devices} devices' telemetry at {rate:g}/s"):
        outcome = FleetLoad(profile, mqtt_settings(settings, port)).publish(rate, count=count, duration_s=for_s)
    console.print(f"published {outcome['published']} records at {outcome['rate']}/s, "
                  f"{outcome['acknowledged']} acknowledged by the broker")


TargetOption = typer.Option(..., "--target", help="the target whose rollout to change, e.g. onnx-int8")


@fleet_app.command("pause")
def pause(target: str = TargetOption, reason: str = typer.Option(..., help="why (recorded with the decision)"),
          params: Path = ParamsOption, workdir: Path = WorkdirOption, channel: Optional[str] = ChannelOption) -> None:
    """Pause a target's rollout: nobody new joins the candidate's cohort until resumed."""
    _hand("pause", params, workdir, channel, target, reason)


@fleet_app.command("resume")
def resume(target: str = TargetOption, reason: str = typer.Option("resumed by hand", help="why"),
           params: Path = ParamsOption, workdir: Path = WorkdirOption, channel: Optional[str] = ChannelOption) -> None:
    """Resume a paused rollout at the stage it was paused in."""
    _hand("resume", params, workdir, channel, target, reason)


@fleet_app.command("abort")
def abort(target: str = TargetOption, reason: str = typer.Option(..., help="why (recorded with the decision)"),
          params: Path = ParamsOption, workdir: Path = WorkdirOption, channel: Optional[str] = ChannelOption) -> None:
    """Abort a target's rollout: the candidate is removed and every device goes back to the base."""
    _hand("abort", params, workdir, channel, target, reason)
