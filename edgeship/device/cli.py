"""`edgeship-device`: the command line of an edge device.

    edgeship-device agent --name pi4                     # serve benchmark jobs on 127.0.0.1:8765
    EDGESHIP_AGENT_TOKEN=... edgeship-device agent --host 0.0.0.0 --name pi4   # on the network: token required
    edgeship-device agent --name pi4 --tls-cert cert.pem --tls-key key.pem   # HTTPS
    edgeship-device agent --name emu --emulated --cpus 0 --threads 1   # a host-emulated one-core device
    edgeship-device benchmark model.onnx --iterations 200   # measure a model here, print JSON
    edgeship-device benchmark model.onnx --duration-s 120   # a sustained run: thermal drift, sensors
    edgeship-device sensors                              # which temperature/clock/throttle/power sensors exist
    edgeship-device provision --state-dir D --repo-url URL --root root.json --target onnx-int8
    edgeship-device update --state-dir D                 # the OTA updater (edgeship.device.updater)
    edgeship-device status|confirm|rollback --state-dir D
    edgeship-device serve --state-dir D --uds /run/edgeship.sock --broker 127.0.0.1:1883 --device-class pi4
    (`update` and `serve` also take provision's flags, written into D first: edgeship.device.state.settle_identity)
    edgeship-device --version | -v COMMAND | --log-level debug COMMAND | --log-format json COMMAND
    source <(edgeship-device --show-completion)          # bash completion (zsh: after bashcompinit)

Also runnable as `python -m edgeship.device.cli`. Exit codes as `edgeship`'s (edgeship.errors.ExitCode):
0 ok, 2 bad input or unreachable service, 3 refused by a policy (a signature, a smoke test, probation).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import socket
import sys
from pathlib import Path

from edgeship.command_line import LOG_LEVELS, configure_logging, log_level_for, package_version
from edgeship.errors import EdgeshipError, ExitCode, exit_code_for

DEFAULT_PORT = 8765
TOKEN_ENV = "EDGESHIP_AGENT_TOKEN"


def main(argv: list[str] | None = None) -> int:
    """Run one `edgeship-device` command; return its exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, updater_parsers = _build_parser()
    # The updater is imported only when asked for, so the agent runs on a device without it.
    command = _command_in(argv, updater_parsers)
    if command is not None and not _wire_updater(command, updater_parsers[command]):
        return ExitCode.BAD_INPUT
    args = parser.parse_args(argv)
    level = log_level_for(args.verbose, args.log_level)
    if not args.verbose and args.log_level is None and _runs_until_stopped(args):
        level = logging.INFO  # a daemon's log is all there is of what it did: its INFO records too
    configure_logging(level, args.log_format)
    try:
        return args.run(args)
    except EdgeshipError as error:
        print(f"edgeship-device: {error}", file=sys.stderr)
        return exit_code_for(error)


def _runs_until_stopped(args: argparse.Namespace) -> bool:
    """The agent, `serve` and `update --interval`: the commands a service manager keeps running."""
    return args.command in ("agent", "serve") or (args.command == "update" and getattr(args, "interval", 0) > 0)


