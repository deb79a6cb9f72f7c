"""The base of every `edgeship` command: its shared options, where its output goes, how it fails.

Output: what a command produces for machines or pipes (`check`'s config, `status --json`, a channel after
`publish`, tables) goes to stdout; messages to people (progress, what was done, errors) go to stderr, so
`edgeship check > params.json` writes the JSON. Errors: one line naming the problem and the fix, and the
exit code its type carries (edgeship.errors.ExitCode: 2 bad input or unreachable service, 3 refused by a
gate or policy). Conventions for both command lines: docs/cli.md.

    >>> settings = load_settings(workdir, params)   # exits 2 with the config error's message
    >>> print_json(settings)                         # stdout, plain JSON
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console

from edgeship.errors import EdgeshipError, exit_code_for

console = Console(stderr=True)  # messages to people; results go to stdout

ParamsOption = typer.Option(Path("params.yaml"), "--params", "-p", help="params.yaml to read")
WorkdirOption = typer.Option(Path("."), "--workdir", "-C", help="project directory (holds params.yaml, dvc.yaml)")
ChannelOption = typer.Option(None, "--channel", help="OTA channel (default: params.ota.channel)")


class LogLevel(str, Enum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


def show_version(asked: bool) -> None:
    """`--version`: print the installed version and stop."""
    if asked:
        from edgeship.command_line import package_version

        print(f"edgeship {package_version()}")
        raise typer.Exit()


def root_options(version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True,
                                              help="print edgeship's version and exit"),
                 verbose: int = typer.Option(0, "--verbose", "-v", count=True,
                                             help="more log detail on stderr: -v info, -vv debug"),
                 log_level: Optional[LogLevel] = typer.Option(None, "--log-level", case_sensitive=False,
                                                              help="log level (overrides -v)")) -> None:
    """Options every command takes before its name: `edgeship -v run`, `edgeship --log-level debug status`."""
    from edgeship.command_line import configure_logging, log_level_for

    configure_logging(log_level_for(verbose, log_level.value if log_level else None))
    quiet_libraries()  # Prefect's and MLflow's defaults, unless -v asked for more (or the environment says)


def fail(error: Exception) -> NoReturn:
    """Print an error as one line and exit with the code its type carries."""
    console.print(f"[bold red]error:[/] {error}", highlight=False)
    raise typer.Exit(code=exit_code_for(error))


def guarded(function, *args, **kwargs):
    """Call `function`; an EdgeshipError it raises ends the command through `fail`."""
    try:
        return function(*args, **kwargs)
    except EdgeshipError as error:
        fail(error)


def load_settings(workdir: Path, params: Path):
    """params.yaml under `workdir`, validated (a bad one ends the command with exit code 2)."""
    from edgeship.config import load_params

    return guarded(load_params, workdir / params)


def quiet_libraries() -> None:
    """Prefect's and MLflow's own log lines would interleave with the CLI's output (edgeship.console): every
    command starts with them at WARNING (set before either is imported)."""
    from edgeship.console import quiet_libraries as quiet

    quiet()


def print_json(record) -> None:
    """A record (pydantic) or JSON text on stdout, plain: no colour, no wrapping, one trailing newline."""
    text = record if isinstance(record, str) else record.model_dump_json(indent=2)
    sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


def stdout() -> Console:
    """A rich console on stdout, for tables that are a command's result."""
    return Console()
