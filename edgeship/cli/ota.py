"""`edgeship` commands of the release's field side: publish, promote, rollout, rollback, channels, resign, keys.

    edgeship promote 7 --alias production                  # refused when a required gate failed
    edgeship publish --alias production --rollout 0.1      # the alias is resolved once and recorded
    edgeship publish --version 7 --allow-failed-gate "p99 measured on a throttled device; see #123"
    edgeship rollout stable --target onnx-int8 --fraction 0.5     # the candidate already in the channel
    edgeship rollout stable --target onnx-int8 --abort "error rate"
    edgeship rollback --channel stable --target onnx-int8
    edgeship channels
    edgeship resign                                        # renew timestamp/snapshot/targets before expiry
    edgeship keys init --root-keys 3 --root-threshold 2
    edgeship keys rotate timestamp | add root | revoke root KEYID | threshold root 2 | resign-root | list
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from edgeship.cli.base import (ChannelOption, ParamsOption, WorkdirOption, console, fail, guarded,
                               library_noise_logged, load_settings, print_json, stdout)
from edgeship.errors import EdgeshipError

keys_app = typer.Typer(no_args_is_help=True, help="TUF keys: the only commands that need the root keys.")


def register(app: typer.Typer) -> None:
    """Add these commands to the main `edgeship` app."""

    @app.command("publish")
    def publish(alias: str = typer.Option("production", help="registry alias whose version to publish"),
                version: Optional[str] = typer.Option(None, help="publish this version (instead of an alias)"),
                params: Path = ParamsOption, workdir: Path = WorkdirOption, channel: Optional[str] = ChannelOption,
                rollout: float = typer.Option(1.0, min=0.0, max=1.0, help="share of each target's devices"),
                target: Optional[list[str]] = typer.Option(None, help="targets to publish (default: all passed)"),
                allow_failed_gate: Optional[str] = typer.Option(None, metavar="REASON", help="publish although a "
                                                                "required gate failed; the reason is recorded")
                ) -> None:
        """Publish a version (or the one an alias points to) into the signed OTA repository."""
        from edgeship.flows.publish import publish as publish_flow

        with library_noise_logged(workdir, "publish"):
            descriptor = guarded(publish_flow, alias=alias, version=version, params_path=str(params),
                                 workdir=str(workdir), channel=channel, rollout_fraction=rollout, targets=target,
                                 allow_failed_gate=allow_failed_gate)
        _print_channel(descriptor)

    @app.command("promote")
    def promote(version: str = typer.Argument(..., help="the registered version to promote"),
                alias: str = typer.Option("production", help="alias to point at it"),
                params: Path = ParamsOption, workdir: Path = WorkdirOption,
                allow_failed_gate: Optional[str] = typer.Option(None, metavar="REASON")) -> None:
        """Point an alias at a version; refused when its required gates failed (unless overridden, recorded)."""
        from edgeship.registry.model_registry import promote as promote_version
        from edgeship.registry.tracking import tracking_uri_for

        settings = load_settings(workdir, params)
        tracking = tracking_uri_for(settings.registry, workdir.resolve())
        guarded(promote_version, tracking, settings.project.name, version, alias, allow_failed_gate)
        console.print(f"{settings.project.name} v{version} is now '{alias}'"
                                   + (f" (over a failed gate: {allow_failed_gate})" if allow_failed_gate else ""))

    @app.command("rollback")
    def rollback(params: Path = ParamsOption, workdir: Path = WorkdirOption, channel: Optional[str] = ChannelOption,
                 target: Optional[list[str]] = typer.Option(None, help="targets to roll back (default: all)")) -> None:
        """Roll targets back: an unfinished rollout is aborted, a finished one returns to the base before it."""
        from edgeship.flows.publish import rollback as rollback_flow

        with library_noise_logged(workdir, "rollback"):
            descriptor = guarded(rollback_flow, params_path=str(params), workdir=str(workdir), channel=channel,
                                 targets=target)
        _print_channel(descriptor)

    @app.command("rollout")
    def rollout(channel: str = typer.Argument(..., help="the channel, e.g. stable"),
                target: str = typer.Option(..., help="the target whose rollout to change"),
                fraction: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="new fraction (1.0 completes)"),
                expect_version: Optional[str] = typer.Option(None, help="act only if this is the candidate"),
                pause: Optional[str] = typer.Option(None, metavar="REASON", help="pause the rollout"),
                resume: bool = typer.Option(False, help="resume a paused rollout"),
                abort: Optional[str] = typer.Option(None, metavar="REASON", help="withdraw the candidate"),
                params: Path = ParamsOption, workdir: Path = WorkdirOption) -> None:
        """Widen, narrow, pause, resume or abort one target's rollout of the candidate already in the channel."""
        from edgeship.flows.publish import one_writer
        from edgeship.ota.repository import open_repository
        from edgeship.ota import rollout as rollouts

        chosen = [x for x in (fraction is not None, pause is not None, resume, abort is not None) if x]
        if len(chosen) != 1:
            fail(EdgeshipError("give exactly one of --fraction F, --pause REASON, --resume, --abort REASON"))
        settings = load_settings(workdir, params)

        def act():
            with one_writer():
                repository = open_repository(settings.ota, workdir.resolve())
                if fraction is not None:
                    return rollouts.set_fraction(repository, channel, target, fraction, expected_version=expect_version)
                if pause is not None:
                    return rollouts.pause(repository, channel, target, pause, expected_version=expect_version)
                if resume:
                    return rollouts.resume(repository, channel, target, expected_version=expect_version)
                return rollouts.abort(repository, channel, target, abort, expected_version=expect_version)

        with library_noise_logged(workdir, "rollout"):  # one_writer: Prefect's concurrency limit
            descriptor = guarded(act)
        _print_channel(descriptor)

    @app.command("channels")
    def channels(params: Path = ParamsOption, workdir: Path = WorkdirOption) -> None:
        """List the channels and, per target, base, candidate, fraction, state and fallback."""
        from edgeship.ota.repository import open_repository
        from edgeship.ota.rollout import read_channel

        from edgeship.console import print_table

        settings = load_settings(workdir, params)
        repository = guarded(open_repository, settings.ota, workdir.resolve())
        rows = []
        for name in repository.channels():
            descriptor = read_channel(repository, name)
            for target, entry in sorted(descriptor.targets.items()):
                rows.append([name, target, _v(entry.base), _v(entry.candidate),
                             f"{entry.fraction:.0%}" if entry.candidate else "—", entry.rollout_state,
                             entry.fallback.label if entry.fallback else "—",
                             entry.allow_failed_gate or entry.state_reason])
        print_table(stdout(), ["channel", "target", "base", "candidate", "fraction", "state", "fallback", "note"],
                    rows, f"channels of {repository.storage}", key_columns=2)
        expires = repository.expires()
        stdout().print("expires: " + ", ".join(f"{r} {t:%Y-%m-%d %H:%M}Z" for r, t in sorted(expires.items())))

    @app.command("resign")
    def resign(params: Path = ParamsOption, workdir: Path = WorkdirOption,
               force: bool = typer.Option(False, help="renew targets and snapshot too, whatever their expiry")) -> None:
        """Renew the timestamp (and snapshot/targets past half their lifetime): the scheduled `resign` job."""
        from edgeship.flows.publish import resign as resign_flow

        with library_noise_logged(workdir, "resign"):
            renewed = guarded(resign_flow, params_path=str(params), workdir=str(workdir), force=force)
        console.print(f"re-signed {', '.join(renewed)}")

    def _keys_repository(params: Path, workdir: Path):
        from edgeship.ota.repository import open_repository

        settings = load_settings(workdir, params)
        return guarded(open_repository, settings.ota, workdir.resolve())

    @keys_app.command("init")
    def keys_init(root_keys: int = typer.Option(1, help="how many root keys"),
                  root_threshold: int = typer.Option(1, help="how many root keys must sign"),
                  params: Path = ParamsOption, workdir: Path = WorkdirOption) -> None:
        """Create the repository and one key per role (root: --root-keys, --root-threshold)."""
        from edgeship.ota.keys import Keystore
        from edgeship.ota.root import init_repository
        from edgeship.ota.storage import open_storage

        settings = load_settings(workdir, params).ota
        location = settings.repository if "://" in settings.repository else str((workdir / settings.repository).resolve())
        repository = guarded(init_repository, open_storage(location, settings.s3_endpoint_url),
                             Keystore(workdir / settings.keystore), root_keys=root_keys, root_threshold=root_threshold,
                             expiry_days=settings.metadata_expiry_days,
                             timestamp_expiry_hours=settings.timestamp_expiry_hours)
        console.print(f"created {repository.storage}; provision devices with "
                                   f"{location}/metadata/root.json. Now move {settings.keystore}/root offline.")

    @keys_app.command("rotate")
    def keys_rotate(role: str, params: Path = ParamsOption, workdir: Path = WorkdirOption) -> None:
        """Replace a role's keys with one new key (root re-signed)."""
        from edgeship.ota.root import rotate

        console.print(f"new {role} key {guarded(rotate, _keys_repository(params, workdir), role)}")

    @keys_app.command("add")
    def keys_add(role: str, params: Path = ParamsOption, workdir: Path = WorkdirOption,
                 signer_uri: Optional[str] = typer.Option(None, help="a key held by a KMS/HSM (securesystemslib URI)"),
                 public_key: Optional[Path] = typer.Option(None, help="that key's public key (PEM)")) -> None:
        """Trust one more key for a role (e.g. a third root key for 2-of-3), new here or behind a signer URI."""
        from edgeship.ota.root import add

        key = None
        if signer_uri is not None:
            if public_key is None:
                fail(EdgeshipError("--signer-uri needs --public-key PEM (the key the KMS/HSM signs with)"))
            from cryptography.hazmat.primitives.serialization import load_pem_public_key
            from securesystemslib.signer import SSlibKey

            key = SSlibKey.from_crypto(load_pem_public_key(public_key.read_bytes()))
        keyid = guarded(add, _keys_repository(params, workdir), role, signer_uri, key)
        console.print(f"added {role} key {keyid}")

    @keys_app.command("revoke")
    def keys_revoke(role: str, keyid: str, params: Path = ParamsOption, workdir: Path = WorkdirOption) -> None:
        """Stop trusting a key (lost or compromised)."""
        from edgeship.ota.root import revoke

        guarded(revoke, _keys_repository(params, workdir), role, keyid)

    @keys_app.command("threshold")
    def keys_threshold(role: str, threshold: int, params: Path = ParamsOption, workdir: Path = WorkdirOption) -> None:
        """How many of a role's keys must sign."""
        from edgeship.ota.root import set_threshold

        guarded(set_threshold, _keys_repository(params, workdir), role, threshold)

    @keys_app.command("resign-root")
    def keys_resign_root(params: Path = ParamsOption, workdir: Path = WorkdirOption) -> None:
        """Renew root's expiry (a year) with the same keys; needs the root threshold of keys."""
        from edgeship.ota.root import resign_root

        console.print(f"root is now v{guarded(resign_root, _keys_repository(params, workdir))}")

    @keys_app.command("list")
    def keys_list(params: Path = ParamsOption, workdir: Path = WorkdirOption) -> None:
        """The keys root trusts per role, their threshold, and which of them this keystore holds."""
        from edgeship.console import print_table

        repository = _keys_repository(params, workdir)
        rows = []
        for role, info in repository._root.roles.items():
            held = {k.keyid for k in repository.keystore.public_keys(role)}
            rows += [[role, str(info.threshold), keyid[:16], "yes" if keyid in held else "no (offline)"]
                     for keyid in info.keyids]
        print_table(stdout(), ["role", "threshold", "key id", "held here"], rows)

    app.add_typer(keys_app, name="keys")


def _v(model) -> str:
    return f"v{model.version}" if model else "—"


def _print_channel(descriptor) -> None:
    print_json(descriptor)