def _command_in(argv: list[str], commands) -> str | None:
    """The command word of `argv` if it is one of `commands`, past the options that come before it."""
    words = iter(argv)
    for word in words:
        if word in ("--log-level", "--log-format"):
            next(words, None)
        elif not word.startswith("-"):
            return word if word in commands else None
    return None


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="edgeship-device", description="Run on an edge device: the benchmark "
                                     "agent, a local measurement, or the OTA updater.")
    parser.add_argument("--version", action="version", version=f"edgeship-device {package_version()}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log detail on stderr: -v info, -vv debug")
    parser.add_argument("--log-level", type=str.lower, choices=[level.lower() for level in LOG_LEVELS],
                        default=None, help="log level (overrides -v)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="log lines on stderr: text (time, level, logger, message) or json (one object a line, "
                             "for journald or a log shipper; default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    agent = commands.add_parser("agent", help="serve benchmark jobs over HTTP",
                                description="Serve /health, /info and /jobs/benchmark with uvicorn.")
    agent.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    agent.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    agent.add_argument("--name", default=socket.gethostname(),
                       help="device name, as the inventory in params.yaml calls it (default: the hostname)")
    agent.add_argument("--token-env", default=TOKEN_ENV, metavar="VAR",
                       help="environment variable holding the bearer token (default: %(default)s)")
    agent.add_argument("--max-upload-mb", type=int, default=512, help="largest artifact accepted (default: 512)")
    agent.add_argument("--job-timeout-s", type=float, default=600, help="a job running longer is stopped "
                       "(default: 600)")
    agent.add_argument("--work-dir", type=Path, default=None,
                       help="where per-job directories go (default: the system temporary directory)")
    agent.add_argument("--emulated", action="store_true",
                       help="this agent stands in for the device (QEMU, a container): results say so")
    agent.add_argument("--cpus", type=_cpu_list, default=None, metavar="LIST",
                       help="pin the agent and every job to these CPUs, e.g. 0 or 0,2-3 (an emulated profile)")
    agent.add_argument("--threads", type=int, default=None,
                       help="every job uses this many runtime threads, whatever it asks (an emulated profile)")
    agent.add_argument("--tls-cert", type=Path, default=None, help="serve HTTPS with this certificate (PEM)")
    agent.add_argument("--tls-key", type=Path, default=None, help="the certificate's private key (PEM)")
    agent.add_argument("--upload-timeout-s", type=float, default=300,
                       help="a job's upload must arrive within this once its turn comes (default: 300)")
    agent.add_argument("--power-meter-cmd", default=None, metavar="COMMAND",
                       help="an external power meter: a command that prints the device's power in watts")
    agent.add_argument("--no-sensors", action="store_true", help="do not sample sensors during jobs")
    agent.add_argument("--no-fork-server", action="store_true",
                       help="start a fresh Python for every job instead of forking a warm helper (Linux)")
    agent.add_argument("--job-memory-mb", type=int, default=None,
                       help="memory (address space) each job may use (default: three quarters of this device's)")
    agent.add_argument("--max-queued-jobs", type=int, default=8,
                       help="jobs that may wait for their turn; more are answered 503 (default: 8)")
    from edgeship.device.http_server import add_server_arguments

    add_server_arguments(agent)
    agent.add_argument("--sysfs-root", type=Path, default=Path("/"), help=argparse.SUPPRESS)  # tests: a fake /sys
    agent.set_defaults(run=_run_agent)

    bench = commands.add_parser("benchmark", help="measure a model on this machine and print JSON",
                                description="Measure a model here, in a child process, as an agent job would.")
    bench.add_argument("model", type=Path)
    bench.add_argument("--runtime", default="onnxruntime")
    bench.add_argument("--warmup", type=int, default=20)
    bench.add_argument("--iterations", type=int, default=200)
    bench.add_argument("--threads", type=int, default=1, help="0: the runtime's default")
    bench.add_argument("--cpus", type=_cpu_list, default=None, metavar="LIST", help="CPU affinity, e.g. 0,1")
    bench.add_argument("--warmup-until-stable", action="store_true",
                       help="after --warmup runs, go on until the median latency stops moving")
    bench.add_argument("--duration-s", type=float, default=None,
                       help="sustained mode: time every run for this long instead of --iterations")
    bench.add_argument("--sensor-interval-s", type=float, default=1.0)
    bench.add_argument("--no-sensors", action="store_true")
    bench.add_argument("--timeout-s", type=float, default=600)
    bench.set_defaults(run=_run_benchmark)

    sensors = commands.add_parser("sensors", help="list the sensors this device exposes, as JSON",
                                  description="Probe every sensor plug-in and print what it found.")
    sensors.add_argument("--power-meter-cmd", default=None, metavar="COMMAND")
    sensors.add_argument("--sysfs-root", type=Path, default=Path("/"), help=argparse.SUPPRESS)
    sensors.set_defaults(run=_run_sensors)

    serve = commands.add_parser("serve", help="the on-device runtime as a local inference service, with shadow "
                                "mode and telemetry", description="Answer POST /predict on loopback or a Unix "
                                "socket with the installed model (edgeship.device.serve).")
    from edgeship.device.serve import add_arguments as serve_arguments

    serve_arguments(serve)

    # Their arguments and actions come from edgeship.device.updater_cli, wired by main() when asked for.
    helps = {"provision": "give this device its identity, channel, target and trusted root",
             "update": "check for, verify and install a new model (OTA), with probation and rollback",
             "status": "print the device's identity, installed models, probation and last events",
             "confirm": "confirm the model on probation (the application found it good)",
             "rollback": "go back to the last-known-good model and mark the active one bad"}
    updaters = {name: commands.add_parser(name, help=text) for name, text in helps.items()}
    from edgeship.device.completion import ShowCompletion

    parser.add_argument("--show-completion", action=ShowCompletion, wire=lambda: _wire_all(updaters),
                        help="print a bash completion script (source it; zsh: after `autoload bashcompinit; "
                             "bashcompinit`)")
    return parser, updaters


def _wire_all(updaters: dict[str, argparse.ArgumentParser]) -> None:
    for command, parser in updaters.items():
        if parser.get_default("run") is None:  # main() may have wired the one on the command line already
            _wire_updater(command, parser)


def _wire_updater(command: str, parser: argparse.ArgumentParser) -> bool:
    try:
        from edgeship.device import updater_cli
    except ImportError as error:
        print(f"edgeship-device: the OTA updater cannot be loaded ({error}); install edgeship[device] "
              "in full, or use `edgeship-device agent` alone", file=sys.stderr)
        return False
    updater_cli.wire(command, parser)
    return True


def _cpu_list(text: str) -> list[int]:
    """"0,2-3" -> [0, 2, 3]."""
    cpus: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            low, _, high = part.partition("-")
            cpus.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a CPU list such as 0 or 0,2-3") from None
    if not cpus or min(cpus) < 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a CPU list such as 0 or 0,2-3")
    return sorted(cpus)


def _meter_command(text: str | None) -> list[str] | None:
    import shlex

    return shlex.split(text) if text else None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname may resolve to anything: treat it as the network


def _run_agent(args: argparse.Namespace) -> int:
    token = os.environ.get(args.token_env) or None
    if token is None and not _is_loopback(args.host):
        print(f"edgeship-device: refusing to listen on {args.host} without a token: anyone on the network "
              f"could run jobs. Set a token in ${args.token_env} (e.g. `export {args.token_env}=$(python -c "
              "'import secrets; print(secrets.token_urlsafe(32))')`) or listen on 127.0.0.1", file=sys.stderr)
        return 2
    if token is None:
        logging.getLogger("edgeship.device.agent").warning("no token in $%s; any local user can run jobs",
                                                           args.token_env)
    if (args.tls_cert is None) != (args.tls_key is None):
        print("edgeship-device: give both --tls-cert and --tls-key, or neither", file=sys.stderr)
        return 2
    if args.cpus:
        if not hasattr(os, "sched_setaffinity"):
            print(f"edgeship-device: --cpus needs CPU affinity, which {sys.platform} does not offer", file=sys.stderr)
            return 2
        try:
            os.sched_setaffinity(0, args.cpus)  # the agent too, so its own work stays off other CPUs
        except OSError as error:
            print(f"edgeship-device: cannot pin to CPUs {args.cpus}: {error}", file=sys.stderr)
            return 2

    from edgeship.device.agent import AgentSettings, create_app
    from edgeship.device.http_server import run_server, server_limits

    settings = AgentSettings(name=args.name, token=token, max_upload_mb=args.max_upload_mb,
                             job_timeout_s=args.job_timeout_s, work_dir=args.work_dir, emulated=args.emulated,
                             cpus=args.cpus, threads=args.threads, upload_timeout_s=args.upload_timeout_s,
                             sensors=not args.no_sensors, sysfs_root=args.sysfs_root,
                             power_meter_command=_meter_command(args.power_meter_cmd),
                             tls=args.tls_cert is not None, fork_server=not args.no_fork_server,
                             job_memory_mb=args.job_memory_mb, max_queued_jobs=args.max_queued_jobs)
    tls = {"ssl_certfile": str(args.tls_cert), "ssl_keyfile": str(args.tls_key)} if args.tls_cert else {}
    # On SIGTERM, requests still running after 3 s are cancelled, so the app's shutdown can end their jobs.
    run_server(create_app(settings), server_limits(args), log_level="info", host=args.host, port=args.port,
               timeout_graceful_shutdown=3, **tls)
    return 0


def _run_benchmark(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from edgeship.device.jobs import run_benchmark_job
    from edgeship.records import BenchmarkRequest

    from edgeship.device.sensors import discover_sensors

    try:
        request = BenchmarkRequest(runtime=args.runtime, warmup=args.warmup, iterations=args.iterations,
                                   threads=args.threads, cpus=args.cpus, warmup_until_stable=args.warmup_until_stable,
                                   duration_s=args.duration_s, sensors=not args.no_sensors,
                                   sensor_interval_s=args.sensor_interval_s)
    except ValidationError as error:
        print(f"edgeship-device: {error}", file=sys.stderr)
        return 2
    sensors = None if args.no_sensors else discover_sensors()
    print(json.dumps(run_benchmark_job(args.model, args.runtime, request, args.timeout_s, sensors), indent=2))
    return 0


def _run_sensors(args: argparse.Namespace) -> int:
    from edgeship.device.sensors import discover_sensors

    sensors = discover_sensors(args.sysfs_root, meter_command=_meter_command(args.power_meter_cmd))
    print(json.dumps([s.info().model_dump() for s in sensors], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
