"""TensorFlow's converter as the second LiteRT route: ONNX -> onnx2tf -> TFLiteConverter in its own environment
(.venv/tf-converter), selectable per target (`compile.<target>.route`), int8 with int8 or uint8 I/O, and the
fallback when litert-torch cannot convert. Digits at 8x8, a tiny ResNet trained for two epochs.
"""

from __future__ import annotations

import pytest

from edgeship.config import DataParams, ModelParams, TrainParams, parse_params
from edgeship.errors import CompileError, ConfigError
from edgeship.tasks.compile import CompileInputs, get_target
from edgeship.tasks.compile.litert import tf_available as available, tf_converter_python

needs_tf = pytest.mark.skipif(not available(), reason="TensorFlow's converter route needs .venv/tf-converter "
                                                      "(EDGESHIP_TF_CONVERTER=1 bash infra/install.sh; 2.6 GB, opt-in)")


def test_compile_options_are_per_litert_target():
    params = parse_params({"targets": ["onnx-fp32", "tflite-int8"],
                           "compile": {"tflite-int8": {"route": "tf", "io": "uint8"}}})
    assert params.compile["tflite-int8"].io == "uint8"
    with pytest.raises(ConfigError, match=r"LiteRT targets \(tflite-\*\) only; remove \['onnx-int8'\]"):
        parse_params({"compile": {"onnx-int8": {"route": "tf"}}})
    with pytest.raises(ConfigError, match="'io' applies to tflite-int8"):
        parse_params({"compile": {"tflite-fp16": {"io": "int8"}}})


def test_a_missing_tf_environment_says_how_to_make_one(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGESHIP_TF_PYTHON", str(tmp_path / "nope" / "python"))
    with pytest.raises(CompileError, match="EDGESHIP_TF_PYTHON=.* does not exist"):
        tf_converter_python()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from edgeship.tasks.data import export_digits, prepare
    from edgeship.tasks.host_check import reference_logits
    from edgeship.tasks.train import train

    root = tmp_path_factory.mktemp("tf-route")
    export_digits(root / "raw")
    data = prepare(root / "raw", root / "prepared", DataParams(input_size=8, calibration_size=16))
    trained = train(data, ModelParams(factory="edgeship.models.zoo:small_resnet", kwargs={"widths": [8, 16]}),
                    TrainParams(epochs=2), root / "model")
    return data, trained, reference_logits(trained, data), root


@needs_tf
def test_tf_route_int8_with_uint8_io_runs_on_litert(project):
    from edgeship.tasks.host_check import host_check

    data, trained, reference, root = project
    artifact = get_target("tflite-int8").compile(CompileInputs(trained=trained, data=data, output_dir=root / "u8",
                                                               options={"route": "tf", "io": "uint8"}))
    assert artifact.notes["route"].startswith("onnx2tf") and artifact.converter["tensorflow"]
    assert artifact.inputs[0].dtype == "uint8" and artifact.outputs[0].dtype == "uint8"
    assert artifact.inputs[0].shape == (1, 1, 8, 8)  # NCHW, like litert-torch's artifacts
    assert artifact.notes["calibration_images"] == 16 and artifact.notes["ops"]["CONV_2D"] >= 1
    check = host_check(artifact, data, reference)
    assert check.error is None and check.accuracy >= trained.test_accuracy - 0.05


@needs_tf
def test_auto_falls_back_to_tf_when_litert_torch_cannot_convert(project, monkeypatch):
    from edgeship.tasks.host_check import host_check

    data, trained, reference, root = project
    monkeypatch.setenv("EDGESHIP_LITERT_PYTHON", str(root / "no-litert-torch" / "python"))  # litert-torch fails
    artifact = get_target("tflite-fp32").compile(CompileInputs(trained=trained, data=data, output_dir=root / "fp32"))
    assert "EDGESHIP_LITERT_PYTHON" in artifact.notes["fallback_from"]
    assert host_check(artifact, data, reference).top1_agreement == 1.0
    with pytest.raises(CompileError, match="EDGESHIP_LITERT_PYTHON"):  # route litert-torch: no fallback
        get_target("tflite-fp32").compile(CompileInputs(trained=trained, data=data, output_dir=root / "x",
                                                        options={"route": "litert-torch"}))
