"""The device side's tests on linux/arm64: docs/device.md's block runs infra/aarch64/run-device-tests.sh, which
builds (or reuses) a Debian bookworm arm64 userland, installs edgeship[device,litert] from PyPI's aarch64 wheels
and runs the agent, updater, probation, serve, telemetry and metrics tests inside it under QEMU user-mode with
QEMU_CPU=cortex-a72. What that proves is function on aarch64, not speed (docs/device.md#on-aarch64)."""

from __future__ import annotations

import re
import subprocess

import pytest

from doc_blocks import doc_block
from ota_world import ROOT_DIR

CANNOT = 77  # the script's exit status where this machine cannot run it (no root, no binfmt_misc)


@pytest.mark.timeout(2700)  # from nothing: the userland and the venv are built first (about 11-15 min on 2 cores)
def test_device_tests_pass_on_aarch64_under_qemu():
    script = doc_block("docs/device.md", "aarch64-tests")
    done = subprocess.run(["bash", "-e", "-c", script], cwd=ROOT_DIR, capture_output=True, text=True, timeout=2600)
    if done.returncode == CANNOT:
        pytest.skip(done.stderr.strip().splitlines()[-1])
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "machine: aarch64 python: aarch64" in output, output[-3000:]  # uname -m and Python, inside
    assert "QEMU_CPU=cortex-a72" in output
    summary = [line for line in done.stdout.splitlines() if re.search(r"\d+ passed", line)][-1]
    passed = int(re.search(r"(\d+) passed", summary)[1])
    assert passed >= 60 and "failed" not in summary and "error" not in summary, summary  # 67 selected today
