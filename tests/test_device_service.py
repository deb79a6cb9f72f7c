"""infra/device/: the systemd units pass `systemd-analyze verify` as shipped, and install.sh installs a device for
real (a system user without a login shell, a venv with edgeship[device,litert], a provisioned state directory,
units that verify with its paths) whose updater then installs a model as that user."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from doc_blocks import doc_block, run_shell
from ota_world import ROOT_DIR, TARGET, OtaWorld

UNITS = sorted((ROOT_DIR / "infra" / "device").glob("edgeship-*.*"))


def systemd_analyze() -> str:
    """systemd-analyze, installed with apt where it is missing; a skip that says why where it cannot be."""
    found = shutil.which("systemd-analyze")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd",
                       shell=True, capture_output=True, timeout=600)
        found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is missing and cannot be installed here (apt-get install systemd needs root "
                    "and apt)")
    return found


def verify(units: list[Path]) -> None:
    """`systemd-analyze verify`: exit 0 and not one line (it exits 0 on an option it only warns about)."""
    result = subprocess.run([systemd_analyze(), "verify", *map(str, units)], capture_output=True, text=True,
                            cwd=units[0].parent, timeout=120)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_units_verify_as_shipped(tmp_path):
    assert {u.name for u in UNITS} == {"edgeship-agent.service", "edgeship-serve.service", "edgeship-update.service",
                                       "edgeship-update.timer"}
    for unit in UNITS:  # their one path a test machine lacks: the device's venv (this checkout's stands in)
        (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/edgeship/venv", str(ROOT_DIR / ".venv")))
    verify(sorted(tmp_path.iterdir()))
    text = {u.name: u.read_text() for u in UNITS}
    for name in ("edgeship-agent.service", "edgeship-serve.service"):
        assert "Type=notify" in text[name] and "WatchdogSec=" in text[name] and "Restart=on-failure" in text[name]
    assert "RandomizedDelaySec=" in text["edgeship-update.timer"]
    broken = tmp_path / "edgeship-serve.service"
    broken.write_text(broken.read_text().replace("WatchdogSec=30", "WatchdogSec=thirty"))
    with pytest.raises(AssertionError, match="Failed to parse sec value"):
        verify([broken])  # the check fails on a unit systemd would only half understand


def test_install_script_installs_a_provisioned_service_user_device(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("infra/device/install.sh creates a system user and chowns the state directory: it needs root")
    world = OtaWorld(tmp_path)
    world.publish("1")
    # Not under pytest's tmp_path: its parents are private to root, and the service user must reach its files.
    where = Path(tempfile.mkdtemp(prefix="edgeship-device-install-", dir="/var/tmp"))
    where.chmod(0o755)
    user = f"edgeship-{uuid.uuid4().hex[:6]}"
    root = where / "root.json"
    shutil.copy(world.root, root)
    root.chmod(0o644)
    try:
        # docs/device.md's command, with this test's user and paths (not the machine's) and this checkout's package
        test_options = (f"--user {user} --prefix {where}/opt --state-dir {where}/state --unit-dir {where}/units "
                        f"--config-dir {where}/etc --no-start --package '{ROOT_DIR}[device,litert]' "
                        f"--constraints {ROOT_DIR}/requirements/constraints.txt")
        script = doc_block("docs/device.md", "device-install", replace={
            "infra/device/install.sh": f"bash {ROOT_DIR}/infra/device/install.sh {test_options}",
            "https://ota.example.com": world.url, "--root root.json": f"--root {root}", "pi4-0042": "dev-installed"})
        run_shell(script, cwd=ROOT_DIR, env=dict(os.environ), timeout_s=900)
        account = pwd.getpwnam(user)
        assert account.pw_shell.endswith("nologin") and account.pw_uid < 1000  # a system user, no login shell
        state = where / "state"
        assert state.stat().st_uid == account.pw_uid and stat.S_IMODE(state.stat().st_mode) == 0o750
        assert (state / "device.json").stat().st_uid == account.pw_uid  # provisioned as the service user
        assert '"dev-installed"' in (state / "device.json").read_text()
        verify(sorted((where / "units").iterdir()))
        serve = (where / "units" / "edgeship-serve.service").read_text()
        assert f"User={user}" in serve and f"{where}/opt/venv/bin/edgeship-device serve --state-dir {state}" in serve
        # the updater as the service would run it: that user, the installed venv, the provisioned state
        update = subprocess.run(["runuser", "-u", user, "--", str(where / "opt" / "venv" / "bin" / "edgeship-device"),
                                 "update", "--state-dir", str(state)], capture_output=True, text=True, timeout=300)
        assert update.returncode == 0 and '"installed_version":"1"' in update.stdout.replace(" ", ""), update
        assert (state / "versions" / "1" / "model.onnx").stat().st_uid == account.pw_uid
    finally:
        subprocess.run(["userdel", user], capture_output=True)
        shutil.rmtree(where, ignore_errors=True)
        world.close()
