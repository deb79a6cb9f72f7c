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

import contextlib
import sys
from enum import Enum
from pathlib import Path
from typing import IO, Iterator, NoReturn, Optional

import typer
from rich.console import Console

from edgeship.errors import EdgeshipError, exit_code_for

console = Console(stderr=True)  # messages to people; results go to stdout
_results: IO[str] | None = None  # the real stdout while library_noise_logged points fd 1 at a log file

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
    out = _results or sys.stdout
    out.write(text.rstrip("\n") + "\n")
    out.flush()


def stdout() -> Console:
    """A rich console on stdout, for tables and lines that are a command's result."""
    return Console(file=_results) if _results is not None else Console()


@contextlib.contextmanager
def library_noise_logged(workdir: Path, command: str) -> Iterator[Path]:
    """Run a command's work with the libraries' output in `.edgeship/logs/<command>-<time>.log`, not the terminal.

    Prefect's ephemeral server and concurrency warnings, MLflow's download bars and native runtimes' lines go to
    the log (edgeship.console.library_output_to); edgeship's own records at the command's log level (warnings;
    `-v` info) and its results (`stdout()`, `print_json`) still reach the terminal. The log's path is printed
    when anything went into it; an empty one is removed.
    """
    import logging
    import time

    from edgeship.console import library_output_to

    global _results
    path = workdir.resolve() / ".edgeship" / "logs" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    own = logging.getLogger("edgeship")
    # Where results and messages go: the terminal behind fd 1 and 2, or streams that are no file descriptor at all
    # (a test runner's), which pointing fd 1 and 2 at the log leaves alone.
    streams = sys.stdout, sys.stderr
    try:
        with library_output_to(path, console) as terminal:
            out, err = (terminal.stdout, terminal.stderr) if _on_fds(*streams) else streams
            console.file = err
            to_terminal = logging.StreamHandler(err)
            to_terminal.setLevel(own.getEffectiveLevel())
            to_terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            own.addHandler(to_terminal)
            _results = out
            try:
                yield path
            finally:
                _results = None
                own.removeHandler(to_terminal)
    finally:
        if path.is_file() and path.stat().st_size:
            console.print(f"[dim]log: {path}[/]", soft_wrap=True)  # a path to copy: never folded
        else:
            path.unlink(missing_ok=True)


def _on_fds(stdout, stderr) -> bool:
    try:
        return stdout.fileno() == 1 and stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return False
