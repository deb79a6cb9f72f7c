"""`edgeship-device provision|update|status|rollback|confirm`: the updater's command line.

    edgeship-device provision --state-dir /var/lib/edgeship --repo-url https://ota.example.com \\
        --root root.json --channel stable --target onnx-int8 [--device-id pi4-0017]
    edgeship-device update --state-dir /var/lib/edgeship --interval 300
    edgeship-device status --state-dir /var/lib/edgeship
    edgeship-device confirm --state-dir /var/lib/edgeship     # the application found the new model good
    edgeship-device rollback --state-dir /var/lib/edgeship    # back to the last-known-good, mark this one bad

`update` and `serve` take provision's flags too: given, they are written into device.json first (as `provision`
writes them), so every later command follows them; without them, a state directory that was never provisioned
is refused with the command that provisions it. The id is `--device-id`, else one generated once and kept in
device.json (never the hostname).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from edgeship.errors import ConfigError, ExitCode

COMMANDS = ("provision", "update", "status", "rollback", "confirm")
# What `update` exits with per report status: the scheme of both command lines (edgeship.errors.ExitCode).
UPDATE_EXIT_CODES = {
    "updated": ExitCode.OK, "up_to_date": ExitCode.OK, "not_in_cohort": ExitCode.OK,
    "refused": ExitCode.REFUSED,      # a signature, hash, smoke test or policy refused the model
    "rolled_back": ExitCode.REFUSED,  # the new model failed probation; the last-known-good runs
    "stale": ExitCode.BAD_INPUT,      # the repository's metadata expired: its publisher must re-sign
    "error": ExitCode.BAD_INPUT,      # the repository could not be reached or used (network, disk, no such target)
}


def wire(command: str, parser: argparse.ArgumentParser) -> None:
    """Add a command's flags and action to its sub-parser."""
    parser.add_argument("--state-dir", required=True, type=Path,
                        help="where installed models, metadata, state.json and device.json live")
    if command in ("provision", "update"):
        add_provisioning_arguments(parser)
    if command == "update":
        parser.add_argument("--threads", type=int, default=1, help="runtime threads for checks (0: default)")
        parser.add_argument("--interval", type=float, default=0, metavar="SECONDS",
                            help="check again every SECONDS (0: check once and exit)")
        parser.add_argument("--confirm-after", type=int, default=20, metavar="N",
                            help="good inferences that confirm a new model on probation (default: 20)")
        parser.add_argument("--max-failures", type=int, default=2, help="bad inferences tolerated on probation")
        parser.add_argument("--probation-s", type=float, default=600,
                            help="probation deadline in seconds of time served (monotonic, kept across restarts)")
        parser.add_argument("--check-timeout-s", type=float, default=900, metavar="SECONDS",
                            help="a check ends by then, whatever the network does, and frees the update lock "
                                 "(default: 900)")
        parser.add_argument("--min-download-rate", type=float, default=4096, metavar="BYTES_PER_S",
                            help="a download slower than this over 30 s fails (default: 4096)")
        parser.add_argument("--app-confirms", action="store_true",
                            help="leave probation to the application (runtime or `confirm`) instead of checking here")
    if command == "rollback":
        parser.add_argument("--reason", default="rolled back by the operator")
    parser.set_defaults(run=globals()[f"run_{command}"])


def add_provisioning_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `provision`, which `update` and `serve` take too (edgeship.device.state.settle_identity)."""
    parser.add_argument("--repo-url", help="HTTP base of the OTA repository (metadata at <url>/metadata/)")
    parser.add_argument("--root", type=Path, help="the repository's trusted root.json (copied into the state "
                        "directory)")
    parser.add_argument("--channel", default=None, help="release channel to follow (default: stable)")
    parser.add_argument("--target", default=None, help="compile target this device runs, e.g. onnx-int8")
    parser.add_argument("--device-id", default=None,
                        help="device identity for rollout cohorts (default: generated once, kept in device.json)")


def settled_identity(args: argparse.Namespace, command: str):
    """The identity this command runs as, with its provisioning flags written into device.json first."""
    from edgeship.device.state import settle_identity

    return settle_identity(args.state_dir, command, device_id=args.device_id, channel=args.channel,
                           target=args.target, repository_url=args.repo_url, root=args.root)


def run_provision(args: argparse.Namespace) -> int:
    from edgeship.device.state import provision

    if args.root is None or args.repo_url is None or args.target is None:
        raise ConfigError("provision needs --repo-url, --root and --target (and --channel, default stable)")
    identity = provision(args.state_dir, args.device_id, args.channel or "stable", args.target, args.repo_url,
                         args.root)
    print(identity.model_dump_json(), flush=True)
    return 0


def run_update(args: argparse.Namespace) -> int:
    """Run checks as the flags say, printing each UpdateReport as one JSON line.

    Returns:
        The exit status of the last check (UPDATE_EXIT_CODES): 0 for updated, up_to_date or not_in_cohort,
        3 refused or rolled back, 2 stale or unreachable.
    """
    from edgeship.device.probation import ProbationPolicy
    from edgeship.device.updater import DeviceUpdater, UpdaterConfig

    identity = settled_identity(args, "update")
    updater = DeviceUpdater(UpdaterConfig(
        repository_url=identity.repository_url, trusted_root=Path(identity.root), state_dir=args.state_dir,
        target=identity.target, channel=identity.channel, device_id=identity.device_id,
        threads=args.threads, self_check=not args.app_confirms, check_timeout_s=args.check_timeout_s,
        min_download_bytes_per_s=args.min_download_rate,
        probation=ProbationPolicy(required=args.confirm_after, max_failures=args.max_failures,
                                  deadline_s=args.probation_s)))
    while True:
        report = updater.update()
        print(report.model_dump_json(), flush=True)
        code = UPDATE_EXIT_CODES[report.status]
        if args.interval <= 0:
            return code
        try:
            # jitter, so a fleet started together does not poll together
            time.sleep(args.interval * random.uniform(0.9, 1.1))
        except KeyboardInterrupt:
            return code


def run_status(args: argparse.Namespace) -> int:
    from edgeship.device.state import DeviceState, load_identity, read_events

    state = DeviceState.load(args.state_dir)
    identity = load_identity(args.state_dir)
    print(json.dumps({"identity": identity.model_dump(mode="json") if identity else None,
                      "state": state.model_dump(mode="json"),
                      "last_events": [e.model_dump(mode="json") for e in read_events(args.state_dir)[-5:]]},
                     indent=2), flush=True)
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    from edgeship.device.updater import rollback_local

    print(rollback_local(args.state_dir, args.reason).model_dump_json(), flush=True)
    return 0


def run_confirm(args: argparse.Namespace) -> int:
    from edgeship.device.probation import confirm

    event = confirm(args.state_dir)
    if event is None:
        print(json.dumps({"confirmed": None, "reason": "nothing is on probation"}), flush=True)
        print(f"edgeship-device: nothing is on probation in {args.state_dir}: nothing to confirm", file=sys.stderr)
        return ExitCode.BAD_INPUT
    print(event.model_dump_json(), flush=True)
    return 0
