"""On a device serving a new model, the model it replaced (the rollback slot) runs on a sampled share of inputs in
the primary's idle time, as the shadow does, and the window's record says how often their answers agreed. Real
ONNX models of the fleet simulator (two good releases agreeing on ~96% of digits, a silent failure with rotated
classes), installed through the signed repository and the updater, in-process."""

from __future__ import annotations

import time

import numpy as np

from edgeship.device.field_samples import keep_field_sampling
from edgeship.device.serve import FieldRuntime
from edgeship.device.state import compared_model, provision
from edgeship.device.updater import DeviceUpdater, UpdaterConfig
from edgeship.records.field import FieldSampling, SampleMeta

from fleet_simulator import digits_models
from ota_world import TARGET, OtaWorld


def answer(field: FieldRuntime, images: np.ndarray) -> list[str]:
    """An application with short gaps between requests (the idle time comparisons run in); the versions answering."""
    versions = []
    for image in images:
        versions.append(field.predict(image[None]).version)
        time.sleep(0.003)
    time.sleep(0.3)  # the last sampled inputs are compared in the quiet afterwards
    return versions


def test_the_active_model_is_compared_with_the_one_it_replaced(tmp_path):
    models, images, _ = digits_models()
    world = OtaWorld(tmp_path)
    state_dir = tmp_path / "device"
    try:
        world.publish("1", content=models["good-1"])
        provision(state_dir, "dev-compare", "stable", TARGET, world.url, world.root)
        updater = DeviceUpdater(UpdaterConfig(repository_url=world.url, trusted_root=world.root, state_dir=state_dir,
                                              target=TARGET, self_check=False))
        updater.update()
        field = FieldRuntime(state_dir, telemetry=None, compare_sample_rate=1.0)
        try:
            assert set(answer(field, images[:25])) == {"1"}       # 20 good answers confirm v1
            assert compared_model(state_dir) is None              # it replaced nothing
            assert field.aggregator.close_window().compared is None

            world.publish("2", content=models["good-2"])
            updater.update()
            assert compared_model(state_dir).version == "1"
            assert set(answer(field, images[:200])) == {"2"}
            good = field.aggregator.close_window()
            assert good.versions.active == "2" and good.compared.version == "1"
            assert good.compared.samples == field.compare.compared >= 150 and good.compared.errors == 0
            assert 0.9 <= good.compared.agreement <= 0.99, good.compared       # two good models: ~96%
            assert good.compared.latency.total == good.compared.samples
            assert good.shadow is None                                         # no shadow was offered

            world.publish("3", content=models["silent"])                       # v2 confirmed: v3 replaces it
            updater.update()
            assert compared_model(state_dir).version == "2"
            # the channel samples field inputs, none at random: only what the replaced model disagreed with is kept
            keep_field_sampling(state_dir, FieldSampling(
                upload_url="s3://field/samples", endpoint_url="http://127.0.0.1:9", sample_rate=0.0,
                low_confidence=0.0, upload_every_s=3600).model_dump())
            assert set(answer(field, images[:100])) == {"3"}
            silent = field.aggregator.close_window()
            assert silent.compared.version == "2" and silent.compared.samples >= 75
            assert silent.compared.agreement < 0.05, silent.compared           # rotated classes: almost never
            field.samples.write_queued()
            kept = [SampleMeta.model_validate_json(str(np.load(p)["meta"])) for p in field.samples.pending()
                    if p.suffix == ".npz"]
            disagreed = silent.compared.samples - silent.compared.agreements
            # each disagreement reached the sampler: kept, or counted dropped past its queue (64 between two writes)
            assert len(kept) + field.samples.totals["dropped"] == disagreed and len(kept) >= 50
            assert {m.reason for m in kept} == {"disagreement"}
            assert {m.version for m in kept} == {"3"}

            world.publish("2", content=models["good-2"])    # the base again: back to v2, nothing to compare with
            updater.update()
            assert compared_model(state_dir) is None
            assert set(answer(field, images[:30])) == {"2"}
            assert field.aggregator.close_window().compared is None
        finally:
            field.close()
    finally:
        world.close()
