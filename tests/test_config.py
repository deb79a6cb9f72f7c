"""params.yaml validation: bad config stops the run before any work, naming the key and what is allowed."""

from pathlib import Path

import pytest
import yaml

from edgeship.config import load_params, parse_params
from edgeship.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_shipped_params_yaml_is_valid():
    params = load_params(REPO / "params.yaml")
    assert {"onnx-fp32", "onnx-int8"} <= set(params.targets)
    assert set(params.gate) == set(params.targets)
    assert params.gate_for("onnx-int8").required


@pytest.mark.parametrize("raw, key, hint", [
    ({"train": {"epochs": -1}}, "train.epochs", "greater than or equal to 1"),
    ({"train": {"epoch": 3}}, "train.epoch", "unknown key"),
    ({"targets": ["onnx-fp32", "tpu-int4"]}, "targets", "known targets"),
    ({"train": {"lr": "fast"}}, "train.lr", "valid number"),
    ({"data": {"channels": 2}}, "data.channels", "1 or 3"),
    ({"gate": {"tflite-int8": {"max_size_mb": 1}}}, "gate", "not in 'targets'"),
    ({"gate": {"onnx-fp32": {"max_accuracy_drop": None}}}, "gate.onnx-fp32", "at least one of"),
    ({"model": {"factory": "my_models.build"}}, "model.factory", "package.module:function"),
    ({"devices": [{"name": "a"}, {"name": "a"}]}, "devices", "unique"),
])
def test_bad_values_name_the_key_and_what_is_allowed(raw, key, hint):
    with pytest.raises(ConfigError) as caught:
        parse_params(raw)
    message = str(caught.value)
    assert f"'{key}'" in message
    assert hint in message


def test_broken_yaml_and_missing_file(tmp_path):
    broken = tmp_path / "params.yaml"
    broken.write_text("train: {epochs: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(broken)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_params(tmp_path / "list.yaml")
