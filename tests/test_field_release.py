"""The release's side of the field split: lab train + field train joined for training, the field test split beside
the lab test split and scored apart, the field split's hash in the data lineage; nothing changes without one."""

from __future__ import annotations

import json
import socket

import numpy as np
import torch
from torch import nn

from edgeship.records import PreparedData, TrainedModel
from edgeship.tasks.data import load_split, write_npz
from edgeship.tasks.field_data import field_test_accuracy, with_field_split


def always_two(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """A linear classifier (the test sets its weights so that it answers class 2 whatever it sees)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size * input_size, num_classes))


def prepared(tmp_path) -> PreparedData:
    directory = tmp_path / "prepared"
    directory.mkdir()
    rng = np.random.default_rng(0)
    counts = {"train": 30, "val": 10, "test": 10, "calibration": 5}
    for split, n in counts.items():
        write_npz(directory / f"{split}.npz", x=rng.random((n, 1, 8, 8), dtype=np.float32),
                  y=rng.integers(0, 10, n).astype(np.int64))
    (directory / "meta.json").write_text(json.dumps({"classes": [str(i) for i in range(10)],
                                                     "input_shape": [1, 8, 8], "counts": counts}))
    return PreparedData(directory=directory, classes=[str(i) for i in range(10)], input_shape=(1, 8, 8),
                        counts=counts, dvc_hash="abc123")


def test_training_data_joins_the_field_split_and_field_test_is_scored_apart(tmp_path):
    data = prepared(tmp_path)
    field = tmp_path / "field"
    assert with_field_split(data, field, tmp_path / "run") is data       # no field split: nothing changes
    field.mkdir()
    write_npz(field / "train.npz", x=np.full((12, 1, 8, 8), 0.2, np.float32), y=np.full(12, 4, np.int64))
    write_npz(field / "test.npz", x=np.full((8, 1, 8, 8), 0.3, np.float32),
              y=np.array([2, 2, 2, 1, 1, 1, 1, 1], np.int64))
    joined = with_field_split(data, field, tmp_path / "run")
    assert joined.counts["train"] == 42 and joined.counts["field_train"] == 12 and joined.counts["field_test"] == 8
    assert joined.dvc_hash.startswith("abc123+field-")
    x, y = load_split(joined, "train")
    assert len(x) == 42 and (y[30:] == 4).all() and np.allclose(x[30:], 0.2)
    np.testing.assert_array_equal(load_split(joined, "test")[1], load_split(data, "test")[1])  # lab test untouched

    model = always_two(10, 1, 8)
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.arange(10) == 2)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    trained = TrainedModel(checkpoint=tmp_path / "model.pt", factory="test_field_release:always_two", num_classes=10,
                           input_shape=(1, 8, 8), val_accuracy=0.1, test_accuracy=0.1)
    assert field_test_accuracy(trained, joined) == 3 / 8
    assert field_test_accuracy(trained, data) is None


def test_a_release_pulls_where_params_say_and_an_unreachable_bucket_fails_nothing(tmp_path, monkeypatch):
    from edgeship.config import parse_params
    from edgeship.flows.release_tasks import pull_field_samples
    from edgeship.registry.tracking import ReleaseRun

    for name, value in (("AWS_ACCESS_KEY_ID", "x"), ("AWS_SECRET_ACCESS_KEY", "x"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    with socket.socket() as probe:                      # a port nothing listens on: the bucket is unreachable
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    params = parse_params({"field_data": {"source": "s3://ota/field", "endpoint_url": f"http://127.0.0.1:{closed}"},
                           "registry": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}})
    run = ReleaseRun.start(params.registry, tmp_path, run_name="field-pull")
    pull_field_samples(params, tmp_path, run)           # returns: the release goes on without new samples
    run.finish()
    from mlflow import MlflowClient

    tags = MlflowClient(tracking_uri=params.registry.tracking_uri).get_run(run.run_id).data.tags
    assert tags["edgeship.field_pull"].startswith("failed: cannot read field samples from s3://ota/field")
    assert not (tmp_path / "data" / "field" / "train.npz").exists()
