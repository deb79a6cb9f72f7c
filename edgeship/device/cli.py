"""`edgeship-device`: the command line of an edge device.

    edgeship-device agent --name pi4                     # serve benchmark jobs on 127.0.0.1:8765
    EDGESHIP_AGENT_TOKEN=... edgeship-device agent --host 0.0.0.0 --name pi4   # on the network: token required
    edgeship-device benchmark model.onnx --iterations 200   # measure a model here, print JSON
    edgeship-device update ...                           # the OTA updater (edgeship.device.updater)

Also runnable as `python -m edgeship.device.cli`.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sys
from pathlib import Path

from edgeship.errors import EdgeshipError

DEFAULT_PORT = 8765
TOKEN_ENV = "EDGESHIP_AGENT_TOKEN"


def main(argv: list[str] | None = None) -> int:
    """Run one `edgeship-device` command; return its exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, update_parser = _build_parser()
    # The updater is imported only when asked for, so the agent runs on a device without it.
    if argv[:1] == ["update"] and not _wire_updater(update_parser):
        return 2
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except EdgeshipError as error:
        print(f"edgeship-device: {error}", file=sys.stderr)
        return 1


def _build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(prog="edgeship-device", description="Run on an edge device: the benchmark "
                                     "agent, a local measurement, or the OTA updater.")
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
    agent.set_defaults(run=_run_agent)

    bench = commands.add_parser("benchmark", help="measure a model on this machine and print JSON",
                                description="Measure a model here, in a child process, as an agent job would.")
    bench.add_argument("model", type=Path)
    bench.add_argument("--runtime", default="onnxruntime")
    bench.add_argument("--warmup", type=int, default=20)
    bench.add_argument("--iterations", type=int, default=200)
    bench.add_argument("--threads", type=int, default=1, help="0: the runtime's default")
    bench.add_argument("--timeout-s", type=float, default=600)
    bench.set_defaults(run=_run_benchmark)

    # Its arguments and action come from edgeship.device.updater, wired by main() when asked for.
    update = commands.add_parser("update", help="check for, verify and install a new model (OTA)")
    return parser, update


def _wire_updater(update_parser: argparse.ArgumentParser) -> bool:
    try:
        from edgeship.device import updater
    except ImportError as error:
        print(f"edgeship-device: the OTA updater cannot be loaded ({error}); install edgeship[device] "
              "in full, or use `edgeship-device agent` alone", file=sys.stderr)
        return False
    updater.add_update_arguments(update_parser)
    update_parser.set_defaults(run=updater.run_update)
    return True


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
        print(f"edgeship-device: no token in ${args.token_env}; any local user can run jobs", file=sys.stderr)

    import uvicorn  # here, not at the top: `update` and `benchmark` need no web server

    from edgeship.device.agent import AgentSettings, create_app

    settings = AgentSettings(name=args.name, token=token, max_upload_mb=args.max_upload_mb,
                             job_timeout_s=args.job_timeout_s, work_dir=args.work_dir, emulated=args.emulated)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    return 0


def _run_benchmark(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from edgeship.device.benchmark import run_benchmark_job
    from edgeship.records import BenchmarkRequest

    try:
        request = BenchmarkRequest(runtime=args.runtime, warmup=args.warmup, iterations=args.iterations,
                                   threads=args.threads)
    except ValidationError as error:
        print(f"edgeship-device: {error}", file=sys.stderr)
        return 2
    print(json.dumps(run_benchmark_job(args.model, args.runtime, request, args.timeout_s), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
