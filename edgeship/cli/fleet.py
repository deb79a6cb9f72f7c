"""`edgeship fleet ...`: collect telemetry, show the fleet, run the rollout controller, steer by hand.

    edgeship fleet collect                  # subscribe and store (starts an in-process broker if none is configured)
    edgeship fleet status                   # per version and device class: p50/p95/p99, shadow agreement, drift
    edgeship fleet rollout [--dry-run]      # one controller pass (what the `rollout` deployment runs)
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
from rich.table import Table

from edgeship.cli.base import ChannelOption, ParamsOption, WorkdirOption, console, fail, guarded, load_settings, stdout
from edgeship.errors import ConfigError, EdgeshipError

fleet_app = typer.Typer(no_args_is_help=True, help="The fleet loop: telemetry, status, rollout control.")


def _store(settings, workdir: Path):
    from edgeship.fleet.policy import store_url_for
    from edgeship.fleet.store import FleetStore

    return FleetStore(store_url_for(settings.fleet.store, workdir))


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
                                             "also redelivers what was in flight when the collector reconnects)")
            ) -> None:
    """Subscribe to every device's telemetry and state topics and store them (until Ctrl-C)."""
    from contextlib import ExitStack

    from edgeship.fleet.collector import Collector

    settings = load_settings(workdir, params)
    # SIGTERM (systemd, a test) stops like Ctrl-C, so the local broker is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with ExitStack() as stack:
        try:
            if settings.fleet.broker is None:
                broker = stack.enter_context(_local_broker(local_broker, port))
                console.print(f"no fleet.broker configured: started a local broker ({local_broker}) on "
                              f"127.0.0.1:{broker.port}")
                mqtt = mqtt_settings(settings, broker.port)
            else:
                mqtt = mqtt_settings(settings)
            store = _store(settings, workdir)
            collector = stack.enter_context(Collector(mqtt, store))
        except EdgeshipError as error:
            fail(error)
        console.print(f"collecting edgeship/{mqtt.fleet}/devices/+/telemetry from {mqtt.host}:{mqtt.port} "
                      f"into {store.url}", highlight=False)
        deadline = time.monotonic() + for_s if for_s else None
        try:
            while deadline is None or time.monotonic() < deadline:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
        console.print(f"stored {collector.stored} records ({collector.duplicates} duplicates, "
                      f"{collector.rejected} rejected)")


@fleet_app.command("status")
def status(params: Path = ParamsOption, workdir: Path = WorkdirOption, channel: Optional[str] = ChannelOption,
           target: Optional[str] = typer.Option(None, help="one target only"),
           since_s: float = typer.Option(3600.0, "--since", help="telemetry this recent (seconds)")) -> None:
    """The fleet as a table: per version and device class, latency quantiles, shadow agreement, drift, events."""
    from edgeship.fleet.aggregate import aggregate
    from edgeship.fleet.report import STATUS_COLUMNS, status_rows

    settings = load_settings(workdir, params)
    channel = channel or settings.ota.channel
    store = _store(settings, workdir)
    since = datetime.now(timezone.utc) - timedelta(seconds=since_s)
    snapshot = aggregate(store.records(channel, target, since=since), store.events(channel, since=since), since=since)
    table = Table(title=f"fleet: channel {channel}{f' / {target}' if target else ''}, {snapshot.devices} devices, "
                        f"{snapshot.records} records in the last {since_s:g} s")
    for column in STATUS_COLUMNS:
        table.add_column(column)
    for row in status_rows(snapshot):
        table.add_row(*row.values())
    stdout().print(table)
    decisions = store.decisions(channel, target)[-5:]
    for d in decisions:
        stdout().print(f"{d['at']:%Y-%m-%d %H:%M:%S} {d['target']} v{d['version']}: {d['action']} "
                        f"{d['fraction_before']:g} -> {d['fraction_after']:g}  {'; '.join(d['reasons'])}",
                        highlight=False)
    store.close()


@fleet_app.command("rollout")
def rollout(params: Path = ParamsOption, workdir: Path = WorkdirOption, channel: Optional[str] = ChannelOption,
            dry_run: bool = typer.Option(False, "--dry-run", help="decide and record, but change nothing")) -> None:
    """One rollout controller pass over a channel (what the `rollout-controller` deployment runs)."""
    from edgeship.flows.rollout import rollout_controller

    load_settings(workdir, params)
    decisions = guarded(rollout_controller, params_path=str(params), workdir=str(workdir), channel=channel,
                        apply=not dry_run)
    for d in decisions:
        stdout().print(f"{d['target']} v{d['version']}: {d['action']} {d['fraction_before']:g} -> "
                        f"{d['fraction_after']:g}{'' if d['applied'] else ' (not applied)'}  {'; '.join(d['reasons'])}",
                        highlight=False)


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
