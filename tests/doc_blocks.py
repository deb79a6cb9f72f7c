"""The command blocks of README.md and docs/*.md, read by the tests that run them as typed.

Every fenced block names its language. A shell block (bash, sh, shell, console) is one of:

- tested: the line above its fence names it, `<!-- block: NAME -->` (unique in its page), and a test reads
  it with `doc_block("docs/page.md", "NAME")` and runs what it returns, as typed (with `replace=` for what
  a test must change: a free port for a fixed one, a temporary directory for /tmp/device; each replaced
  text must still be in the block, so a block and its test cannot drift apart);
- or visibly not run: its first line is `# not run here: REASON` (e.g. "needs a Kubernetes cluster").

tests/test_docs.py enforces it: it finds every `doc_block(...)` call with literal arguments in tests/*.py
and fails on a shell block that is neither named and read, nor marked, and on a reference to a block that
does not exist (so a test that is skipped on this machine still cannot point at nothing).

    >>> script = doc_block("docs/real-services.md", "webhook", replace={"8787": str(port)})
    >>> run_shell(script, cwd=project, env=env)      # bash -e: the first failing line fails the test

A block with background jobs (`... &`) runs through `Processes.start_block`: its foreground commands must
succeed, its jobs keep running until `Processes.stop()` ends everything their sessions started.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SHELLS = {"bash", "sh", "shell", "console"}
NOT_RUN = "# not run here:"
_NAME = re.compile(r"^<!-- block: ([a-z0-9][a-z0-9-]*) -->$")
_FENCE = re.compile(r"^( *)(```+)([^`]*)$")


@dataclass(frozen=True)
class Block:
    page: str           # relative to the repository root, e.g. "docs/fleet-loop.md"
    line: int           # 1-based line of the opening fence
    language: str       # the fence's info string ("" when it names none)
    text: str
    name: str | None    # from `<!-- block: NAME -->` on the line above the fence

    @property
    def is_shell(self) -> bool:
        return self.language in SHELLS

    @property
    def not_run_reason(self) -> str | None:
        first = self.text.splitlines()[0] if self.text else ""
        return first[len(NOT_RUN):].strip() if first.startswith(NOT_RUN) else None


def pages() -> list[str]:
    """README.md and every page under docs/, relative to the repository root."""
    return ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").rglob("*.md"))]


def blocks(page: str) -> list[Block]:
    """The fenced blocks of one page, in order (fences may be indented in a list item, or longer than three
    backticks around an example that holds a fence itself)."""
    lines = (REPO / page).read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening:
            indent, fence, language = opening.group(1), opening.group(2), opening.group(3).strip()
            end = next((j for j in range(i + 1, len(lines))
                        if lines[j].strip().startswith(fence) and not lines[j].strip().strip("`")), None)
            assert end is not None, f"{page}:{i + 1}: a fence that is never closed"
            named = _NAME.match(lines[i - 1].strip()) if i else None
            text = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1:end])
            found.append(Block(page, i + 1, language, text, named.group(1) if named else None))
            i = end
        i += 1
    return found


def doc_block(page: str, name: str, replace: dict[str, str] | None = None) -> str:
    """The text of the block named NAME in PAGE, with each `replace` key (which must be in it) replaced."""
    named = [b for b in blocks(page) if b.name == name]
    assert len(named) == 1, f"{page} has {len(named)} blocks named {name!r}; name one `<!-- block: {name} -->`"
    text = named[0].text
    for old, new in (replace or {}).items():
        assert old in text, (f"{page}'s block {name!r} no longer contains {old!r}, which its test replaces: "
                             f"update the test with the page\n{text}")
        text = text.replace(old, new)
    return text


def run_shell(script: str, cwd: Path, env: dict, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """Run a block's text in bash as a user's shell would, stopping at the first failing command."""
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    assert done.returncode == 0, f"the block failed (exit {done.returncode}):\n{script}\n{done.stdout}\n{done.stderr}"
    return done


def link_venv(directory: Path) -> None:
    """`.venv` in a project directory: the blocks type `.venv/bin/edgeship`, as in a clone."""
    import sys

    venv = directory / ".venv"
    if not venv.exists():
        venv.symlink_to(Path(sys.executable).parent.parent, target_is_directory=True)


class Processes:
    """Long-running CLI processes of the test, each in a session of its own, stopped in reverse order.

    A doc block's background jobs (`... &`) outlive its bash: they are found by the session they share."""

    def __init__(self, logs: Path):
        self.logs, self.running = logs, []

    def start(self, name: str, argv: list[str], cwd: Path, env: dict) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.running.append((name, process, log))
        return process

    def start_block(self, name: str, script: str, cwd: Path, env: dict) -> None:
        """Run a doc block as a user's shell would; its foreground commands must succeed, its jobs keep running."""
        shell = self.start(name, ["bash", "-e", "-o", "pipefail", "-c", script], cwd, env)
        assert shell.wait(timeout=300) == 0, f"{script}\n{self.log(name)}"

    def session(self, name: str) -> list[psutil.Process]:
        """What the named command started: its session's processes and their children (a worker starts each
        flow run in a session of its own)."""
        leaders = [process.pid for started, process, _ in self.running if started == name]
        members = []
        for candidate in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getsid(candidate.pid) in leaders:
                    members.append(candidate)
        children = []
        for member in members:
            with contextlib.suppress(psutil.Error):
                children += member.children(recursive=True)
        return members + [child for child in children if child not in members]

    def alive(self, name: str, text: str = "") -> bool:
        """Whether a process of the named command (whose command line contains `text`) still runs."""
        for process in self.session(name):
            with contextlib.suppress(psutil.Error):
                if process.status() != psutil.STATUS_ZOMBIE and text in " ".join(process.cmdline()):
                    return True
        return False

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()[-3000:]

    def stop(self) -> None:
        for name, process, log in reversed(self.running):
            everything = self.session(name)
            for each in everything:
                with contextlib.suppress(psutil.Error):
                    each.terminate()
            _, left = psutil.wait_procs(everything, timeout=20)
            for each in left:
                with contextlib.suppress(psutil.Error):
                    each.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
            log.close()
