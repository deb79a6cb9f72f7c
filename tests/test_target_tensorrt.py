"""TensorRT targets: the ONNX a device builds its engine from, checked here as far as a CPU allows.

Real onnx.checker, Polygraphy lint and ONNX Runtime runs against torch on the test split.
Building and running engines needs TensorRT and an NVIDIA GPU: those tests run where
`tensorrt` imports and a GPU is present, and are skipped elsewhere with that reason.
"""

from __future__ import annotations

import importlib.util

import pytest

from edgeship.config import DataParams, ModelParams, QatParams, TrainParams
from edgeship.device.runtimes import available_runtimes, nvidia_gpu_present, unavailable_reason
from edgeship.errors import CompileError
from edgeship.files import sha256_of
from edgeship.targets import KNOWN_TARGETS
from edgeship.tasks.compile import CompileInputs, get_target
from edgeship.tasks.compile.tensorrt import check_onnx

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None and nvidia_gpu_present()
needs_tensorrt = pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT needs the tensorrt package and a CUDA GPU")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from edgeship.tasks.data import export_digits, prepare
    from edgeship.tasks.host_check import reference_logits
    from edgeship.tasks.qat import quantization_aware_train
    from edgeship.tasks.train import train

    root = tmp_path_factory.mktemp("tensorrt")
    export_digits(root / "raw")
    data = prepare(root / "raw", root / "prepared", DataParams(input_size=8, calibration_size=16))
    model = train(data, ModelParams(factory="edgeship.models.zoo:small_resnet", kwargs={"widths": [8, 16]}),
                  TrainParams(epochs=2), root / "model")
    quantized = quantization_aware_train(model, data, QatParams(epochs=1, freeze_bn_after_epoch=0,
                                                                freeze_observers_after_epoch=1), root / "qat")
    artifacts = {name: get_target(name).compile(CompileInputs(trained=model, data=data, quantized=quantized,
                                                              output_dir=root / name))
                 for name in ("tensorrt-fp16", "tensorrt-int8")}
    return data, model, quantized, reference_logits(model, data), artifacts


def test_tensorrt_targets_are_registered_for_nvidia_hardware():
    for name in ("tensorrt-fp16", "tensorrt-int8"):
        target, row = get_target(name), KNOWN_TARGETS[name]
        assert (target.name, target.runtime, row.hardware) == (name, "tensorrt", "nvidia")
    assert get_target("tensorrt-int8").needs_quantized and not get_target("tensorrt-fp16").needs_quantized


def test_fp16_onnx_is_static_checked_and_matches_torch(compiled):
    artifact = compiled[4]["tensorrt-fp16"]
    assert artifact.path.suffix == ".onnx" and artifact.sha256 == sha256_of(artifact.path)
    assert artifact.inputs[0].shape == (1, 1, 8, 8) and artifact.outputs[0].shape == (1, 10)
    notes = artifact.notes
    assert notes["onnx_checker"] == "passed (full_check)" and 13 <= notes["opset"] <= 20
    assert notes["lint"]["passing_nodes"] > 0
    assert notes["onnxrt_vs_torch"]["top1_agreement"] == 1.0
    assert notes["onnxrt_vs_torch"]["max_abs_logit_diff"] < 1e-3


def test_int8_onnx_keeps_explicit_qdq_with_constant_scales(compiled):
    _, _, quantized, _, artifacts = compiled
    notes = artifacts["tensorrt-int8"].notes
    assert notes["qdq_nodes"]["QuantizeLinear"] > 0 and notes["qdq_nodes"]["DequantizeLinear"] > 0
    assert notes["constant_folding"]["nodes_after"] <= notes["constant_folding"]["nodes_before"]
    assert notes["onnxrt_vs_torch"]["accuracy"] == pytest.approx(quantized.test_accuracy, abs=0.05)
    assert artifacts["tensorrt-int8"].inputs[0].shape == (1, 1, 8, 8)


def test_int8_without_the_qat_model_is_a_compile_error(compiled, tmp_path):
    data, model, _, _, _ = compiled
    with pytest.raises(CompileError, match="qat stage"):
        get_target("tensorrt-int8").compile(CompileInputs(trained=model, data=data, output_dir=tmp_path))


def test_dynamic_shapes_are_refused(tmp_path):
    from onnx_models import write_tiny_classifier

    with pytest.raises(CompileError, match="dynamic dimensions"):
        check_onnx(write_tiny_classifier(tmp_path / "dynamic.onnx"), int8=False)


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the behaviour without TensorRT")
def test_without_a_gpu_the_target_is_not_measured_never_passed(compiled):
    from edgeship.tasks.host_check import host_check

    data, _, _, reference, artifacts = compiled
    assert "tensorrt" not in available_runtimes()
    assert artifacts["tensorrt-fp16"].notes["measured_here"] == f"not measured: {unavailable_reason('tensorrt')}"
    check = host_check(artifacts["tensorrt-fp16"], data, reference)
    assert check.accuracy is None and "TensorRT needs" in check.error


@needs_tensorrt
@pytest.mark.parametrize("name", ["tensorrt-fp16", "tensorrt-int8"])
def test_engine_builds_with_a_timing_cache_and_runs(compiled, name, tmp_path, monkeypatch):
    from edgeship.device.runtimes import open_session
    from edgeship.device.tensorrt_build import build_engine
    from edgeship.tasks.host_check import host_check

    monkeypatch.setenv("EDGESHIP_TRT_CACHE_DIR", str(tmp_path / "cache"))
    data, _, _, reference, artifacts = compiled
    precision = "int8" if name.endswith("int8") else "fp16"
    build = build_engine(artifacts[name].path, tmp_path / "model.engine", precision=precision)
    assert build["sha256"] == sha256_of(tmp_path / "model.engine") and build["log"]
    assert (tmp_path / "cache").is_dir() and any((tmp_path / "cache").iterdir())
    session = open_session("tensorrt", tmp_path / "model.engine")
    assert session.inputs[0].shape == (1, 1, 8, 8)
    check = host_check(artifacts[name], data, reference)  # the adapter builds the engine from the ONNX itself
    assert check.error is None and check.top1_agreement >= (0.98 if precision == "fp16" else 0.6)
