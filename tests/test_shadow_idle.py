"""The shadow runs in the primary's idle time only: a burst of back-to-back answers makes it skip its samples
(counted) instead of slowing the answers; requests with gaps between them are shadowed. A real installed
active model and shadow (through the signed repository and the updater), in-process."""

from __future__ import annotations

import time

import numpy as np

from edgeship.device.serve import FieldRuntime
from edgeship.device.state import provision
from edgeship.device.updater import DeviceUpdater, UpdaterConfig
from edgeship.ota.publish import publish_shadow

from ota_world import MODEL, TARGET, OtaWorld, make_artifact


def test_the_shadow_waits_for_idle_time_and_skips_a_burst(tmp_path):
    world = OtaWorld(tmp_path)
    try:
        world.publish("1")
        publish_shadow(world.repository, MODEL, "2", make_artifact(tmp_path / "shadow", "2"), shadow_fraction=1.0,
                       sample_rate=1.0)
        state_dir = tmp_path / "device"
        provision(state_dir, "dev-shadow", "stable", TARGET, world.url, world.root)
        DeviceUpdater(UpdaterConfig(repository_url=world.url, trusted_root=world.root, state_dir=state_dir,
                                    target=TARGET, self_check=False)).update()
        field = FieldRuntime(state_dir, telemetry=None, shadow_sample_rate=1.0)
        try:
            assert field.health()["versions"]["shadow"] == "2"
            field.shadow.max_wait_s = 0.2
            batch = np.zeros((1, 1, 8, 8), dtype=np.float32)
            deadline = time.monotonic() + 1.0  # a burst: every answer offered to the shadow, no gap between them
            burst = 0
            while time.monotonic() < deadline:
                assert field.predict(batch).version == "1"  # the shadow never answers
                burst += 1
            time.sleep(0.5)  # what the queue held runs (or is skipped) in the quiet afterwards
            during_burst = field.shadow.compared
            assert field.shadow.skipped >= burst - 10 and during_burst <= 10, (burst, field.shadow.skipped)
            for _ in range(20):  # an application with gaps between requests
                field.predict(batch)
                time.sleep(0.01)
            time.sleep(0.2)
            assert field.shadow.compared - during_burst >= 15
        finally:
            field.close()
    finally:
        world.close()
