"""The command lines' conventions (docs/cli.md), as a user's shell meets them: `--version`, results on stdout and
messages on stderr (`edgeship check > params.json`), one exit-code scheme for `edgeship` and `edgeship-device`,
`-v`/`--log-level`, and shell completion for both. Real processes; the cases that need a registry or an OTA
repository with releases are asserted where those exist (test_publish_gate: 3 for a gate's refusal in promote and
publish; test_ota: 2 and 3 from `update`; test_release_e2e: 3 from `run`, 2 for a broken config)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import get_args

import pytest
import yaml
from doc_blocks import REPO, doc_block, link_venv, run_shell

BIN = Path(sys.executable).parent
EDGESHIP, DEVICE = str(BIN / "edgeship"), str(BIN / "edgeship-device")


def run(*command: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def project(tmp_path) -> Path:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_the_pages_block_runs_as_typed_and_check_writes_only_json_to_stdout(project):
    link_venv(project)
    run_shell(doc_block("docs/cli.md", "cli-conventions"), cwd=project, env=dict(os.environ))
    resolved = json.loads((project / "params.json").read_text())
    assert resolved["project"] == yaml.safe_load((project / "params.yaml").read_text())["project"]

    checked = run(EDGESHIP, "check", cwd=project)
    assert checked.returncode == 0 and json.loads(checked.stdout) == resolved and checked.stderr == ""
    for program in (EDGESHIP, DEVICE):
        shown = run(program, "--version", cwd=project)
        assert shown.returncode == 0 and shown.stdout == f"{Path(program).name} {version('edgeship')}\n"


def test_bad_input_exits_2_in_both_commands_with_one_line_that_names_the_fix(project):
    (project / "broken.yaml").write_text("train:\n  epochs: -3\n")
    commands = ([EDGESHIP, "check", "-p", "broken.yaml"], [EDGESHIP, "status", "-p", "missing.yaml"],
                [EDGESHIP, "no-such-command"], [DEVICE, "no-such-command"],
                [DEVICE, "update", "--state-dir", "never-provisioned"],
                [DEVICE, "provision", "--state-dir", "d"], [DEVICE, "confirm", "--state-dir", "d"])
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda command: run(*command, cwd=project), commands))
    for command, done in zip(commands, results):
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr and done.stderr.strip(), (command, done.stderr)
    broken = results[0]
    assert broken.stdout == "" and "'train.epochs'" in broken.stderr


def _closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_repository_exits_2_and_log_level_decides_what_stderr_shows(project):
    assert run(EDGESHIP, "keys", "init", cwd=project).returncode == 0  # a real root.json to provision with
    update = ["update", "--repo-url", f"http://127.0.0.1:{_closed_port()}", "--root", "ota-repo/metadata/1.root.json",
              "--target", "onnx-int8"]
    shown = run(DEVICE, *update, "--state-dir", "a", cwd=project)
    assert shown.returncode == 2 and json.loads(shown.stdout)["status"] == "error"  # unreachable service
    assert "WARNING edgeship.device.updater: update check failed" in shown.stderr
    hidden = run(DEVICE, "--log-level", "error", *update, "--state-dir", "b", cwd=project)
    assert hidden.returncode == 2 and json.loads(hidden.stdout)["status"] == "error" and hidden.stderr == ""

    (project / "ota-repo").rename(project / "old-repo")
    quiet = run(EDGESHIP, "keys", "init", cwd=project)
    assert quiet.returncode == 0 and "INFO" not in quiet.stderr and "created" in quiet.stderr
    shutil.rmtree(project / "ota-repo")
    shutil.rmtree(project / ".edgeship")
    verbose = run(EDGESHIP, "-v", "keys", "init", cwd=project)
    assert verbose.returncode == 0 and "INFO edgeship.ota.keys: created root key" in verbose.stderr


def test_every_update_status_has_its_exit_code():
    from edgeship.device.updater_cli import UPDATE_EXIT_CODES
    from edgeship.errors import ExitCode
    from edgeship.records.wire import UpdateStatus

    assert set(UPDATE_EXIT_CODES) == set(get_args(UpdateStatus))
    assert {s for s, code in UPDATE_EXIT_CODES.items() if code == ExitCode.OK} == {"updated", "up_to_date",
                                                                                   "not_in_cohort"}
    assert {s for s, code in UPDATE_EXIT_CODES.items() if code == ExitCode.REFUSED} == {"refused", "rolled_back"}


def test_error_types_carry_the_scheme():
    from edgeship import errors

    refused = {errors.GateFailed, errors.SignatureError, errors.SmokeTestFailed}
    for error in vars(errors).values():
        if isinstance(error, type) and issubclass(error, errors.EdgeshipError):
            expected = errors.ExitCode.REFUSED if error in refused else errors.ExitCode.BAD_INPUT
            assert errors.exit_code_for(error("x")) == expected, error
    assert errors.exit_code_for(KeyError("a bug")) == errors.ExitCode.CRASHED


def _complete(script: str, words: list[str]) -> list[str]:
    """Source a completion script in bash and ask it to complete `words` (the last one being typed)."""
    function = "_edgeship_device" if words[0] == "edgeship-device" else "_edgeship_completion"
    typed = " ".join(f"'{w}'" for w in words)
    probe = (f"{script}\nCOMP_WORDS=({typed}); COMP_CWORD={len(words) - 1}\n"
             f"{function} {words[0]}\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
    done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_shell_completion_of_both_commands(tmp_path):
    edgeship_script = run(EDGESHIP, "--show-completion", "bash", cwd=tmp_path)
    assert edgeship_script.returncode == 0 and "complete" in edgeship_script.stdout
    assert _complete(edgeship_script.stdout, ["edgeship", "fl"]) == ["fleet"]
    assert _complete(edgeship_script.stdout, ["edgeship", "fleet", "ro"]) == ["rollout"]
    assert "--summary" in _complete(edgeship_script.stdout, ["edgeship", "run", "--s"])

    device_script = run(DEVICE, "--show-completion", cwd=tmp_path)
    assert device_script.returncode == 0
    assert _complete(device_script.stdout, ["edgeship-device", "up"]) == ["update"]
    assert _complete(device_script.stdout, ["edgeship-device", "--log-level", "debug", "update", "--int"]) == [
        "--interval"]  # the updater's options, wired only when asked for, are in the script too
    assert "--no-fork-server" in _complete(device_script.stdout, ["edgeship-device", "agent", "--no"])
