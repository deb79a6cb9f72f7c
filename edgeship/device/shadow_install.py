"""The updater's shadow step: install the channel entry's shadow model beside the active one, for the shadow cohort.

A device is in the shadow cohort when its place for the shadow release is below the entry's
`shadow_fraction` (a salt of its own, so the shadow cohort is not the candidate's rollout cohort).
A shadow equal to the active model is pointless and is removed, as is one the entry no longer names.
The shadow is verified like any model (signed metadata, sha256, smoke test) but has no probation: it
never answers. The step also keeps the entry's drift reference next to the state (`drift_reference.json`)
for the device's own drift score.

    >>> ensure_shadow(updater, tuf, entry)     # called by DeviceUpdater.update after the fallback step
"""

from __future__ import annotations

import json
import logging

from edgeship.device.install import place, prune, smoke_test
from edgeship.device.state import DeviceState, changing_state, is_intact, log_event
from edgeship.device.telemetry import DRIFT_REFERENCE_FILE
from edgeship.files import write_atomic
from edgeship.ota.channel import cohort_position

logger = logging.getLogger(__name__)


def in_shadow_cohort(device_id: str, model_name: str, entry) -> bool:
    if entry.shadow is None or entry.shadow_fraction <= 0:
        return False
    return cohort_position(device_id, model_name, f"{entry.shadow.version}/shadow") < entry.shadow_fraction


def ensure_shadow(updater, tuf, entry) -> None:
    """Install, keep or remove the shadow slot so that it matches the entry for this device."""
    state_dir = updater.state_dir
    _keep_drift_reference(state_dir, entry)
    state = DeviceState.load(state_dir)
    wanted = entry.shadow if in_shadow_cohort(updater.device_id, updater._model_name, entry) else None
    if wanted is not None and state.active is not None and wanted.sha256 == state.active.sha256:
        wanted = None
    if wanted is None:
        if state.shadow is not None:
            with changing_state(state_dir) as current:
                current.shadow = None
                current.save(state_dir)
                prune(state_dir, current)
        return
    if state.shadow is not None and state.shadow.sha256 == wanted.sha256 and is_intact(state_dir, wanted, "shadow"):
        return
    try:
        downloaded = updater._download(tuf, wanted, wanted.target_path, wanted.sha256, wanted.bytes)
        smoke_test(wanted, downloaded, None, threads=updater.config.threads)
    except Exception as error:  # a bad shadow costs the comparison, never the device
        log_event(state_dir, "refused", wanted.version, updater.config.target, f"shadow: {error}"[:200], "shadow")
        logger.warning("refused the shadow model v%s: %s", wanted.version, error)
        return
    place(state_dir, wanted, downloaded, "shadow")
    with changing_state(state_dir) as current:
        current.shadow = wanted
        current.save(state_dir)
        prune(state_dir, current)
    log_event(state_dir, "shadow_installed", wanted.version, updater.config.target, wanted.label, "shadow")


def _keep_drift_reference(state_dir, entry) -> None:
    path = state_dir / DRIFT_REFERENCE_FILE
    if entry.drift_reference is None:
        path.unlink(missing_ok=True)
        return
    data = json.dumps(entry.drift_reference, sort_keys=True).encode()
    if not path.is_file() or path.read_bytes() != data:
        write_atomic(path, data)
